"""LoRA as a side branch: y = W x + (alpha / rank) * up(down(x)), W frozen and never copied.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021). Initialisation follows
kohya's `networks/lora.py` (down: Kaiming-uniform, up: zeros) so a fresh branch changes nothing.
"""

import math

import torch
from torch import nn

from .base import AdapterBranch


class LoRABranch(AdapterBranch):
    """Also LoCon: on a 3x3 convolution the down projection is a 3x3 convolution (kohya's conv_dim)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__(base, rank, alpha)
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(
                base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False
            )
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        return self.up(self.down(x.to(dtype))) * self.scale

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`output + scale * up(down(x))`, the scale and the sum fused into the up projection's GEMM
        (addmm / baddbmm with beta 1): no separate multiply and add over the layer's whole output."""
        hidden = self.down(x.to(self.down.weight.dtype))
        weight = self.up.weight
        if output.dtype != weight.dtype:  # half-precision host weights: the branch stays fp32
            return output + (self.up(hidden) * self.scale).to(output.dtype)
        if isinstance(self.up, nn.Linear):
            fused = torch.addmm(output.reshape(-1, output.shape[-1]), hidden.reshape(-1, self.rank), weight.t(),
                                alpha=self.scale)
            return fused.view(output.shape)
        batch, channels = output.shape[:2]
        fused = torch.baddbmm(output.reshape(batch, channels, -1), weight.view(1, channels, self.rank).expand(batch, -1, -1),
                              hidden.reshape(batch, self.rank, -1), alpha=self.scale)
        return fused.view(output.shape)

    def kohya_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_down.weight": self.down.weight, "lora_up.weight": self.up.weight}
