"""Extract a LoRA from a fine-tuned checkpoint and its base: the difference of each layer, factored by SVD."""

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .arch import arch_from_checkpoint_keys
from .checkpoint_keys import lora_layers
from .errors import ConversionError
from .lora_file import ParsedLoRA, render_lora, write_lora
from .lora_keys import LoRA
from .svd import LowRank, factorize, pooled_error
from .tensor_files import TensorSource
from .unet_names import layout_from_keys

log = logging.getLogger("tunekit.convert")


@dataclass(frozen=True)
class ExtractOptions:
    rank: int | None = 32  # fixed rank, or the cap when max_error is given
    max_error: float | None = None  # relative Frobenius error per layer, e.g. 0.05
    conv: bool = False  # also the UNet's conv layers (LoCon)
    text_encoders: bool = True
    dtype: torch.dtype = torch.float16


@dataclass
class ExtractReport:
    layers: int
    unchanged: int
    error: float  # pooled relative error over all extracted layers
    worst: tuple[str, float]
    ranks: dict[int, int]
    seconds: float
    per_layer: dict[str, tuple[int, float]] = field(default_factory=dict)

    def summary(self) -> str:
        ranks = ", ".join(f"rank {rank}: {count}" for rank, count in sorted(self.ranks.items()))
        return (f"Extracted {self.layers} layers ({self.unchanged} unchanged, skipped); relative error {self.error:.2e} "
                f"over all, worst {self.worst[1]:.2e} ({self.worst[0]}); {ranks}; {self.seconds:.1f} s")


def _matrix(difference: torch.Tensor) -> torch.Tensor:
    return difference.reshape(difference.shape[0], -1)


def _as_params(part: LowRank, shape: torch.Size) -> dict[str, torch.Tensor]:
    up, down = part.up, part.down
    if len(shape) == 4:  # conv: down keeps the kernel, up is a 1x1 conv (kohya's LoCon layout)
        up, down = up.reshape(shape[0], part.rank, 1, 1), down.reshape(part.rank, *shape[1:])
    return {"lora_up.weight": up.contiguous(), "lora_down.weight": down.contiguous(),
            "alpha": torch.tensor(float(part.rank))}  # alpha = rank: scale 1, the factors carry everything


def extract_lora(tuned_path: Path, base_path: Path, options: ExtractOptions = ExtractOptions()) -> tuple[ParsedLoRA, ExtractReport]:
    began = time.monotonic()
    lora: LoRA = {}
    parts: dict[str, LowRank] = {}
    unchanged = 0
    with TensorSource(tuned_path) as tuned, TensorSource(base_path) as base:
        arch = arch_from_checkpoint_keys(tuned.specs)
        _check_same_model(tuned, base, arch)
        for key, spec in tuned.specs.items():
            layers = lora_layers(key, arch, options.conv, len(spec.shape))
            if not layers or (not options.text_encoders and layers[0][0].component != "unet"):
                continue
            tuned_weight, base_weight = tuned.get(key).float(), base.get(key).float()
            for ref, target in layers:
                rows = target.rows(spec.shape[0]) or slice(None)
                difference = tuned_weight[rows] - base_weight[rows]
                if not torch.any(difference):
                    unchanged += 1
                    continue
                part = factorize(_matrix(difference), options.rank, options.max_error, options.dtype)
                lora[ref] = _as_params(part, difference.shape)
                parts[f"{ref.component}:{ref.path}"] = part
        layout = layout_from_keys(tuned.specs)
    if not lora:
        raise ConversionError(f"'{Path(tuned_path).name}' and '{Path(base_path).name}' have identical weights in every "
                              "layer a LoRA can hold: there is nothing to extract. Is the first one really the fine-tune?")
    report = _report(parts, unchanged, time.monotonic() - began)
    return ParsedLoRA(lora, arch, layout, ("checkpoint",)), report


def _check_same_model(tuned: TensorSource, base: TensorSource, arch) -> None:
    base_arch = arch_from_checkpoint_keys(base.specs)
    if base_arch is not arch:
        raise ConversionError(f"The fine-tune is {arch.title} but the base is {base_arch.title}: pick the base it was tuned from.")
    different = [key for key, spec in tuned.specs.items() if key in base.specs and base.specs[key].shape != spec.shape]
    if different:
        raise ConversionError(f"The base does not match the fine-tune: '{different[0]}' is {base.specs[different[0]].shape} "
                              f"in the base and {tuned.specs[different[0]].shape} in the fine-tune ({len(different)} such).")
    missing = [key for key in tuned.specs if key not in base.specs and lora_layers(key, arch, True, len(tuned.specs[key].shape))]
    if missing:
        raise ConversionError(f"The base lacks {len(missing)} layers of the fine-tune (e.g. '{missing[0]}'): pick the base it was tuned from.")


def _report(parts: dict[str, LowRank], unchanged: int, seconds: float) -> ExtractReport:
    ranks: dict[int, int] = {}
    for part in parts.values():
        ranks[part.rank] = ranks.get(part.rank, 0) + 1
    worst = max(parts.items(), key=lambda item: item[1].error)
    return ExtractReport(len(parts), unchanged, pooled_error(list(parts.values())), (worst[0], worst[1].error), ranks,
                         seconds, {name: (part.rank, part.error) for name, part in parts.items()})


def extract_lora_file(tuned_path: Path, base_path: Path, destination: Path, options: ExtractOptions = ExtractOptions(),
                      fmt: str = "kohya", overwrite: bool = False) -> ExtractReport:
    parsed, report = extract_lora(tuned_path, base_path, options)
    metadata = {
        "ss_sd_model_name": Path(base_path).name,
        "ss_network_dim": str(max(report.ranks)),
        "ss_network_alpha": str(float(max(report.ranks))),
        "ss_training_comment": f"extracted by TuneKit from {Path(tuned_path).name} - {Path(base_path).name}",
        "tunekit_extract": json.dumps({"tuned": Path(tuned_path).name, "base": Path(base_path).name, "rank": options.rank,
                                       "max_error": options.max_error, "conv": options.conv, "error": report.error}),
    }
    write_lora(destination, render_lora(parsed, fmt, metadata), overwrite)
    log.info("TuneKit: %s", report.summary())
    return report
