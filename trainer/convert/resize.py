"""Change a LoRA's rank by SVD of each layer's product, reporting the error it costs."""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConversionError
from .io import read_tensors
from .lora_file import ParsedLoRA, parse_lora, render_lora, write_lora
from .lora_keys import adapter_kind, rank
from .svd import LowRank, pooled_error, refactorize

log = logging.getLogger("tunekit.convert")


@dataclass
class ResizeReport:
    layers: int
    ranks_before: dict[int, int]
    ranks_after: dict[int, int]
    error: float
    worst: tuple[str, float]

    def summary(self) -> str:
        fmt = lambda ranks: ", ".join(f"{r}x{n}" for r, n in sorted(ranks.items()))
        return (f"Resized {self.layers} layers: ranks {fmt(self.ranks_before)} -> {fmt(self.ranks_after)}; relative "
                f"error {self.error:.2e} over all, worst {self.worst[1]:.2e} ({self.worst[0]})")


def _count(values) -> dict[int, int]:
    counts: dict[int, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def resize_lora(parsed: ParsedLoRA, rank_cap: int | None, max_error: float | None,
                dtype: torch.dtype | None = None) -> tuple[ParsedLoRA, ResizeReport]:
    odd = sorted({adapter_kind(params) for params in parsed.lora.values()} - {"lora"})
    tucker = any("lora_mid.weight" in params or "dora_scale" in params for params in parsed.lora.values())
    if odd or tucker:
        raise ConversionError(f"Resizing works on plain LoRA/LoCon layers; this file has {', '.join(odd) or 'Tucker/DoRA'} "
                              "layers. Merge it into a checkpoint and extract a LoRA from that instead.")
    resized, parts, before = {}, {}, []
    for ref, params in parsed.lora.items():
        up, down = params["lora_up.weight"], params["lora_down.weight"]
        scale = params["alpha"].item() / rank(params) if "alpha" in params else 1.0
        part = refactorize(up, down, scale, rank_cap, max_error, dtype or up.dtype)
        before.append(rank(params))
        new = {"lora_up.weight": part.up.reshape(up.shape[0], part.rank, *up.shape[2:]).contiguous(),
               "lora_down.weight": part.down.reshape(part.rank, *down.shape[1:]).contiguous(),
               "alpha": torch.tensor(float(part.rank), dtype=params["alpha"].dtype if "alpha" in params else torch.float32)}
        resized[ref], parts[f"{ref.component}:{ref.path}"] = new, part
    worst = max(parts.items(), key=lambda item: item[1].error)
    report = ResizeReport(len(parts), _count(before), _count(part.rank for part in parts.values()),
                          pooled_error(list(parts.values())), (worst[0], worst[1].error))
    return ParsedLoRA(resized, parsed.arch, parsed.layout, parsed.source_formats), report


def resize_lora_file(source: Path, destination: Path, rank_cap: int | None, max_error: float | None = None,
                     fmt: str | None = None, family: str | None = None, overwrite: bool = False) -> ResizeReport:
    tensors, metadata = read_tensors(Path(source))
    parsed = parse_lora(tensors, metadata, family)
    resized, report = resize_lora(parsed, rank_cap, max_error)
    top = max(report.ranks_after)
    metadata = {**metadata, "ss_network_dim": str(top), "ss_network_alpha": str(float(top)),
                "tunekit_resize": json.dumps({"rank": rank_cap, "max_error": max_error, "error": report.error})}
    target = fmt or (parsed.source_formats[0] if len(parsed.source_formats) == 1 else "kohya")
    write_lora(destination, render_lora(resized, target, metadata, Path(source).name), overwrite)
    log.info("TuneKit: %s", report.summary())
    return report


__all__ = ["LowRank", "ResizeReport", "resize_lora", "resize_lora_file"]
