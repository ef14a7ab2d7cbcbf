"""Merge LoRAs into a single-file checkpoint, streamed, with the numbers ComfyUI's LoraLoader gives at runtime."""

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files import atomic_write
from .arch import Arch, arch_from_checkpoint_keys
from .checkpoint import PRECISIONS, CheckpointOptions
from .checkpoint_keys import Target, weight_target
from .errors import ConversionError, UnknownArchitectureError
from .io import guarded_write, read_tensors, refuse_existing
from .lora_detect import detect_lora_arch
from .lora_file import parse_lora
from .lora_keys import split_key
from .lora_math import apply, diff_numel
from .tensor_files import TensorSource, TensorSpec, write_streaming
from .unet_names import UNetLayout, layout_from_keys

log = logging.getLogger("tunekit.convert")


@dataclass(frozen=True)
class LoraToMerge:
    path: Path
    strength: float = 1.0  # on the UNet, like LoraLoader's strength_model
    strength_clip: float | None = None  # on the text encoders; None: the same as `strength`


@dataclass
class MergeReport:
    destination: Path
    layers: dict[str, int]  # LoRA file name -> layers merged
    tensors_changed: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        merged = ", ".join(f"{name} ({count} layers)" for name, count in self.layers.items())
        return f"Merged {merged} into {self.destination.name}: {self.tensors_changed} tensors changed, {self.seconds:.1f} s"


# checkpoint key -> [(where in it, layer params, strength)]
Patches = dict[str, list[tuple[Target, dict, float]]]


def lora_patches(lora: LoraToMerge, arch: Arch, layout: UNetLayout, patches: Patches) -> int:
    tensors, metadata = read_tensors(lora.path)
    raws = [split_key(key) for key in tensors]
    try:
        detected = detect_lora_arch(raws, {key: tuple(value.shape) for key, value in tensors.items()}, metadata)
    except UnknownArchitectureError:
        detected = arch  # nothing says otherwise: the shape checks below still catch a wrong base
    if detected.name != arch.name:
        raise ConversionError(f"'{Path(lora.path).name}' is a {detected.title} LoRA but the checkpoint is {arch.title}: "
                              "merge it into a checkpoint of its own family.")
    parsed = parse_lora(tensors, metadata, family=arch.name, layout=layout)
    for ref, params in parsed.lora.items():
        strength = lora.strength if ref.component == "unet" or lora.strength_clip is None else lora.strength_clip
        weight_params = {name: value for name, value in params.items() if name != "diff_b"}
        if set(weight_params) - {"alpha", "dora_scale"}:
            target = weight_target(ref, arch)
            patches.setdefault(target.key, []).append((target, weight_params, strength))
        if "diff_b" in params:
            target = weight_target(ref, arch, bias=True)
            patches.setdefault(target.key, []).append((target, {"diff": params["diff_b"]}, strength))
    return len(parsed.lora)


def check_fits(patches: Patches, specs: dict[str, TensorSpec], names: str) -> None:
    """Every patched tensor exists and has room for its patch: refuse before writing anything."""
    problems = []
    for key, entries in patches.items():
        if key not in specs:
            problems.append(f"'{key}' is not in the checkpoint")
            continue
        spec = specs[key]
        for target, params, _ in entries:
            rows = target.rows(spec.shape[0])
            room = spec.numel // spec.shape[0] * (rows.stop - rows.start) if rows else spec.numel
            if diff_numel(params) != room:
                problems.append(f"'{key}' has shape {spec.shape} but the LoRA layer for it has {diff_numel(params)} values")
    if problems:
        raise ConversionError(f"The LoRA(s) {names} do not fit this checkpoint ({len(problems)} layers): "
                              + "; ".join(problems[:3]) + ". Pick the checkpoint the LoRA was made for.")


def merge_loras(checkpoint: Path, loras: list[LoraToMerge], destination: Path, precision: str | None = None,
                overwrite: bool = False) -> MergeReport:
    CheckpointOptions(precision=precision).check()
    destination = refuse_existing(Path(destination), overwrite)
    if not loras:
        raise ConversionError("No LoRA to merge: give at least one LoRA file.")
    began = time.monotonic()
    with TensorSource(checkpoint) as source:
        arch = arch_from_checkpoint_keys(source.specs)
        layout = layout_from_keys(source.specs)
        patches: Patches = {}
        layers = {Path(lora.path).name: lora_patches(lora, arch, layout, patches) for lora in loras}
        check_fits(patches, source.specs, ", ".join(layers))
        dtype = PRECISIONS.get(precision)
        specs = {key: TensorSpec(dtype, spec.shape) if dtype and spec.dtype.is_floating_point else spec
                 for key, spec in source.specs.items()}

        def produce(key: str) -> torch.Tensor:
            tensor = source.get(key)
            if key in patches:
                tensor = tensor.to(torch.float32, copy=True)  # ComfyUI patches a float32 copy too
                for target, params, strength in patches[key]:
                    rows = target.rows(tensor.shape[0])
                    apply(tensor[rows] if rows else tensor, params, strength)
            return tensor.to(specs[key].dtype)

        merged = [{"file": Path(lora.path).name, "strength": lora.strength, "strength_clip": lora.strength_clip}
                  for lora in loras]
        metadata = {**source.metadata, "tunekit_merged_loras": json.dumps(merged)}
        guarded_write(destination, lambda: atomic_write(destination, lambda temp: write_streaming(temp, specs, produce, metadata)))
    report = MergeReport(destination, layers, len(patches), time.monotonic() - began)
    log.info("TuneKit: %s", report.summary())
    return report


__all__ = ["LoraToMerge", "MergeReport", "Target", "merge_loras"]
