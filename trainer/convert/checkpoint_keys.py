"""Where a LoRA layer's weight lives in a single-file checkpoint, and back.

The UNet and Hugging-Face-layout text encoders (SD1's, SDXL's CLIP-L) store each layer under its own
name. OpenCLIP-layout encoders (SD2's, SDXL's bigG) fuse q, k and v into one `attn.in_proj_weight`
(rows q, then k, then v) and name the rest differently; ComfyUI splits them when it loads, so a
q_proj LoRA lands on the first third of those rows.
"""

import re
from dataclasses import dataclass

from .arch import UNET_PREFIX, Arch, TextEncoder
from .errors import ConversionError
from .lora_keys import ModuleRef

_OPENCLIP = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "layer_norm1": "ln_1", "layer_norm2": "ln_2"}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Target:
    key: str  # the checkpoint tensor
    part: int | None = None  # which third of a fused q/k/v tensor is this layer

    def rows(self, rows_in_tensor: int) -> slice | None:
        if self.part is None:
            return None
        third = rows_in_tensor // 3
        return slice(self.part * third, (self.part + 1) * third)


def weight_target(ref: ModuleRef, arch: Arch, bias: bool = False) -> Target:
    suffix = "bias" if bias else "weight"
    if ref.component == "unet":
        return Target(f"{UNET_PREFIX}{ref.path}.{suffix}")
    encoder = arch.text_encoder(ref.component)
    if not encoder.openclip:
        return Target(f"{encoder.checkpoint_prefix}{ref.path}.{suffix}")
    match = _LAYER.match(ref.path)
    if match and match.group(2) in _QKV:
        part = _QKV.index(match.group(2))
        return Target(f"{encoder.checkpoint_prefix}transformer.resblocks.{match.group(1)}.attn.in_proj_{suffix}", part)
    if match and match.group(2) in _OPENCLIP:
        return Target(f"{encoder.checkpoint_prefix}transformer.resblocks.{match.group(1)}.{_OPENCLIP[match.group(2)]}.{suffix}")
    if ref.path == "text_model.final_layer_norm":
        return Target(f"{encoder.checkpoint_prefix}ln_final.{suffix}")
    raise ConversionError(f"TuneKit cannot place a LoRA on {encoder.comfy_name} layer '{ref.path}' in a single-file "
                          "checkpoint (OpenCLIP layout). Merge without it, or apply it at runtime with LoraLoader.")


def lora_layers(key: str, arch: Arch, conv: bool, ndim: int) -> list[tuple[ModuleRef, Target]]:
    """The LoRA-able layers a checkpoint weight holds (an OpenCLIP in_proj holds three), or none.

    UNet: every linear layer, and conv layers when `conv`; text encoders: attention and MLP layers,
    the ones kohya and diffusers name.
    """
    if not key.endswith(".weight") and not key.endswith(".in_proj_weight"):
        return []
    if key.startswith(UNET_PREFIX):
        if ndim == 2 or (conv and ndim == 4):
            return [(ModuleRef("unet", key[len(UNET_PREFIX):-len(".weight")]), Target(key))]
        return []
    for encoder in arch.text_encoders:
        if key.startswith(encoder.checkpoint_prefix) and ndim == 2:
            return _encoder_layers(key, encoder)
    return []


def _encoder_layers(key: str, encoder: TextEncoder) -> list[tuple[ModuleRef, Target]]:
    rest = key[len(encoder.checkpoint_prefix):]
    if not encoder.openclip:
        match = _LAYER.match(rest.removesuffix(".weight"))
        ok = match and match.group(2) in (*_QKV, "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
        return [(ModuleRef(encoder.component, rest.removesuffix(".weight")), Target(key))] if ok else []
    match = re.match(r"^transformer\.resblocks\.(\d+)\.(.+)$", rest)
    if not match:
        return []
    layer, name = match.group(1), match.group(2)
    path = f"text_model.encoder.layers.{layer}."
    if name == "attn.in_proj_weight":
        return [(ModuleRef(encoder.component, path + qkv), Target(key, part)) for part, qkv in enumerate(_QKV)]
    for hf, openclip in _OPENCLIP.items():
        if name == f"{openclip}.weight" and hf.startswith(("self_attn", "mlp")):
            return [(ModuleRef(encoder.component, path + hf), Target(key))]
    return []
