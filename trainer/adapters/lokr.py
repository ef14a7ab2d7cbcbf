"""LoKr as a side branch: delta W = scale * kron(w1, w2), w2 low-rank (w2_a @ w2_b) when the rank is small.

As LyCORIS trains it (`modules/lokr.py`, `functional/general.py` factorization): out = out_l * out_k and
in = in_m * in_n split near `factor` (-1: near the square root), w1 [out_l, in_m] full, w2 [out_k, in_n(,
kernel)] full when rank >= max(out_k, in_n) / 2, else w2_a [out_k, rank] @ w2_b [rank, in_n * kernel].
Scale alpha / rank with a low-rank w2, else 1 (LyCORIS and ComfyUI ignore alpha then). Init: w1 and
w2_a Kaiming-uniform, w2 / w2_b zeros. Forms the full-size delta in every forward.
"""

import math

import torch
from torch import nn

from .base import WeightDeltaBranch


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dimension, m as close to `factor` as divisors allow (LyCORIS' rule)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrBranch(WeightDeltaBranch):
    def __init__(self, base: nn.Module, rank: int, alpha: float, factor: int = -1):
        super().__init__(base, rank, alpha)
        out_l, out_k = factorization(self.layer.out_dim, factor)
        in_m, in_n = factorization(self.layer.in_dim, factor)
        kernel = self.layer.kernel
        self.w1 = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(out_l, in_m), a=math.sqrt(5)))
        self.low_rank = rank < max(out_k, in_n) / 2
        if self.low_rank:
            self.w2_a = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(out_k, rank), a=math.sqrt(5)))
            self.w2_b = nn.Parameter(torch.zeros(rank, in_n * math.prod(kernel)))
        else:
            self.w2 = nn.Parameter(torch.zeros(out_k, in_n, *kernel))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.low_rank else 1.0

    def kohya_parameters(self) -> dict[str, nn.Parameter]:
        if self.low_rank:
            return {"lokr_w1": self.w1, "lokr_w2_a": self.w2_a, "lokr_w2_b": self.w2_b}
        return {"lokr_w1": self.w1, "lokr_w2": self.w2}

    def delta(self) -> torch.Tensor:
        w2 = self.w2_a @ self.w2_b if self.low_rank else self.w2.flatten(1)
        return torch.kron(self.w1, w2) * self.scale
