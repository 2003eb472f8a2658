"""Triangular Anderson acceleration (docs/ALGORITHM.md, section 3): the update and the memory it mixes.

State t of the window depends only on itself and the noisier states above it, so each state gets its own
mixing weights gamma_t from a least-squares problem over those states alone:

    (sum_{s >= t} dR_s^T dR_s + lambda I) gamma_t = sum_{s >= t} dR_s^T R_s                          (3)
    x_t <- x_t + R_t - (dX_t + dR_t) gamma_t                                                         (4)

Vanilla Anderson would share one gamma across the whole window.
"""
import torch


def triangular_anderson_step(R, dX, dR, valid, lam, plain=None):
    """The TAA step (4) for the states of a window below position upto = dX.shape[0], in float64.

    R: [W, D] residuals at the current iterate, window ordered from least to most noisy.
    dX: [upto, M, D], dR: [W, M, D]: each state's difference columns, in any order (views into the memory).
    valid: [upto, M] bool, the columns each state has (a state that entered the window recently has fewer), or
    None when every state has all M (the common case: the masks then cost nothing).
    lam: the regulariser lambda, or the matrix lambda I (the memory keeps one, so as not to build it per step).
    plain: [upto] bool or None, states that take the plain step whatever their problem gives (the solver's guard).
    Returns (step [upto, D] to add to x, fallback [upto] bool: states that took the plain fixed-point step R
    instead: plain ones, and those whose problem was singular or non-finite).
    """
    upto, M = dX.shape[0], dX.shape[1]
    # per state: the Gram matrix of its columns and their products with its residual, one batched product
    gram = torch.bmm(dR, dR.transpose(1, 2))                                            # [W, M, M]
    proj = torch.bmm(dR, R[:, :, None])                                                 # [W, M, 1]
    # sums over the window states at or above each state: reversed cumulative sums along the window (one pass
    # for both: each op here is a kernel launch per iteration)
    both = torch.cat([gram, proj], dim=2).flip(0).cumsum(0).flip(0)[:upto]              # [upto, M, M+1]
    gram, proj = both[:, :, :M], both[:, :, M]
    if not torch.is_tensor(lam):
        lam = lam * torch.eye(M, dtype=R.dtype, device=R.device)
    lhs, rhs = gram + lam, proj
    if valid is not None:
        # missing columns become identity rows with a zero right-hand side, so their gamma is exactly 0
        eye = torch.eye(M, dtype=R.dtype, device=R.device)
        lhs = torch.where(valid[:, :, None] & valid[:, None, :], lhs, eye)              # [upto, M, M]
        rhs = torch.where(valid, rhs, 0.0)
    gamma, info = torch.linalg.solve_ex(lhs, rhs)                                       # [upto, M]
    # x + R - sum_i gamma_i (dX_i + dR_i): one batched product for both kinds of column, added to R
    step = torch.baddbmm(R[:upto, None], gamma[:, None], dX + dR[:upto], alpha=-1).squeeze(1)  # [upto, D]
    # a non-finite gamma makes its row of step non-finite, and so does its row sum: one check for both
    bad = (info != 0) | ~torch.isfinite(step.sum(dim=1))
    if plain is not None:
        bad |= plain
    # a selection rather than a test and an assignment: no device sync
    return torch.where(bad[:, None], R[:upto], step), bad


