"""Triangular Anderson acceleration (METHOD.md section 3).

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
