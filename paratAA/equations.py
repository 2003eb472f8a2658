"""Order-k equations (docs/ALGORITHM.md, section 2), in two forms with the same solution.

Write r_r = a_r x_{r+1} + e_r - x_r for the order-1 residual of step r, e_r = b_r eps(x_{r+1}) + c_r xi_r.
Anchored k levels up, at x_u with u = min(s + k, F) (F: the frozen boundary), the order-k residual of state x_s is
a weighted sum of the order-1 residuals between s and u:

    R_s = sum_{r = s}^{u-1} W[s, r] r_r                                                              (2')

Both forms vanish exactly on the sequential trajectory, so both have the same fixed point for every order; they
differ in how an error in one state moves the states below it during the iteration x <- x + R.

"ddim": W[s, r] = a_s a_{s+1} ... a_{r-1}. The sum telescopes into the paper's equation (2),
    x_s = P[s, u] x_u + sum_{r=s}^{u-1} P[s, r] e_r,
the exact DDIM composition with eps held fixed (the form of the paper and of its reference implementation).

"picard": W[s, r] = 1. The sum telescopes into x_s = x_u + sum_{r=s}^{u-1} (step_r(x_{r+1}) - x_{r+1}),
ParaDiGMS's cumulative sum of drifts. Why it converges faster on trained models: x <- x + W r is a Newton step
when W is the inverse of the order-1 system's Jacobian, i.e. when W[s, r] is the product of the step
derivatives d x_r / d x_{r+1} = a_r + b_r d eps / dx. "ddim" takes d eps / dx = 0 (derivative a_r; the
product of the a's reaches 14 over SD's 100-step schedule, 157 over DiT's); for data of unit variance -- what
latent scaling aims for -- the derivative of a DDIM step is cos of the step's angle, nearly 1, which is what
"picard" takes. On the embedded models ParaTAA reaches the same image in a quarter to a half fewer iterations
with it (BENCHMARKS.md).
"""
import torch

FORMS = ("picard", "ddim")


class OrderKEquations:
    def __init__(self, schedule, order, form="picard", device=None):
        """order in 1..T and form in FORMS (checked by SolverConfig)."""
        T = schedule.num_steps
        self.order, self.form = order, form
        self.a = schedule.a.to(device=device, dtype=torch.float64)   # [T], for boundary_update
        if form == "picard":
            return
        a = schedule.a.to(torch.float64)
        # Row by row cumulative products: the same sequence of multiplications as sampling step by step.
        P = torch.zeros(T + 1, T + 1, dtype=torch.float64)          # [T+1, T+1], P[s, r] for r >= s
        for s in range(T + 1):
            P[s, s] = 1.0
            if s < T:
                P[s, s + 1:] = torch.cumprod(a[s:], dim=0)
        s_idx = torch.arange(T + 1)
        offset = s_idx[None, :] - s_idx[:, None]                     # r - s
        self.P = P.to(device)                                          # anchor weights
        self.E = torch.where((offset >= 0) & (offset < order), P, 0.0).to(device)  # eps weights, banded to k

    def residual(self, x, e, r1, lo, F):
        """Order-k residual of the window states lo..F-1.

        x: [T+1, D] current states (x[F] is frozen); e: [F-lo, D] the e_r of the window; r1: [F-lo, D] the
        order-1 residuals a_r x_{r+1} + e_r - x_r (the solver has them from its convergence test).
        Returns R: [F-lo, D].
        """
        if self.order == 1:  # both forms: the anchor is the neighbour
            return r1.clone()
        if self.form == "picard":
            # R_s = sum of r1 over s..u-1 = prefix[u-1] - prefix[s] + r1[s]
            W = F - lo
            prefix = r1.cumsum(0)                                      # [W, D]
            if self.order >= W:  # every state sums up to the window's top: u - 1 = W - 1 for all
                return (prefix[-1:] - prefix).add_(r1)
            end = torch.clamp(torch.arange(W, device=r1.device) + self.order, max=W) - 1
            return prefix[end].sub_(prefix).add_(r1)
        s = torch.arange(lo, F, device=x.device)
        u = torch.clamp(s + self.order, max=F)
        R = self.E[lo:F, lo:F] @ e                                     # [W, D]
        return R.addcmul_(self.P[s, u][:, None], x[u]).sub_(x[lo:F])

    def boundary_update(self, x, e, r1, lo, F, s):
        """x_s + R_s for the window state s whose inputs x_{s+1} .. x_F are frozen (the solver's boundary state),
        computed without x_s: a_s x_{s+1} + e_s + sum_{r=s+1}^{u-1} W[s, r] r_r. Equal to x_s + R_s in exact
        arithmetic; in floating point x_s + R_s = x_s + (target - x_s) keeps only the digits of target that the
        current x_s leaves, and a state a diverging TAA iterate has pushed to 1e15 would be frozen 0.1 off
        (and the picard R_s, a difference of cumulative sums, carries the rounding of every residual below s).
        Returns [D]."""
        i = s - lo
        out = self.a[s] * x[s + 1] + e[i]
        u = min(s + self.order, F)
        if u - 1 > s:  # the residuals of the frozen states between s and the anchor, each with its weight
            rest = r1[i + 1:u - lo]                                    # [u - s - 1, D]
            out += rest.sum(0) if self.form == "picard" else self.P[s, s + 1:u] @ rest
        return out
