"""Low-rank factors by SVD, with the rank picked by count or by error, and the error of the factors as
stored (after rounding to the file's dtype), so a reported error is the error a user gets.

Error is relative Frobenius: ||W - up @ down|| / ||W||. By Eckart-Young, keeping the r largest singular
values leaves sqrt(sum of the others squared), the least any rank-r matrix can.
"""

from dataclasses import dataclass

import torch

from .errors import ConversionError


@dataclass(frozen=True)
class LowRank:
    up: torch.Tensor  # (out, rank)
    down: torch.Tensor  # (rank, in)
    rank: int
    error: float  # relative, of the stored factors
    norm: float  # ||W||, to pool errors over layers


def choose_rank(singular: torch.Tensor, rank: int | None, max_error: float | None) -> int:
    """The fewest singular values that meet `max_error`, at most `rank`; or exactly `rank`."""
    if rank is None and max_error is None:
        raise ConversionError("Give a rank, an error threshold, or both (the rank then caps the threshold's choice).")
    available = int(singular.numel())
    if max_error is None:
        return min(rank, available)
    energy = singular.double().square()
    total = energy.sum()
    if total == 0:
        return 0
    tail = (energy.flip(0).cumsum(0).flip(0) / total).sqrt()  # tail[r] = error when keeping r values
    meets = (tail <= max_error).nonzero()
    chosen = int(meets[0]) if len(meets) else available
    return max(1, min(chosen, rank or available))


def _stored_error(target: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    norm = torch.linalg.matrix_norm(target.double())
    residual = torch.linalg.matrix_norm(target.double() - up.double() @ down.double())
    return float(residual / norm) if norm > 0 else 0.0


def factorize(matrix: torch.Tensor, rank: int | None, max_error: float | None, dtype: torch.dtype) -> LowRank:
    """Balanced factors (each side carries sqrt of the singular values, which keeps fp16 in range)."""
    matrix = matrix.float()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = choose_rank(s, rank, max_error)
    root = s[:r].sqrt()
    up, down = (u[:, :r] * root).to(dtype), (root[:, None] * vh[:r]).to(dtype)
    return LowRank(up, down, r, _stored_error(matrix, up, down), float(torch.linalg.matrix_norm(matrix.double())))


def refactorize(up: torch.Tensor, down: torch.Tensor, scale: float, rank: int | None, max_error: float | None,
                dtype: torch.dtype) -> LowRank:
    """New factors for W = scale * up @ down without forming W: W = Qu (scale Ru Rd^T) Qd^T, so its
    singular values are those of the small core, and the error comes from rank-sized products."""
    up, down = up.double().flatten(1), down.double().flatten(1)
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(scale * ru @ rd.T)
    r = choose_rank(s, rank, max_error)
    root = s[:r].sqrt()
    new_up, new_down = ((qu @ u[:, :r]) * root).to(dtype), (root[:, None] * (qd @ vh[:r].T).T).to(dtype)
    x, y = new_up.double(), new_down.double().T
    norm_sq = s.square().sum()
    cross = scale * ((up.T @ x) * (down @ y)).sum()
    approx_sq = ((x.T @ x) * (y.T @ y)).sum()
    error = (norm_sq - 2 * cross + approx_sq).clamp(min=0).sqrt() / norm_sq.sqrt() if norm_sq > 0 else torch.tensor(0.0)
    return LowRank(new_up, new_down, r, float(error), float(norm_sq.sqrt()))


def pooled_error(parts: list[LowRank]) -> float:
    """The relative error over all layers together: sqrt(sum (e_i ||W_i||)^2 / sum ||W_i||^2)."""
    total = sum(part.norm ** 2 for part in parts)
    return (sum((part.error * part.norm) ** 2 for part in parts) / total) ** 0.5 if total else 0.0
