"""Triangular Anderson acceleration (docs/ALGORITHM.md, section 3): the update and the memory it mixes.

State t of the window depends only on itself and the noisier states above it, so each state gets its own
mixing weights gamma_t from a least-squares problem over those states alone:

    (sum_{s >= t} dR_s^T dR_s + lambda I) gamma_t = sum_{s >= t} dR_s^T R_s                          (3)
    x_t <- x_t + R_t - (dX_t + dR_t) gamma_t                                                         (4)

Vanilla Anderson would share one gamma across the whole window.
"""
import torch


def triangular_anderson_step(R, dX, dR, num_columns, lam, upto):
    """The TAA step (4) for the states of a window below position `upto`, in float64.

    R: [W, D] residuals at the current iterate, window ordered from least to most noisy.
    dX: list of M tensors [upto, D], dR: list of M tensors [W, D]: the difference columns, newest first
        (M = memory_size - 1); views into the solver's history, never copied here.
    num_columns: [W] long, how many of the newest columns each state has (a state that entered the window
        recently has a short history). Noisier states entered no later, so they have at least as many.
    Returns (step [upto, D] to add to x, fallback [upto] bool: states whose problem was singular or non-finite
    and that took the plain fixed-point step R instead).
    """
    M, W = len(dR), R.shape[0]
    gram = R.new_empty(W, M, M)                                                         # [W, M, M]
    proj = R.new_empty(W, M)                                                            # [W, M]
    for i in range(M):
        proj[:, i] = torch.einsum("wd,wd->w", dR[i], R)
        for j in range(i + 1):
            gram[:, i, j] = gram[:, j, i] = torch.einsum("wd,wd->w", dR[i], dR[j])
    # sums over the window states at or above each state: reversed cumulative sums along the window
    gram = gram.flip(0).cumsum(0).flip(0)[:upto]
    proj = proj.flip(0).cumsum(0).flip(0)[:upto]
    valid = torch.arange(M, device=R.device)[None, :] < num_columns[:upto, None]      # [upto, M]
    pair = valid[:, :, None] & valid[:, None, :]                                        # [upto, M, M]
    eye = torch.eye(M, dtype=R.dtype, device=R.device)
    # missing columns become identity rows with a zero right-hand side, so their gamma is exactly 0
    lhs = torch.where(pair, gram + lam * eye, eye)
    rhs = torch.where(valid, proj, 0.0)
    gamma, info = torch.linalg.solve_ex(lhs, rhs)                                       # [upto, M]
    fallback = (info != 0) | ~torch.isfinite(gamma).all(dim=1)
    gamma = torch.where(fallback[:, None], 0.0, gamma).neg_()
    step = R[:upto].clone()                                                             # [upto, D]
    for i in range(M):
        step.addcmul_(dX[i], gamma[:, i:i + 1]).addcmul_(dR[i][:upto], gamma[:, i:i + 1])
    bad = fallback | ~torch.isfinite(step).all(dim=1)
    if bool(bad.any()):
        step[bad] = R[:upto][bad]
    return step, bad


class AndersonMemory:
    """One sample's TAA memory: the last iterate and residual of every state, and rings of the last m - 1
    differences dX, dR. Storing differences (not iterates) means no history is copied per iteration."""

    def __init__(self, m, T, D, device):
        M = m - 1
        self.M = M
        self.last_x = torch.zeros(T, D, dtype=torch.float64, device=device)
        self.last_r = torch.zeros(T, D, dtype=torch.float64, device=device)
        self.dX = torch.zeros(M, T, D, dtype=torch.float64, device=device)
        self.dR = torch.zeros(M, T, D, dtype=torch.float64, device=device)
        self.count = torch.zeros(T, dtype=torch.long, device=device)   # iterates seen per state (capped)
        self.pushes = 0

    def push(self, x, R, lo, F):
        """Record this iteration's window iterate x[lo:F] and residual R; a state seen before gains a column."""
        slot = self.pushes % self.M
        torch.sub(x[lo:F], self.last_x[lo:F], out=self.dX[slot, lo:F])
        torch.sub(R, self.last_r[lo:F], out=self.dR[slot, lo:F])
        self.last_x[lo:F] = x[lo:F]
        self.last_r[lo:F] = R
        self.count[lo:F] = torch.clamp(self.count[lo:F] + 1, max=self.M + 1)
        self.pushes += 1

    def step(self, R, lo, F, p, lam, oldest=False):
        """The TAA step (4) for the window states lo .. lo + p - 1 (below the highest unconverged one).

        A state with c columns mixes its c newest; oldest=True: the c oldest of those the memory holds, as the
        reference implementation does (for a state that entered recently they include differences from before it
        entered, against 0)."""
        # only columns some state can have: after n pushes at most n - 1, which keeps a long memory as cheap as a
        # short one until it fills (the work grows with the square of the columns)
        M = min(self.M, self.pushes - 1)
        if M == 0:
            return R[:p].clone(), torch.zeros(p, dtype=torch.bool, device=R.device)
        if oldest:
            slots = [(self.pushes - M + j) % self.M for j in range(M)]
        else:
            slots = [(self.pushes - 1 - j) % self.M for j in range(M)]   # newest first
        dX = [self.dX[s, lo:lo + p] for s in slots]
        dR = [self.dR[s, lo:F] for s in slots]
        # the least-squares sums run over every window state at or above t, so dR spans the whole window
        return triangular_anderson_step(R, dX, dR, self.count[lo:F] - 1, lam, p)
