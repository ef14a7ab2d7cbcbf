"""LoRA keys in the three formats users meet, to and from one canonical form.

Canonical: `{ModuleRef: {param: tensor}}`. A ModuleRef names a layer by component (`unet`, `te1`, `te2`)
and path: the UNet in ldm naming (what single-file checkpoints and ComfyUI use), text encoders in Hugging
Face CLIP naming (`text_model.encoder.layers.0.self_attn.q_proj`). Params use kohya/ComfyUI names
(`lora_up.weight`, `alpha`, `hada_w1_a`, `lokr_w1`, `diff`, ...), so a file's tensors pass through untouched:
conversion renames keys and never touches values.

Formats (FORMATS.md):
- kohya:     `lora_unet_<name>`, `lora_te_` (SD1/SD2), `lora_te1_`/`lora_te2_` (SDXL); the UNet named the
             diffusers way for SD1/SD2 and the ldm way for SDXL, dots turned into `_`.
- diffusers: PEFT keys `unet.<diffusers path>.lora_A.weight` / `lora_B.weight`, `text_encoder(_2).<path>...`;
             alphas live in the `lora_adapter_metadata` header entry diffusers reads, not in tensors.
- comfy:     what ComfyUI's own trainer and LoRA extractor save: `diffusion_model.<ldm path>.<param>` and
             `text_encoders.<clip_l|clip_h|clip_g>.transformer.<path>.<param>`.
"""

import re
from dataclasses import dataclass

import torch

from .arch import Arch
from .errors import ConversionError
from .kohya_names import from_kohya, to_kohya
from .unet_names import UNetLayout, UNetNameError, diffusers_to_ldm, ldm_to_diffusers

FORMATS = ("kohya", "diffusers", "comfy")

LORA_PARAMS = ("lora_up.weight", "lora_down.weight", "lora_mid.weight")
LOHA_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARAMS = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
OTHER_PARAMS = ("alpha", "dora_scale", "diff", "diff_b")
CANONICAL_PARAMS = LORA_PARAMS + LOHA_PARAMS + LOKR_PARAMS + OTHER_PARAMS

# How other writers spell the LoRA matrices (read only; diffusers' older attention-processor files too).
_ALIASES = {
    ".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
    ".lora.down.weight": "lora_down.weight", ".lora.up.weight": "lora_up.weight",
    "_lora.down.weight": "lora_down.weight", "_lora.up.weight": "lora_up.weight",
    ".lora_linear_layer.down.weight": "lora_down.weight", ".lora_linear_layer.up.weight": "lora_up.weight",
}
_SUFFIXES = sorted([(f".{param}", param) for param in CANONICAL_PARAMS] + list(_ALIASES.items()),
                   key=lambda pair: -len(pair[0]))
_PEFT_PARAMS = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


@dataclass(frozen=True, order=True)
class ModuleRef:
    component: str  # "unet", "te1" or "te2"
    path: str


LoRA = dict[ModuleRef, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class RawKey:
    """A key split before the model family is known: which format, component and naming it uses."""

    key: str
    format: str
    component: str
    naming: str  # UNet: "ldm", "diffusers", "kohya_unet" (underscored, either naming); text encoders: the
    # prefix or ComfyUI CLIP name they came with (lora_te, lora_te1, clip_l, clip_h, ...) or "clip"
    name: str
    param: str


def split_key(key: str) -> RawKey:
    for suffix, param in _SUFFIXES:
        if key.endswith(suffix):
            return _split_module(key, key[: -len(suffix)], param)
    raise ConversionError(
        f"LoRA key '{key}' ends in no parameter TuneKit knows ({', '.join(CANONICAL_PARAMS)}, lora_A/lora_B). "
        "It may be another kind of adapter; convert it with the tool that made it."
    )


_COMFY_TE = re.compile(r"^text_encoders\.(clip_[lgh])\.transformer\.(.+)$")
_KOHYA_TE = re.compile(r"^lora_te([12]?)_(.+)$")
_PEFT_TE = re.compile(r"^text_encoder(_2)?\.(.+)$")
COMFY_CLIP_COMPONENT = {"clip_l": "te1", "clip_h": "te1", "clip_g": "te2"}


def _split_module(key: str, module: str, param: str) -> RawKey:
    for prefix in ("lora_unet_", "lycoris_"):  # lycoris_: SimpleTuner's LyCORIS files, kohya-style names
        if module.startswith(prefix):
            return RawKey(key, "kohya", "unet", "kohya_unet", module[len(prefix):], param)
    if match := _KOHYA_TE.match(module):
        component = "te2" if match.group(1) == "2" else "te1"
        return RawKey(key, "kohya", component, f"lora_te{match.group(1)}", from_kohya(match.group(2)), param)
    if module.startswith("diffusion_model."):
        return RawKey(key, "comfy", "unet", "ldm", module[len("diffusion_model."):], param)
    if match := _COMFY_TE.match(module):
        return RawKey(key, "comfy", COMFY_CLIP_COMPONENT[match.group(1)], match.group(1), match.group(2), param)
    if match := _PEFT_TE.match(module):
        return RawKey(key, "diffusers", "te2" if match.group(1) else "te1", "clip", match.group(2), param)
    unet = module.removeprefix("unet.")
    if unet.split(".")[0] in ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding",
                              "add_embedding", "conv_norm_out"):
        # diffusers' older attention-processor files: `attn1.processor.to_out_lora` is `attn1.to_out.0`
        unet = unet.replace(".processor.", ".")
        unet = unet + ".0" if unet.endswith(".to_out") else unet
        return RawKey(key, "diffusers", "unet", "diffusers", unet, param)
    raise ConversionError(
        f"LoRA key '{key}' is in no format TuneKit knows: expected kohya (lora_unet_/lora_te*_), diffusers/PEFT "
        "(unet./text_encoder./text_encoder_2.) or ComfyUI (diffusion_model./text_encoders.) keys."
    )


