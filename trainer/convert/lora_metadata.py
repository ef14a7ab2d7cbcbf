"""LoRA file metadata: what carries over between formats, what is written where missing (FORMATS.md),
and the alphas diffusers keeps in its `lora_adapter_metadata` header entry instead of in tensors."""

import json
import logging
import re
from collections import Counter

import torch

from .arch import Arch, arch_from_metadata
from .lora_keys import LoRA, adapter_kind, module_name, rank
from .unet_names import UNetLayout

log = logging.getLogger("tunekit.convert")

PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
ALPHA_DTYPE_KEY = "tunekit_alpha_dtype"  # lets a diffusers file give kohya alphas back in their own dtype
# Entries that describe one format or one exact byte layout: recomputed or dropped, never carried.
_FORMAT_SPECIFIC = (PEFT_METADATA_KEY, ALPHA_DTYPE_KEY, "format", "sshs_model_hash", "sshs_legacy_hash")
# Entries that say which family a file is for: they follow the family the conversion used.
_FAMILY_KEYS = ("ss_base_model_version", "ss_v2", "modelspec.architecture")


def alpha_value(params: dict[str, torch.Tensor]) -> float | None:
    return float(params["alpha"].item()) if "alpha" in params else None


def peft_adapter_metadata(lora: LoRA, arch: Arch, layout: UNetLayout) -> dict[str, str]:
    """diffusers' per-component LoraConfig (r, lora_alpha and patterns for the exceptions), as it saves it.

    Written only when some layer has an alpha: without one diffusers already uses scale 1 (alpha = rank).
    """
    if not any("alpha" in params for params in lora.values()):
        return {}
    config, dtypes = {}, set()
    for prefix, modules in _by_peft_prefix(lora, arch, layout).items():
        ranks = {name: rank(params) for name, params in modules.items()}
        alphas = {name: float(ranks[name]) if alpha_value(params) is None else alpha_value(params)
                  for name, params in modules.items()}
        dtypes.update(params["alpha"].dtype for params in modules.values() if "alpha" in params)
        common_rank = Counter(ranks.values()).most_common(1)[0][0]
        common_alpha = Counter(alphas.values()).most_common(1)[0][0]
        config.update({
            f"{prefix}.r": common_rank,
            f"{prefix}.lora_alpha": common_alpha,
            f"{prefix}.rank_pattern": {name: value for name, value in ranks.items() if value != common_rank},
            f"{prefix}.alpha_pattern": {name: value for name, value in alphas.items() if value != common_alpha},
            f"{prefix}.target_modules": sorted(modules),
            f"{prefix}.use_dora": False,
        })
    metadata = {PEFT_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    if len(dtypes) == 1:
        metadata[ALPHA_DTYPE_KEY] = str(dtypes.pop()).removeprefix("torch.")
    return metadata


def _by_peft_prefix(lora: LoRA, arch: Arch, layout: UNetLayout) -> dict[str, dict[str, dict]]:
    grouped: dict[str, dict[str, dict]] = {}
    for ref, params in sorted(lora.items()):
        prefix, _, name = module_name(ref, "diffusers", arch, layout).partition(".")
        grouped.setdefault(prefix, {})[name] = params
    return grouped


def peft_alphas(metadata: dict[str, str], module_keys: set[str]) -> tuple[dict[str, float], torch.dtype]:
    """Alphas for diffusers-format modules (`unet.<path>`), read the way PEFT reads its config patterns."""
    raw = metadata.get(PEFT_METADATA_KEY)
    dtype = getattr(torch, metadata.get(ALPHA_DTYPE_KEY, "float32"), torch.float32)
    if not raw:
        return {}, dtype
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        log.warning("Ignoring unreadable %s metadata (%s): every layer gets scale 1.", PEFT_METADATA_KEY, error)
        return {}, dtype
    alphas = {}
    for module_key in module_keys:
        prefix, _, name = module_key.partition(".")
        if f"{prefix}.lora_alpha" not in config:
            continue
        alpha = config[f"{prefix}.lora_alpha"]
        for pattern, value in (config.get(f"{prefix}.alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", name):  # PEFT's own pattern rule
                alpha = value
                break
        alphas[module_key] = float(alpha)
    return alphas, dtype


def converted_metadata(source: dict[str, str], lora: LoRA, arch: Arch, fmt: str, note: dict) -> dict[str, str]:
    """Carry the source's metadata over; fill what other UIs need where missing (A1111 reads
    `ss_base_model_version` to decide where a LoRA shows). Hashes are added when the file is written."""
    metadata = {key: value for key, value in source.items() if key not in _FORMAT_SPECIFIC}
    family = {"ss_base_model_version": arch.base_model_version, "ss_v2": str(arch.v2),
              "modelspec.architecture": f"{arch.modelspec_architecture}/lora"}
    for key in _FAMILY_KEYS:
        if key in metadata and not _same_family(key, metadata[key], family[key]):
            log.warning("Metadata %s said '%s'; the file is converted for %s, so it now says '%s'.",
                        key, metadata[key], arch.title, family[key])
            metadata[key] = family[key]
        metadata.setdefault(key, family[key])
    kinds = Counter(adapter_kind(params) for params in lora.values())
    ranks = Counter(rank(params) for params in lora.values() if rank(params))
    alphas = Counter(alpha_value(params) for params in lora.values() if "alpha" in params)
    lycoris = kinds.keys() - {"lora"}
    metadata.setdefault("ss_network_module", "lycoris.kohya" if lycoris else "networks.lora")
    metadata.setdefault("ss_network_args", json.dumps({"algo": min(lycoris)} if lycoris else {}))
    if ranks:
        dim = ranks.most_common(1)[0][0]
        metadata.setdefault("ss_network_dim", str(dim))
        metadata.setdefault("ss_network_alpha", str(alphas.most_common(1)[0][0] if alphas else float(dim)))
    metadata.setdefault("modelspec.sai_model_spec", "1.0.0")
    metadata["tunekit_conversion"] = json.dumps({**note, "to": fmt})
    if fmt == "diffusers":
        metadata["format"] = "pt"
    return metadata


def _same_family(key: str, old: str, new: str) -> bool:
    if key == "ss_v2":
        return old == new
    said = arch_from_metadata({key: old})
    return said is None or said is arch_from_metadata({key: new})


def module_summary(lora: LoRA) -> dict[str, int]:
    """How many layers of each adapter kind, per component: for reports."""
    counts: Counter = Counter()
    for ref, params in lora.items():
        counts[f"{ref.component}:{adapter_kind(params)}"] += 1
    return dict(sorted(counts.items()))

