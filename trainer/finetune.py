"""Full fine-tune: the denoiser's own weights (and optionally the text encoders') are trained, on copies that
exist only for training.

`TrainSession` trains whatever it is handed with the adapter network's interface (attach/detach,
parameters, the tensors a resumable state keeps); `FullFineTune` is that interface over a trainable copy
of every denoiser parameter and, where asked, every parameter of the chosen text encoders. attach() swaps
each host parameter for its copy, detach() puts the host's back: the host's MODEL and CLIP never change,
and clones that are not training never see the copies. With text encoders the bridge attaches each model's
part on its own: attach('lora_unet') on the MODEL's training clone, attach('lora_te') on the CLIP's.

Memory beside the host's weights, per trained weight: the copy, its gradient and AdamW's two moments,
i.e. 4x the trained model in the training dtype (fp32: 16 bytes a weight; SD1.5's 860 M UNet weights:
~13.8 GB; its 123 M CLIP-L weights: ~2 GB; SDXL's 695 M CLIP-G weights: ~11 GB).
"""

import torch
from torch import nn

from .config import TrainConfig
from .errors import ConfigError
from .text_encoders import param_groups_by_name

TRAINABLE_DTYPES = (torch.float32, torch.bfloat16)
UNET_PART = "lora_unet"  # the bridge attaches each model's part by its kohya prefix


class FullFineTune(nn.Module):
    """Trainable copies of every parameter of `root` (the denoiser), keyed by their names in it, and of every
    parameter of `text_encoders` (kohya prefix -> (encoder name, {transformers path: module}), as
    trainer.text_encoders.chosen_encoders gives), keyed '<encoder>.<transformers path>'."""

    def __init__(self, root: nn.Module, device: torch.device | None = None,
                 text_encoders: dict[str, tuple[str, dict[str, nn.Module]]] | None = None):
        super().__init__()
        # (part, key, module, attribute) per copy; the host's modules are referenced, never registered as ours
        self._slots: list[tuple[str, str, nn.Module, str]] = []
        copies = []
        with torch.inference_mode(False), torch.no_grad():
            for part, key, module, attribute in _host_parameters(root, text_encoders or {}):
                parameter = module._parameters[attribute]
                if part == UNET_PART:
                    copy = _trainable_copy(key, parameter, device)
                else:  # where the host loaded its text encoder (its own device)
                    copy = _trainable_copy(key, parameter, None, _text_encoder_dtype(parameter))
                copies.append(nn.Parameter(copy))
                self._slots.append((part, key, module, attribute))
        self.weights = nn.ParameterList(copies)
        self._swapped: list[tuple[str, nn.Module, str, nn.Parameter]] = []

    @property
    def trains_text(self) -> bool:
        """The session then encodes captions every step, with grad, through the training text encoders."""
        return any(part != UNET_PART for part, _, _, _ in self._slots)

    def attach(self, *parts: str) -> None:
        """Put the trainable copies in place of the host's parameters (of the loaded training clone); `parts`:
        only those whose kohya prefix starts with one of them (none given: every part)."""
        self.detach(*parts)
        for (part, _, module, attribute), weight in zip(self._slots, self.weights):
            if _selected(part, parts):
                self._swapped.append((part, module, attribute, module._parameters[attribute]))
                module._parameters[attribute] = weight

    def detach(self, *parts: str) -> None:
        kept = []
        for part, module, attribute, original in reversed(self._swapped):
            if _selected(part, parts):
                module._parameters[attribute] = original
            else:
                kept.append((part, module, attribute, original))
        self._swapped = kept[::-1]

    def param_groups(self, config: TrainConfig) -> list[dict]:
        """The UNet at the UNet rate, each text encoder at its own (text_encoder_lr, SDXL CLIP-G: text_encoder_2_lr)."""
        return param_groups_by_name([(part, weight) for (part, _, _, _), weight in zip(self._slots, self.weights)], config)

    def trained_weights(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Every denoiser weight by its name in the denoiser (ldm layout, e.g. 'input_blocks.1.1.proj_in.weight')."""
        return self._copies(lambda part: part == UNET_PART, dtype, device)

    def text_encoder_weights(self, dtype: torch.dtype | None = None,
                             device: torch.device | str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
        """Every trained text-encoder weight: encoder name -> {transformers path: tensor} ({} when none train)."""
        encoders: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self._copies(lambda part: part != UNET_PART, dtype, device).items():
            encoder, _, path = key.partition(".")
            encoders.setdefault(encoder, {})[path] = tensor
        return encoders

    def _copies(self, wanted, dtype, device) -> dict[str, torch.Tensor]:
        return {
            key: weight.detach().to(device=device, dtype=dtype or weight.dtype, copy=True)
            for (part, key, _, _), weight in zip(self._slots, self.weights) if wanted(part)
        }

    # The session's checkpoint interface (named after the adapters' kohya files it first held).
    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return self._copies(lambda part: True, dtype, "cpu")

    def load_kohya_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [(part, key) for part, key, _, _ in self._slots if key not in tensors]
        if all(part != UNET_PART for part, _ in missing) and missing:
            raise ConfigError([(f"the saved state has no text-encoder weights (e.g. {missing[0][1]}): it was trained "
                                "with text_encoders 'none'. Resume without training the text encoder, or use a new "
                                "run name to start fresh.")])
        if missing:
            raise KeyError(f"the saved state lacks {len(missing)} of the trained weights, e.g. {missing[0][1]}")
        with torch.no_grad():
            for (_, key, _, _), weight in zip(self._slots, self.weights):
                weight.copy_(tensors[key])


def _host_parameters(root: nn.Module, text_encoders: dict[str, tuple[str, dict[str, nn.Module]]]):
    """(part, key, module, attribute) of every parameter to train, each once."""
    seen: set[int] = set()
    for path, module in root.named_modules():
        for attribute, parameter in module._parameters.items():
            if parameter is not None and id(parameter) not in seen:
                seen.add(id(parameter))
                yield UNET_PART, f"{path}.{attribute}" if path else attribute, module, attribute
    for part, (encoder, modules) in text_encoders.items():
        for path, module in modules.items():
            for attribute, parameter in module._parameters.items():
                if parameter is not None and id(parameter) not in seen:
                    seen.add(id(parameter))
                    yield part, ".".join(filter(None, (encoder, path, attribute))), module, attribute


def _selected(part: str, parts: tuple[str, ...]) -> bool:
    return not parts or part.startswith(parts)


def _text_encoder_dtype(parameter: torch.Tensor) -> torch.dtype:
    """Text encoders train in fp32 unless they are bf16: hosts keep them in fp16 (or fp8) and cast each weight
    to the compute dtype in the forward, so a wider copy runs as is; fp16 updates would underflow."""
    return parameter.dtype if parameter.dtype in TRAINABLE_DTYPES else torch.float32


def _trainable_copy(name: str, parameter: torch.Tensor, device: torch.device | None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    if dtype is None and parameter.dtype not in TRAINABLE_DTYPES:
        raise ConfigError([(
            f"the model's weights are {str(parameter.dtype).removeprefix('torch.')} ({name}): a full fine-tune "
            "trains fp32 or bf16 weights (fp16 updates underflow). Start ComfyUI with --fp32-unet or --bf16-unet."
        )])
    # clone() of a host's inference tensor outside inference mode is an ordinary tensor autograd may use.
    return parameter.detach().to(device=device or parameter.device, dtype=dtype or parameter.dtype).clone()
