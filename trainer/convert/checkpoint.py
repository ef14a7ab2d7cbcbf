"""Single-file checkpoints: `.ckpt` -> `.safetensors`, precision, pruning, baking in a VAE; streamed.

Pruning, as the SD training code lays files out: Lightning's optimizer states, callbacks and counters sit
next to `state_dict` and are never needed to run a model; the EMA copy of the UNet lives under
`model_ema.<key after 'model.' with its dots removed>` (ldm's LitEma), so "only EMA" puts those tensors
back under the UNet's own names.
"""

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files import atomic_write
from .errors import ConversionError
from .io import guarded_write, refuse_existing
from .tensor_files import TensorSource, TensorSpec, write_streaming

log = logging.getLogger("tunekit.convert")

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EMA_MODES = ("keep", "drop", "only")
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
_VAE_TOP = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


@dataclass(frozen=True)
class CheckpointOptions:
    precision: str | None = None  # fp32 / fp16 / bf16; None keeps every tensor's dtype
    ema: str = "keep"  # keep / drop / only
    vae: Path | None = None  # a VAE file whose weights replace the checkpoint's

    def check(self) -> None:
        problems = []
        if self.precision not in (None, *PRECISIONS):
            problems.append(f"precision '{self.precision}' is not one of {', '.join(PRECISIONS)}")
        if self.ema not in EMA_MODES:
            problems.append(f"ema '{self.ema}' is not one of {', '.join(EMA_MODES)}")
        if problems:
            raise ConversionError("Invalid conversion settings: " + "; ".join(problems) + ".")


@dataclass
class CheckpointReport:
    destination: Path
    tensors: int
    bytes_in: int
    bytes_out: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def size(count: int) -> str:
            return f"{count / 2**20:.1f} MiB"

        text = (f"Wrote {self.destination.name}: {self.tensors} tensors, {size(self.bytes_in)} -> "
                f"{size(self.bytes_out)} in {self.seconds:.1f} s")
        return text + ("; " + "; ".join(self.notes) if self.notes else "")


# A plan maps each output key to where its tensor comes from (a source and its key) and what it becomes.
Plan = dict[str, tuple[TensorSource, str, TensorSpec]]


def plan_ema(source: TensorSource, mode: str, notes: list[str]) -> Plan:
    ema_keys = [key for key in source.specs if key.startswith(EMA_PREFIX)]
    plan = {key: (source, key, spec) for key, spec in source.specs.items() if not key.startswith(EMA_PREFIX)}
    if mode == "keep" or (mode == "drop" and not ema_keys):
        return {**plan, **{key: (source, key, source.specs[key]) for key in ema_keys}}
    if mode == "drop":
        notes.append(f"dropped {len(ema_keys)} EMA tensors")
        return plan
    if not ema_keys:
        raise ConversionError(f"'{source.path.name}' has no EMA weights ({EMA_PREFIX}*): choose ema 'keep' or 'drop'.")
    missing = []
    for key in [key for key in plan if key.startswith("model.")]:
        ema_key = EMA_PREFIX + key[len("model."):].replace(".", "")
        if ema_key in source.specs:
            plan[key] = (source, ema_key, source.specs[ema_key])
        else:
            missing.append(key)
    if missing:
        raise ConversionError(f"The EMA copy in '{source.path.name}' lacks {len(missing)} UNet weights (e.g. "
                              f"{missing[0]}): it cannot replace the model. Choose ema 'keep' or 'drop'.")
    notes.append(f"UNet replaced by its EMA weights ({len(ema_keys)} EMA tensors)")
    return plan


def plan_vae(plan: Plan, vae: TensorSource, notes: list[str]) -> Plan:
    """Replace every `first_stage_model.*` tensor with the VAE file's (ldm layout, bare or prefixed)."""
    incoming = {}
    for key, spec in vae.specs.items():
        name = key if key.startswith(VAE_PREFIX) else VAE_PREFIX + key if key.startswith(_VAE_TOP) else None
        if name:
            incoming[name] = (vae, key, spec)
    if not incoming or any(".down_blocks." in key or ".up_blocks." in key for key in incoming):
        raise ConversionError(f"'{vae.path.name}' is not a VAE in single-file (ldm) layout: expected encoder./decoder./"
                              "quant_conv. keys. Use a VAE .safetensors made for A1111/ComfyUI.")
    old = [key for key in plan if key.startswith(VAE_PREFIX)]
    mismatched = [key for key in old if key in incoming and incoming[key][2].shape != plan[key][2].shape]
    if mismatched:
        raise ConversionError(f"'{vae.path.name}' does not fit this checkpoint: '{mismatched[0]}' has shape "
                              f"{incoming[mismatched[0]][2].shape}, the checkpoint's {plan[mismatched[0]][2].shape}.")
    notes.append(f"VAE replaced by {vae.path.name} ({len(incoming)} tensors, {len(old)} removed)")
    return {**{key: entry for key, entry in plan.items() if not key.startswith(VAE_PREFIX)}, **incoming}


def with_precision(plan: Plan, precision: str | None, notes: list[str]) -> Plan:
    if precision is None:
        return plan
    dtype = PRECISIONS[precision]
    changed = 0
    out = {}
    for key, (source, source_key, spec) in plan.items():
        if spec.dtype.is_floating_point and spec.dtype != dtype:
            spec, changed = TensorSpec(dtype, spec.shape), changed + 1
        out[key] = (source, source_key, spec)
    notes.append(f"{changed} tensors converted to {precision}")
    return out


def producer(plan: Plan) -> Callable[[str], torch.Tensor]:
    def produce(key: str) -> torch.Tensor:
        source, source_key, spec = plan[key]
        return source.get(source_key).to(spec.dtype)
    return produce


def convert_checkpoint(source_path: Path, destination: Path, options: CheckpointOptions = CheckpointOptions(),
                       overwrite: bool = False) -> CheckpointReport:
    options.check()
    destination = refuse_existing(Path(destination), overwrite)
    if destination.suffix.lower() != ".safetensors":
        raise ConversionError(f"'{destination.name}': TuneKit writes checkpoints only as .safetensors (a pickle can carry code).")
    began, notes = time.monotonic(), []
    with TensorSource(source_path) as source:
        if source.dropped:
            notes.append(f"left out training state: {', '.join(map(str, source.dropped[:6]))}")
        plan = plan_ema(source, options.ema, notes)
        vae = TensorSource(options.vae) if options.vae else None
        try:
            if vae:
                plan = plan_vae(plan, vae, notes)
            plan = with_precision(plan, options.precision, notes)
            metadata = {**source.metadata, "tunekit_conversion": json.dumps(
                {"source": Path(source_path).name, "precision": options.precision, "ema": options.ema,
                 "vae": Path(options.vae).name if options.vae else None})}
            specs = {key: spec for key, (_, _, spec) in plan.items()}
            guarded_write(destination, lambda: atomic_write(
                destination, lambda temp: write_streaming(temp, specs, producer(plan), metadata)))
        finally:
            if vae:
                vae.close()
    report = CheckpointReport(destination, len(specs), Path(source_path).stat().st_size, destination.stat().st_size,
                              time.monotonic() - began, notes)
    log.info("TuneKit: %s", report.summary())
    return report
