"""Full fine-tune: the denoiser's own weights are trained, on a copy that exists only for training.

`TrainSession` trains whatever it is handed with the adapter network's interface (attach/detach,
parameters, the tensors a resumable state keeps); `FullFineTune` is that interface over a trainable copy
of every denoiser parameter. attach() swaps each host parameter for its copy, detach() puts the host's
back: the host's MODEL never changes, and clones that are not training never see the copy.

Memory beside the host's weights, per trained weight: the copy, its gradient and AdamW's two moments,
i.e. 4x the denoiser in the training dtype (fp32: 16 bytes a weight; SD1.5's 860 M weights: ~13.8 GB).
"""

import torch
from torch import nn

from .errors import ConfigError

TRAINABLE_DTYPES = (torch.float32, torch.bfloat16)


class FullFineTune(nn.Module):
    """Trainable copies of every parameter of `root` (the denoiser), keyed by their names in it."""

    def __init__(self, root: nn.Module, device: torch.device | None = None):
        super().__init__()
        self._root = [root]  # a list: the host's modules are referenced, never registered as ours
        self._names: list[str] = []
        copies = []
        with torch.inference_mode(False), torch.no_grad():
            for name, parameter in root.named_parameters():
                self._names.append(name)
                copies.append(nn.Parameter(_trainable_copy(name, parameter, device)))
        self.weights = nn.ParameterList(copies)
        self._swapped: list[tuple[nn.Module, str, nn.Parameter]] = []

    def attach(self) -> None:
        """Put the trainable copies in place of the host's parameters (of the loaded training clone)."""
        self.detach()
        modules = dict(self._root[0].named_modules())
        for name, weight in zip(self._names, self.weights):
            owner, _, attribute = name.rpartition(".")
            module = modules[owner]
            self._swapped.append((module, attribute, module._parameters[attribute]))
            module._parameters[attribute] = weight

    def detach(self) -> None:
        for module, attribute, original in reversed(self._swapped):
            module._parameters[attribute] = original
        self._swapped.clear()

    def trained_weights(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Every weight by its name in the denoiser (ldm layout, e.g. 'input_blocks.1.1.proj_in.weight')."""
        return {
            name: weight.detach().to(device=device, dtype=dtype or weight.dtype, copy=True)
            for name, weight in zip(self._names, self.weights)
        }

    # The session's checkpoint interface (named after the adapters' kohya files it first held).
    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return self.trained_weights(dtype)

    def load_kohya_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self._names if name not in tensors]
        if missing:
            raise KeyError(f"the saved state lacks {len(missing)} denoiser weights, e.g. {missing[0]}")
        with torch.no_grad():
            for name, weight in zip(self._names, self.weights):
                weight.copy_(tensors[name])


def _trainable_copy(name: str, parameter: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    if parameter.dtype not in TRAINABLE_DTYPES:
        raise ConfigError([
            f"the model's weights are {str(parameter.dtype).removeprefix('torch.')} ({name}): a full fine-tune "
            "trains fp32 or bf16 weights (fp16 updates underflow). Start ComfyUI with --fp32-unet or --bf16-unet."
        ])
    # clone() of a host's inference tensor outside inference mode is an ordinary tensor autograd may use.
    return parameter.detach().to(device=device or parameter.device).clone()
