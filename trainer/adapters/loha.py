"""LoHa as a side branch: delta W = (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b), a Hadamard product.

Hyeon-Woo et al., "FedPara" (2022), as LyCORIS trains it (`modules/loha.py`): same keys (`hada_w1_a`,
`hada_w1_b`, `hada_w2_a`, `hada_w2_b`; a convolution's b factors span in_channels * kernel) and init
(w1_b, w2_b ~ N(0, 1), w1_a ~ N(0, 0.1), w2_a = 0: a fresh branch changes nothing). Effective rank up to
rank^2 for the parameters of two rank-`rank` pairs; it forms the full-size delta in every forward.
"""

import torch
from torch import nn

from .base import WeightDeltaBranch


class LoHaBranch(WeightDeltaBranch):
    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__(base, rank, alpha)
        out_dim, in_dim = self.layer.out_dim, self.layer.flat_in
        self.w1_a = nn.Parameter(torch.empty(out_dim, rank).normal_(std=0.1))
        self.w1_b = nn.Parameter(torch.empty(rank, in_dim).normal_(std=1.0))
        self.w2_a = nn.Parameter(torch.zeros(out_dim, rank))
        self.w2_b = nn.Parameter(torch.empty(rank, in_dim).normal_(std=1.0))

    def kohya_parameters(self) -> dict[str, nn.Parameter]:
        return {"hada_w1_a": self.w1_a, "hada_w1_b": self.w1_b, "hada_w2_a": self.w2_a, "hada_w2_b": self.w2_b}

    def delta(self) -> torch.Tensor:
        return (self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b) * self.scale
