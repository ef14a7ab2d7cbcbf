"""What a LoRA layer adds to its weight, computed exactly the way ComfyUI applies it at runtime
(comfy/weight_adapter: lora.py, loha.py, lokr.py, base.weight_decompose), so a merged checkpoint and
the base plus the LoRA give the same numbers: float32, scale alpha / rank, `w += (strength * scale) * diff`.
"""

import torch

from .errors import ConversionError
from .lora_keys import adapter_kind, rank

F32 = torch.float32


def _f(params: dict, name: str) -> torch.Tensor:
    return params[name].to(F32)


def _scale(params: dict) -> float:
    if "alpha" not in params or rank(params) is None:
        return 1.0
    return params["alpha"].item() / rank(params)


def _lora_diff(params: dict) -> torch.Tensor:
    up, down = _f(params, "lora_up.weight"), _f(params, "lora_down.weight")
    if "lora_mid.weight" in params:  # Tucker-decomposed conv (LoCon "cp"), as ComfyUI folds it
        mid = _f(params, "lora_mid.weight")
        shape = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
        down = torch.mm(down.transpose(0, 1).flatten(start_dim=1),
                        mid.transpose(0, 1).flatten(start_dim=1)).reshape(shape).transpose(0, 1)
    return torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1))


def _loha_diff(params: dict) -> torch.Tensor:
    if "hada_t1" in params:
        m1 = torch.einsum("i j k l, j r, i p -> p r k l", _f(params, "hada_t1"), _f(params, "hada_w1_b"), _f(params, "hada_w1_a"))
        m2 = torch.einsum("i j k l, j r, i p -> p r k l", _f(params, "hada_t2"), _f(params, "hada_w2_b"), _f(params, "hada_w2_a"))
    else:
        m1 = torch.mm(_f(params, "hada_w1_a"), _f(params, "hada_w1_b"))
        m2 = torch.mm(_f(params, "hada_w2_a"), _f(params, "hada_w2_b"))
    return m1 * m2


def _lokr_diff(params: dict) -> torch.Tensor:
    w1 = _f(params, "lokr_w1") if "lokr_w1" in params else torch.mm(_f(params, "lokr_w1_a"), _f(params, "lokr_w1_b"))
    if "lokr_w2" in params:
        w2 = _f(params, "lokr_w2")
    elif "lokr_t2" in params:
        w2 = torch.einsum("i j k l, j r, i p -> p r k l", _f(params, "lokr_t2"), _f(params, "lokr_w2_b"), _f(params, "lokr_w2_a"))
    else:
        w2 = torch.mm(_f(params, "lokr_w2_a"), _f(params, "lokr_w2_b"))
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return torch.kron(w1, w2)


_DIFFS = {"lora": _lora_diff, "loha": _loha_diff, "lokr": _lokr_diff, "diff": lambda params: _f(params, "diff")}


def unscaled_diff(params: dict) -> torch.Tensor:
    """The layer's weight difference before the alpha / rank scale, in float32 (any shape)."""
    return _DIFFS[adapter_kind(params)](params)


def delta(params: dict, shape: torch.Size) -> torch.Tensor:
    """The full scaled difference ComfyUI adds at strength 1 (no DoRA), in the weight's shape."""
    return _scale(params) * unscaled_diff(params).reshape(shape)


def apply(weight: torch.Tensor, params: dict, strength: float) -> torch.Tensor:
    """Apply one layer's patch to a float32 weight like ComfyUI does (in place where it does)."""
    if "diff" in params:
        weight += (strength * _f(params, "diff")).reshape(weight.shape)  # ComfyUI's "diff" patch
        return weight
    lora_diff = unscaled_diff(params)
    if lora_diff.numel() != weight.numel():
        raise ConversionError(f"a LoRA layer of {lora_diff.numel()} values does not fit a weight of shape {tuple(weight.shape)}")
    lora_diff = lora_diff.reshape(weight.shape)
    alpha = _scale(params)
    if "dora_scale" in params:
        return _weight_decompose(_f(params, "dora_scale"), weight, lora_diff, alpha, strength)
    weight += ((strength * alpha) * lora_diff).type(weight.dtype)
    return weight


def _weight_decompose(dora_scale, weight, lora_diff, alpha, strength):
    """DoRA, as ComfyUI's `weight_decompose` computes it."""
    lora_diff *= alpha
    weight_calc = weight + lora_diff.type(weight.dtype)
    if dora_scale.shape[0] == weight_calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    norm = norm + torch.finfo(weight.dtype).eps
    weight_calc *= (dora_scale / norm).type(weight.dtype)
    if strength != 1.0:
        weight_calc -= weight
        weight += strength * weight_calc
    else:
        weight[:] = weight_calc
    return weight


def diff_numel(params: dict) -> int:
    """How many values the layer's difference has, without computing it (to check a target first)."""
    kind = adapter_kind(params)
    if kind == "diff":
        return params["diff"].numel()
    if kind == "lora":
        down = params["lora_down.weight"]
        inner = down.shape[1] * (params["lora_mid.weight"].shape[2] * params["lora_mid.weight"].shape[3]
                                 if "lora_mid.weight" in params else down[0].numel() // down.shape[1])
        return params["lora_up.weight"].shape[0] * inner
    return unscaled_diff(params).numel()  # LoHa / LoKr: small enough to just compute
