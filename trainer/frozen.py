"""Let autograd flow through a host's frozen weights without copying them.

Hosts such as ComfyUI load weights under `torch.inference_mode()`. Autograd refuses to save such
"inference tensors" for backward, yet the input gradient of every layer after the first adapter
needs its weight. A tensor made with `set_()` on the same storage is an ordinary tensor that
aliases the same memory: zero bytes copied. Base weights are also kept out of autograd
(`requires_grad=False`), so backward never forms full weight gradients.
"""

import torch
from torch import nn


class FrozenBase:
    """Swap a module tree's parameters for frozen aliases; `restore()` puts the originals back."""

    def __init__(self) -> None:
        self._swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        self._unfrozen: list[nn.Parameter] = []

    def apply(self, root: nn.Module) -> None:
        for module in root.modules():
            for name, parameter in list(module._parameters.items()):
                if parameter is None:
                    continue
                if parameter.is_inference():
                    module._parameters[name] = nn.Parameter(_alias(parameter), requires_grad=False)
                    self._swapped.append((module, name, parameter))
                elif parameter.requires_grad:
                    parameter.requires_grad_(False)
                    self._unfrozen.append(parameter)
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.is_inference():
                    module._buffers[name] = _alias(buffer)
                    self._swapped.append((module, name, buffer))

    def restore(self) -> None:
        for module, name, original in reversed(self._swapped):
            if name in module._parameters:
                module._parameters[name] = original
            else:
                module._buffers[name] = original
        for parameter in self._unfrozen:
            parameter.requires_grad_(True)
        self._swapped.clear()
        self._unfrozen.clear()


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(False):
        alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
        return alias
