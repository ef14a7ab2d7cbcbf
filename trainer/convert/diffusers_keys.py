"""Single-file checkpoint keys <-> diffusers folder keys, tensor by tensor.

Each output tensor is a `Recipe`: the input keys it reads and how it is made from them (as is, one third
of a fused q/k/v, the three fused, transposed, or a 1x1 conv seen as a linear layer). Every recipe is
exactly invertible, so single file -> folder -> single file gives back every tensor bit for bit. Keys
with no place in diffusers' models (schedule buffers, EMA, SD2's last CLIP layer, logit scales) go to a
sidecar file in the folder and come back from it.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .arch import UNET_PREFIX, TextEncoder
from .unet_names import UNetLayout, UNetNameError, diffusers_to_ldm, ldm_to_diffusers

VAE_PREFIX = "first_stage_model."
SIDECAR = "tunekit_extra"  # folder component holding what diffusers' models have no place for


def _same(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


@dataclass(frozen=True)
class Recipe:
    sources: tuple[str, ...]
    build: Callable[[list[torch.Tensor]], torch.Tensor] = _same


def _third(part: int) -> Callable:
    return lambda tensors: tensors[0][part * (tensors[0].shape[0] // 3):(part + 1) * (tensors[0].shape[0] // 3)]


def _fuse(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


def _transpose(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].t().contiguous()


def _to_linear(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].reshape(tensors[0].shape[0], tensors[0].shape[1])


def _to_conv(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].reshape(*tensors[0].shape, 1, 1)


# ----- UNet -----

def unet_to_diffusers(key: str, layout: UNetLayout) -> str | None:
    module, _, param = key[len(UNET_PREFIX):].rpartition(".")
    try:
        return f"{ldm_to_diffusers(module, layout)}.{param}"
    except UNetNameError:
        return None


def unet_from_diffusers(key: str, layout: UNetLayout) -> str | None:
    module, _, param = key.rpartition(".")
    try:
        return f"{UNET_PREFIX}{diffusers_to_ldm(module, layout)}.{param}"
    except UNetNameError:
        return None


# ----- VAE (ldm `first_stage_model.*` <-> diffusers AutoencoderKL) -----

_VAE_RES = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_TOP = {"norm_out": "conv_norm_out"}


def vae_to_diffusers(key: str, up_levels: int) -> tuple[str, Callable] | None:
    """(diffusers key, how to make its tensor) for an ldm VAE key without the `first_stage_model.` prefix."""
    if match := re.match(r"^(encoder|decoder)\.(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)$", key):
        side, kind, level, block, layer, param = match.groups()
        level = int(level) if kind == "down" else up_levels - 1 - int(level)  # ldm counts decoder levels upward
        return f"{side}.{kind}_blocks.{level}.resnets.{block}.{_VAE_RES.get(layer, layer)}.{param}", _same
    if match := re.match(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)$", key):
        side, kind, level, sampler, param = match.groups()
        level = int(level) if kind == "down" else up_levels - 1 - int(level)
        return f"{side}.{kind}_blocks.{level}.{sampler}rs.0.conv.{param}", _same
    if match := re.match(r"^(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)$", key):
        side, index, layer, param = match.groups()
        return f"{side}.mid_block.resnets.{int(index) - 1}.{_VAE_RES.get(layer, layer)}.{param}", _same
    if match := re.match(r"^(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)$", key):
        side, layer, param = match.groups()
        conv_as_linear = layer != "norm" and param == "weight"
        return f"{side}.mid_block.attentions.0.{_VAE_ATTN[layer]}.{param}", _to_linear if conv_as_linear else _same
    if match := re.match(r"^(encoder|decoder)\.(norm_out|conv_in|conv_out)\.(weight|bias)$", key):
        side, layer, param = match.groups()
        return f"{side}.{_VAE_TOP.get(layer, layer)}.{param}", _same
    if re.match(r"^(post_)?quant_conv\.(weight|bias)$", key):
        return key, _same
    return None


def vae_from_diffusers(key: str, up_levels: int) -> tuple[str, Callable] | None:
    inverse_res = {value: name for name, value in _VAE_RES.items()}
    inverse_attn = {value: name for name, value in _VAE_ATTN.items()}
    if match := re.match(r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)$", key):
        side, kind, level, block, layer, param = match.groups()
        level = int(level) if kind == "down" else up_levels - 1 - int(level)
        return f"{side}.{kind}.{level}.block.{block}.{inverse_res.get(layer, layer)}.{param}", _same
    if match := re.match(r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(downsample|upsample)rs\.0\.conv\.(weight|bias)$", key):
        side, kind, level, sampler, param = match.groups()
        level = int(level) if kind == "down" else up_levels - 1 - int(level)
        return f"{side}.{kind}.{level}.{sampler}.conv.{param}", _same
    if match := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)$", key):
        side, index, layer, param = match.groups()
        return f"{side}.mid.block_{int(index) + 1}.{inverse_res.get(layer, layer)}.{param}", _same
    if match := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", key):
        side, layer, param = match.groups()
        linear_as_conv = layer != "group_norm" and param == "weight"
        return f"{side}.mid.attn_1.{inverse_attn[layer]}.{param}", _to_conv if linear_as_conv else _same
    if match := re.match(r"^(encoder|decoder)\.(conv_norm_out|conv_in|conv_out)\.(weight|bias)$", key):
        side, layer, param = match.groups()
        return f"{side}.{ {'conv_norm_out': 'norm_out'}.get(layer, layer)}.{param}", _same
    if re.match(r"^(post_)?quant_conv\.(weight|bias)$", key):
        return key, _same
    return None


# ----- text encoders -----

_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_QKV = ("q_proj", "k_proj", "v_proj")


def openclip_to_hf(rest: str, diffusers_layers: int) -> list[tuple[str, Recipe]] | None:
    """HF (transformers CLIPTextModel) keys for one OpenCLIP key (without the encoder's prefix); None: no place."""
    if match := re.match(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", rest):
        layer, name, param = int(match.group(1)), match.group(2), match.group(3)
        if layer >= diffusers_layers:
            return None
        base = f"text_model.encoder.layers.{layer}."
        if name == "attn.in_proj":  # `attn.in_proj_weight` splits on the `.`-less name below
            return None
        if name in _OPENCLIP_LAYER:
            return [(f"{base}{_OPENCLIP_LAYER[name]}.{param}", Recipe((rest,)))]
        return None
    if match := re.match(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", rest):
        layer, param = int(match.group(1)), match.group(2)
        if layer >= diffusers_layers:
            return None
        return [(f"text_model.encoder.layers.{layer}.self_attn.{name}.{param}", Recipe((rest,), _third(part)))
                for part, name in enumerate(_QKV)]
    simple = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
              "positional_embedding": "text_model.embeddings.position_embedding.weight",
              "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias"}
    if rest in simple:
        return [(simple[rest], Recipe((rest,)))]
    return None


def hf_to_openclip(key: str) -> tuple[str, Recipe] | None:
    """The OpenCLIP key (without prefix) an HF key comes back to, and how; q/k/v fuse on the q key."""
    inverse = {value: name for name, value in _OPENCLIP_LAYER.items()}
    if match := re.match(r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", key):
        layer, which, param = match.groups()
        if which != "q":
            return None  # k and v travel with q
        names = tuple(f"text_model.encoder.layers.{layer}.self_attn.{name}.{param}" for name in _QKV)
        return f"transformer.resblocks.{layer}.attn.in_proj_{param}", Recipe(names, _fuse)
    if match := re.match(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key):
        layer, name, param = match.groups()
        if name in inverse:
            return f"transformer.resblocks.{layer}.{inverse[name]}.{param}", Recipe((key,))
    simple = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
              "text_model.embeddings.position_embedding.weight": "positional_embedding",
              "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    return (simple[key], Recipe((key,))) if key in simple else None


def text_encoder_keys(encoder: TextEncoder, keys: list[str], diffusers_layers: int, projection: bool) -> dict[str, Recipe]:
    """{key in the diffusers text encoder: recipe over single-file keys} for one encoder."""
    out = {}
    for key in keys:
        rest = key[len(encoder.checkpoint_prefix):]
        if not encoder.openclip:
            if rest.startswith("text_model.") and not rest.endswith("position_ids"):
                out[rest] = Recipe((key,))
            continue
        if rest == "text_projection" and projection:
            out["text_projection.weight"] = Recipe((key,), _transpose)  # OpenCLIP stores it (in, out)
            continue
        for name, recipe in openclip_to_hf(rest, diffusers_layers) or []:
            out[name] = Recipe(tuple(encoder.checkpoint_prefix + source for source in recipe.sources), recipe.build)
    return out