class AndersonMemory:
    """One sample's TAA memory: the last iterate and residual of every state, and rings of the last m - 1
    differences dX, dR. Storing differences (not iterates) means no history is copied per iteration; storing them
    state-major ([T, M, D]) makes a window's columns one contiguous block for the batched products."""

    def __init__(self, m, T, D, device):
        M = m - 1
        self.M = M
        self.last_x = torch.zeros(T, D, dtype=torch.float64, device=device)
        self.last_r = torch.zeros(T, D, dtype=torch.float64, device=device)
        self.dX = torch.zeros(T, M, D, dtype=torch.float64, device=device)
        self.dR = torch.zeros(T, M, D, dtype=torch.float64, device=device)
        self.pushes = 0
        # the push at which each state entered the window, kept on the host: a state is pushed at every iteration
        # from then on, so its columns follow from it. States enter at the bottom of the window and stay until
        # frozen, so the lowest state of a window has the fewest columns, and whether all of them have every
        # column is known without reading (or writing) the device
        self.entered = [None] * T
        self.low = T
        self.device = device
        self._lam_eye = {}
        self._ranks = {}  # (pushes mod M, columns in use, oldest) -> (slots, rank [M'] on the device)

    def push(self, x, R, lo, F):
        """Record this iteration's iterate x and residual R of the window states lo .. F - 1 ([F - lo, D] each); a
        state seen before gains a column."""
        slot = self.pushes % self.M
        last_x, last_r = self.last_x[lo:F], self.last_r[lo:F]
        torch.sub(x, last_x, out=self.dX[lo:F, slot])
        torch.sub(R, last_r, out=self.dR[lo:F, slot])
        last_x.copy_(x)
        last_r.copy_(R)
        if lo < self.low:
            self.entered[lo:self.low] = [self.pushes] * (self.low - lo)
            self.low = lo
        self.pushes += 1

    def seen_mask(self, lo, hi):
        """[hi - lo] bool: which of the states lo .. hi - 1 have a previous iterate; None when all of them have
        (the lowest entered last, so it is the one to ask)."""
        if self.entered[lo] is not None:
            return None
        return torch.tensor([self.entered[t] is not None for t in range(lo, hi)], device=self.device)

    def _rank(self, M, oldest, device):
        """The ring slots in use and, per slot, its rank in the order a state takes its columns (0: first)."""
        key = (self.pushes % self.M, M, oldest)
        if key not in self._ranks:
            age = [(self.pushes - 1 - i) % self.M for i in range(self.M)]           # 0: the newest push
            slots = [i for i in range(self.M) if age[i] < M]
            rank = [M - 1 - age[i] if oldest else age[i] for i in slots]
            self._ranks[key] = (None if len(slots) == self.M else slots, torch.tensor(rank, device=device))
        return self._ranks[key]

    def step(self, R, lo, F, p, lam, oldest=False, plain=None):
        """The TAA step (4) for the window states lo .. lo + p - 1 (below the highest unconverged one).

        A state with c columns mixes its c newest; oldest=True: the c oldest of those the memory holds, as the
        reference implementation does (for a state that entered recently they include differences from before it
        entered, against 0). plain: as in triangular_anderson_step."""
        # only columns some state can have: after n pushes at most n - 1, which keeps a long memory as cheap as a
        # short one until it fills (the work grows with the square of the columns)
        M = min(self.M, self.pushes - 1)
        if M == 0:
            return R[:p].clone(), (torch.zeros(p, dtype=torch.bool, device=R.device) if plain is None else plain)
        slots, rank = self._rank(M, oldest, R.device)
        dX, dR = self.dX[lo:lo + p], self.dR[lo:F]                                    # views, ring order
        if slots is not None:  # the ring is not full yet: only its written slots
            dX, dR = dX[:, slots], dR[:, slots]
        if (M, lam) not in self._lam_eye:
            self._lam_eye[M, lam] = lam * torch.eye(M, dtype=torch.float64, device=R.device)
        lam_eye = self._lam_eye[M, lam]
        if self.pushes - self.entered[lo] - 1 >= M:  # the lowest state has every column: all of them have
            return triangular_anderson_step(R, dX, dR, None, lam_eye, plain)
        # columns per state: one per push after the one it entered at (M or more: all of them)
        columns = torch.tensor([[self.pushes - self.entered[t] - 1] for t in range(lo, lo + p)], device=R.device)
        return triangular_anderson_step(R, dX, dR, rank[None, :] < columns, lam_eye, plain)