def unet_path(raw: RawKey, arch: Arch, layout: UNetLayout) -> str:
    """The ldm path of a UNet key in any naming; kohya names are tried as diffusers, then as ldm names."""
    try:
        if raw.naming == "ldm":
            ldm_to_diffusers(raw.name, layout)  # validates the path
            return raw.name
        if raw.naming == "diffusers":
            return diffusers_to_ldm(raw.name, layout)
        dotted = from_kohya(raw.name)
        try:
            return diffusers_to_ldm(dotted, layout)
        except UNetNameError:
            ldm_to_diffusers(dotted, layout)
            return dotted
    except UNetNameError as error:
        raise ConversionError(
            f"LoRA key '{raw.key}' names no layer of an {arch.title} UNet with {layout.res_blocks} res blocks per "
            f"level ({error}). If the LoRA is for another family, say which; for a custom UNet, pass its checkpoint "
            "so TuneKit reads the layout from it."
        ) from None


# The layers kohya and diffusers put LoRAs on; ComfyUI-format files may also patch norms and embeddings.
_CLIP_LORA_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])$")
_CLIP_OTHER_LAYER = re.compile(r"^text_model\.(encoder\.layers\.(\d+)\.layer_norm[12]|final_layer_norm|"
                               r"embeddings\.(token|position)_embedding)$|^text_projection$")


def text_encoder_path(raw: RawKey, arch: Arch) -> str:
    """Check a text-encoder layer against the family's CLIP."""
    encoder = arch.text_encoder(raw.component)  # fails for a component this family lacks
    match = _CLIP_LORA_LAYER.match(raw.name) or _CLIP_OTHER_LAYER.match(raw.name)
    if not match or int(match.group(2 if match.re is _CLIP_OTHER_LAYER else 1) or 0) >= encoder.layers:
        raise ConversionError(
            f"LoRA key '{raw.key}' names no layer of the {arch.title} text encoder '{encoder.comfy_name}' "
            f"({encoder.layers} layers). Is the LoRA for another model family?"
        )
    return raw.name


def to_canonical(tensors: dict[str, torch.Tensor], arch: Arch, layout: UNetLayout,
                 peft_alphas: dict[str, float] | None = None, alpha_dtype: torch.dtype = torch.float32) -> LoRA:
    """Parse every key; `peft_alphas` maps diffusers-format module keys (`unet.<path>`) to their alpha."""
    lora: LoRA = {}
    for key, tensor in tensors.items():
        raw = split_key(key)
        if raw.component == "unet":
            ref = ModuleRef("unet", unet_path(raw, arch, layout))
        else:
            ref = ModuleRef(raw.component, text_encoder_path(raw, arch))
        params = lora.setdefault(ref, {})
        if raw.param in params:
            raise ConversionError(f"LoRA keys '{key}' and another key both name {raw.param} of {ref.path}: "
                                  "the file mixes two copies of one layer; keep one.")
        params[raw.param] = tensor
    for module_key, alpha in (peft_alphas or {}).items():
        ref = to_canonical_module(module_key, arch, layout)
        if ref in lora and "alpha" not in lora[ref]:
            lora[ref]["alpha"] = torch.tensor(alpha, dtype=alpha_dtype)
    return lora


def to_canonical_module(module_key: str, arch: Arch, layout: UNetLayout) -> ModuleRef:
    raw = split_key(module_key + ".lora_A.weight")
    if raw.component == "unet":
        return ModuleRef("unet", unet_path(raw, arch, layout))
    return ModuleRef(raw.component, text_encoder_path(raw, arch))


