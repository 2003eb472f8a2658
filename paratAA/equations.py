"""Order-k equations (METHOD.md section 2).

Unrolling step (1) k times anchors state x_s at x_u, u = min(s + k, F) with F the frozen boundary:

    x_s = P[s, u] x_u + sum_{r = s}^{u-1} P[s, r] e_r,     e_r = b_r eps(x_{r+1}) + c_r xi_r       (2)

with P[s, r] = a_s a_{s+1} ... a_{r-1} (P[s, s] = 1). Every order has the same fixed point (the sequential
trajectory); a higher order propagates information further per iteration.
"""
import torch


def _check_order(order):
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an integer >= 1, got {order!r}")


class OrderKEquations:
    def __init__(self, schedule, order, device=None):
        _check_order(order)
        T = schedule.num_steps
        a = schedule.a.to(torch.float64)
        # Row by row cumulative products: the same sequence of multiplications as sampling step by step.
        P = torch.zeros(T + 1, T + 1, dtype=torch.float64)          # [T+1, T+1], P[s, r] for r >= s
        for s in range(T + 1):
            P[s, s] = 1.0
            if s < T:
                P[s, s + 1:] = torch.cumprod(a[s:], dim=0)
        s_idx = torch.arange(T + 1)
        offset = s_idx[None, :] - s_idx[:, None]                     # r - s
        self.order = order
        self.P = P.to(device)                                          # anchor weights
        self.E = torch.where((offset >= 0) & (offset < order), P, 0.0).to(device)  # eps weights, banded to k

    def residual(self, x, e, lo, F):
        """Order-k residual of the window states lo..F-1.

        x: [T+1, D] current states (x[F] is frozen); e: [F-lo, D] the e_r of the window.
        Returns R: [F-lo, D], RHS of (2) minus x_s.
        """
        s = torch.arange(lo, F, device=x.device)
        u = torch.clamp(s + self.order, max=F)
        if self.order == 1:  # no matmul needed: the anchor is the neighbour
            R = e.clone()
        else:
            R = self.E[lo:F, lo:F] @ e                                 # [W, D]
        return R.addcmul_(self.P[s, u][:, None], x[u]).sub_(x[lo:F])
