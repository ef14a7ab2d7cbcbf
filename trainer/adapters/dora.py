"""DoRA as a side branch: W' = m * V / ||V||, V = W + (alpha / rank) * up @ down, W frozen and never copied.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation" (2024). The norm runs over each *input*
column, with the magnitude saved as `dora_scale` of shape [1, in(, 1, 1)]: the convention of LyCORIS
(`dora_wd`), A1111/Forge (which reads only this one) and ComfyUI's weight_decompose, so every loader
rebuilds the same W'. As in PEFT and the paper (section 4.3), the norm is treated as a constant in
backward, which spares its gradient.

W' is never formed: a per-column scale g = m / ||V|| commutes into the layer's input, so the host's own
layer runs on g * x and the LoRA branch is added as usual: W' x = W (g x) + s up(down(g x)). Only V is
formed (one full-size fp32 temporary per layer and step, no gradient) to take its column norms.
"""

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .lora import LoRABranch

NORM_EPS = torch.finfo(torch.float32).eps  # what ComfyUI and LyCORIS add to the norm


class DoRABranch(LoRABranch):
    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__(base, rank, alpha)
        with torch.no_grad():
            self.magnitude = nn.Parameter(self.column_norms(base.weight.detach().cpu()))
        # Set again from the host's weight at the first attach: only then is it the weight the clone trains
        # on (with any LoRA from LoraLoader patched in); a loaded magnitude is kept.
        self._magnitude_set = False

    def kohya_parameters(self) -> dict[str, nn.Parameter]:
        return {**super().kohya_parameters(), "dora_scale": self.magnitude}

    def load_kohya_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        super().load_kohya_tensors(name, tensors)
        self._magnitude_set = True

    def column_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s up down|| per input column, shaped like the magnitude."""
        low_rank = self.up.weight.flatten(1) @ self.down.weight.flatten(1)
        merged = weight.to(low_rank.dtype) + self.scale * low_rank.view(weight.shape)
        norms = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        return norms.view(1, -1, *[1] * len(self.layer.kernel)) + NORM_EPS

    def scale_input(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            norms = self.column_norms(module.weight.detach())
        column_scale = self.magnitude / norms
        if self.layer.conv is None:
            column_scale = column_scale.view(-1)
        return (x.to(column_scale.dtype) * column_scale).to(x.dtype)

    def hook_onto(self, module: nn.Module) -> RemovableHandle:
        if not self._magnitude_set:
            with torch.no_grad():
                self.magnitude.copy_(self.column_norms(module.weight.detach()))
            self._magnitude_set = True
        before = module.register_forward_pre_hook(lambda m, args: (self.scale_input(m, args[0]), *args[1:]))
        return _Handles(before, super().hook_onto(module))


class _Handles:
    def __init__(self, *handles: RemovableHandle):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