def module_name(ref: ModuleRef, fmt: str, arch: Arch, layout: UNetLayout) -> str:
    """The module part of a key in `fmt` (everything before the parameter)."""
    if ref.component == "unet":
        if fmt == "comfy":
            return f"diffusion_model.{ref.path}"
        if fmt == "diffusers":
            return f"unet.{ldm_to_diffusers(ref.path, layout)}"
        name = ldm_to_diffusers(ref.path, layout) if arch.kohya_unet_diffusers_names else ref.path
        return f"lora_unet_{to_kohya(name)}"
    encoder = arch.text_encoder(ref.component)
    if fmt == "comfy":
        return f"text_encoders.{encoder.comfy_name}.transformer.{ref.path}"
    if fmt == "diffusers":
        return f"{encoder.peft_prefix}.{ref.path}"
    return f"{encoder.kohya_prefix}_{to_kohya(ref.path)}"


def from_canonical(lora: LoRA, fmt: str, arch: Arch, layout: UNetLayout) -> dict[str, torch.Tensor]:
    """Keys in `fmt`. diffusers keeps no alpha tensors: take them from `peft_adapter_metadata`."""
    if fmt not in FORMATS:
        raise ConversionError(f"Unknown LoRA format '{fmt}': choose one of {', '.join(FORMATS)}.")
    if fmt == "diffusers":
        refuse_for_diffusers(lora)
    if fmt != "comfy":
        refuse_text_encoder_extras(lora, fmt)
    out = {}
    for ref in sorted(lora):
        module = module_name(ref, fmt, arch, layout)
        for param, tensor in lora[ref].items():
            if fmt == "diffusers":
                if param == "alpha":
                    continue
                param = _PEFT_PARAMS[param]
            out[f"{module}.{param}"] = tensor
    return out


def refuse_for_diffusers(lora: LoRA) -> None:
    """diffusers/PEFT SD LoRA files hold plain LoRA matrices only: say which layers cannot go there."""
    allowed = {"lora_up.weight", "lora_down.weight", "alpha"}
    odd = {(ref, param) for ref, params in lora.items() for param in params if param not in allowed}
    if odd:
        kinds = sorted({_kind(param) for _, param in odd})
        ref, param = min(odd)
        raise ConversionError(
            f"diffusers/PEFT LoRA files can hold only plain LoRA (lora_A/lora_B) layers, but this one has "
            f"{' and '.join(kinds)} layers ({len(odd)} tensors, e.g. '{param}' of {ref.component} {ref.path}). "
            "Convert it to kohya or ComfyUI format instead: both keep them."
        )


def refuse_text_encoder_extras(lora: LoRA, fmt: str) -> None:
    """kohya and diffusers name only CLIP's attention and MLP layers; other UIs would drop the rest unseen."""
    extras = sorted(ref for ref in lora if ref.component != "unet" and not _CLIP_LORA_LAYER.match(ref.path))
    if extras:
        raise ConversionError(
            f"{len(extras)} text-encoder layers of this LoRA (e.g. {extras[0].component} {extras[0].path}) are not "
            f"attention or MLP layers, which {fmt} files cannot name. Convert it to ComfyUI format instead."
        )


def _kind(param: str) -> str:
    if param.startswith("hada_"):
        return "LoHa"
    if param.startswith("lokr_"):
        return "LoKr"
    if param == "dora_scale":
        return "DoRA"
    if param == "lora_mid.weight":
        return "Tucker (lora_mid)"
    return "full-difference (diff)"


def adapter_kind(params: dict[str, torch.Tensor]) -> str:
    """'lora', 'loha', 'lokr' or 'diff': the adapter a module's params make."""
    if "lora_up.weight" in params:
        return "lora"
    if "hada_w1_a" in params:
        return "loha"
    if any(param.startswith("lokr_") for param in params):
        return "lokr"
    if "diff" in params or "diff_b" in params:
        return "diff"
    raise ConversionError(f"A LoRA layer has only {sorted(params)}: its matrices are missing (a truncated export?).")


def rank(params: dict[str, torch.Tensor]) -> int | None:
    """The rank alpha is divided by, as ComfyUI computes it; None when the adapter has none."""
    if "lora_down.weight" in params:
        return params["lora_down.weight"].shape[0]
    if "hada_w1_b" in params:
        return params["hada_w1_b"].shape[0]
    for name in ("lokr_w2_b", "lokr_w1_b"):  # ComfyUI lets w2's factor win when both exist
        if name in params:
            return params[name].shape[0]
    return None
