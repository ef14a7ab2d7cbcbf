"""Convert a LoRA between kohya, diffusers/PEFT and ComfyUI formats: exact (tensors pass through
untouched, alphas kept), with the metadata other UIs need."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.kohya import save_lora
from .arch import Arch
from .errors import ConversionError
from .io import guarded_write, read_tensors, refuse_existing
from .lora_detect import detect_lora_arch
from .lora_keys import FORMATS, LoRA, from_canonical, split_key, to_canonical
from .lora_metadata import converted_metadata, module_summary, peft_adapter_metadata, peft_alphas
from .unet_names import UNetLayout

log = logging.getLogger("tunekit.convert")


@dataclass(frozen=True)
class ParsedLoRA:
    lora: LoRA
    arch: Arch
    layout: UNetLayout
    source_formats: tuple[str, ...]


@dataclass(frozen=True)
class ConvertedLoRA:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    parsed: ParsedLoRA
    target: str

    def summary(self) -> str:
        counts = ", ".join(f"{count} {kind}" for kind, count in module_summary(self.parsed.lora).items())
        return (f"{self.parsed.arch.title} LoRA, {'+'.join(self.parsed.source_formats)} -> {self.target}: "
                f"{len(self.tensors)} tensors ({counts})")


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], family: str | None = None,
               layout: UNetLayout | None = None) -> ParsedLoRA:
    """Any supported format -> canonical. `family` and `layout` override what the file says (a custom UNet)."""
    if not tensors:
        raise ConversionError("This LoRA file holds no tensors: it is empty or was saved before training ran.")
    raws = [split_key(key) for key in tensors]
    arch = detect_lora_arch(raws, {key: tuple(value.shape) for key, value in tensors.items()}, metadata, family)
    layout = layout or arch.layout
    peft_keys = {raw.key.rsplit(".lora_", 1)[0] for raw in raws if raw.format == "diffusers"}
    alphas, alpha_dtype = peft_alphas(metadata, peft_keys)
    lora = to_canonical(tensors, arch, layout, alphas, alpha_dtype)
    return ParsedLoRA(lora, arch, layout, tuple(sorted({raw.format for raw in raws})))


def convert_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], target: str,
                 family: str | None = None, layout: UNetLayout | None = None, source_name: str = "") -> ConvertedLoRA:
    if target not in FORMATS:
        raise ConversionError(f"Unknown LoRA format '{target}': choose one of {', '.join(FORMATS)}.")
    parsed = parse_lora(tensors, metadata, family, layout)
    return render_lora(parsed, target, metadata, source_name)


def render_lora(parsed: ParsedLoRA, target: str, metadata: dict[str, str], source_name: str = "") -> ConvertedLoRA:
    """Canonical -> `target` keys and metadata (also used by merge/extract/resize to write their results)."""
    out = from_canonical(parsed.lora, target, parsed.arch, parsed.layout)
    note = {"from": "+".join(parsed.source_formats), **({"source": source_name} if source_name else {})}
    new_metadata = converted_metadata(metadata, parsed.lora, parsed.arch, target, note)
    if target == "diffusers":
        new_metadata.update(peft_adapter_metadata(parsed.lora, parsed.arch, parsed.layout))
    return ConvertedLoRA(out, new_metadata, parsed, target)


def write_lora(path: Path, converted: ConvertedLoRA, overwrite: bool = False) -> Path:
    path = refuse_existing(Path(path), overwrite)
    guarded_write(path, lambda: save_lora(path, converted.tensors, converted.metadata))
    log.info("TuneKit wrote %s: %s", path, converted.summary())
    return path


def convert_lora_file(source: Path, destination: Path, target: str, family: str | None = None,
                      layout: UNetLayout | None = None, overwrite: bool = False) -> ConvertedLoRA:
    refuse_existing(Path(destination), overwrite)
    tensors, metadata = read_tensors(Path(source))
    converted = convert_lora(tensors, metadata, target, family, layout, Path(source).name)
    write_lora(destination, converted, overwrite)
    return converted
