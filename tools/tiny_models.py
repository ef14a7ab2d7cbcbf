#!/usr/bin/env python3
"""Tiny random-weight single-file Stable Diffusion checkpoints for TuneKit's tests.

ComfyUI's ``CheckpointLoaderSimple`` loads every file written here and detects the intended family
(``comfy.supported_models.SD15`` / ``SDXL`` / ``SD20``), with no missing or unexpected key:

* ``make_sd15(path)``: a one-level SD1.5 UNet (320 channels, context 768, conv ``proj_in``) with one
  transformer in the input, middle and output blocks, the full CLIP-L text encoder and a VAE.
* ``make_sdxl(path)``: an SDXL UNet with the exact depths ComfyUI detects SDXL by ([0,0,2,2,10,10], all
  levels at 320 channels), full CLIP-L and OpenCLIP bigG text encoders and a VAE.
* ``make_sd2(path)``: an SD2.x UNet (context 1024, linear ``proj_in``, 64-channel heads) with the full
  OpenCLIP-H text encoder and a VAE (loads as epsilon prediction).
* ``make_demo_dataset(folder)``: small learnable synthetic images with trigger-word captions.

Key layouts are written from the shapes in this file (no ComfyUI needed to make a file);
``compare_with_comfy()`` / ``--check`` builds ComfyUI's own modules on the ``meta`` device and
compares the layouts, so a new ComfyUI release that adds or renames a key is caught.

VAE choice: ``vae="taesd"`` (default) stores TAESD keys (``first_stage_model.taesd_encoder.*``,
``taesd_decoder.*``, ``vae_scale``, ``vae_shift``; 2.4 M params) that ComfyUI accepts inside a checkpoint:
VAEEncode/VAEDecode work, latents have 4 channels at 1/8 resolution. ``vae="kl"`` stores the full
84 M-parameter KL autoencoder in the standard ``first_stage_model.encoder/decoder/quant_conv`` layout
(what converters to diffusers expect), in fp16 by default.

Values: every tensor is random (seeded per key, so a key's values do not depend on the other keys):
weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), norm scales 1 + N(0, 0.02^2), embeddings N(0, 0.02^2);
nothing is zero-initialised. Files are byte-identical for a seed (same torch version).

CLI::

    python tools/tiny_models.py {sd15,sdxl,sd2} OUT.safetensors [--seed N] [--vae taesd|kl]
        [--te-dtype fp8|fp16|fp32] [--unet-dtype fp32|fp16] [--check] [--comfy-dir DIR]
    python tools/tiny_models.py dataset FOLDER [--n 8] [--seed 0]
    python tools/tiny_models.py layout {sd15,sdxl,sd2}     # list the UNet attention modules
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import sys
import time
from collections import OrderedDict
from pathlib import Path

FAMILIES = ("sd15", "sdxl", "sd2")
GENERATOR_VERSION = "1"

# ---------------------------------------------------------------------------------------------
# UNet layouts. transformer_depth: one entry per input res block (ComfyUI's detection order);
# transformer_depth_output: ComfyUI's order too, i.e. entry 0 belongs to the LAST output block.
# ---------------------------------------------------------------------------------------------
UNET_LAYOUTS = {
    "sd15": dict(model_channels=320, channel_mult=[1], num_res_blocks=[1], transformer_depth=[1],
                 transformer_depth_middle=1, transformer_depth_output=[1, 1], context_dim=768,
                 use_linear_in_transformer=False, adm_in_channels=None, num_heads=8, num_head_channels=-1),
    "sd2": dict(model_channels=320, channel_mult=[1], num_res_blocks=[1], transformer_depth=[1],
                transformer_depth_middle=1, transformer_depth_output=[1, 1], context_dim=1024,
                use_linear_in_transformer=True, adm_in_channels=None, num_heads=-1, num_head_channels=64),
    # SDXL is detected by the exact input depths [0,0,2,2,10,10] (2 res blocks x 3 levels) and
    # adm_in_channels 2816; the middle and output depths are free: 1 each where real SDXL has attention.
    "sdxl": dict(model_channels=320, channel_mult=[1, 1, 1], num_res_blocks=[2, 2, 2],
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=1,
                 transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1], context_dim=2048,
                 use_linear_in_transformer=True, adm_in_channels=2816, num_heads=-1, num_head_channels=64),
}

EXPECTED_COMFY_CLASS = {"sd15": "SD15", "sdxl": "SDXL", "sd2": "SD20"}

CLIP_L = dict(width=768, layers=12, heads=12, mlp=3072, vocab=49408, positions=77)
CLIP_H = dict(width=1024, layers=24, heads=16, mlp=4096, vocab=49408, positions=77)
CLIP_G = dict(width=1280, layers=32, heads=20, mlp=5120, vocab=49408, positions=77)

# What ComfyUI's own TAESD loader uses for SD1/SD2 and SDXL latents.
TAESD_SCALE = {"sd15": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp8": "float8_e4m3fn"}

# ---------------------------------------------------------------------------------------------
# Layout: key -> (shape, kind). kind in {"w" (weight, fan_in from shape), "b" (bias), "n" (norm
# scale), "e" (embedding), "s:<value>" (scalar around a value)}. Pure Python, no torch needed.
# ---------------------------------------------------------------------------------------------


class _Layout:
    def __init__(self):
        self.items: "OrderedDict[str, tuple]" = OrderedDict()
        self.groups: dict = {}

    def add(self, key, shape, kind, group):
        if key in self.items:
            raise KeyError(f"duplicate key {key}")
        self.items[key] = (tuple(shape), kind)
        self.groups[key] = group

    def linear(self, p, cin, cout, group, bias=True):
        self.add(p + "weight", (cout, cin), "w", group)
        if bias:
            self.add(p + "bias", (cout,), "b", group)

    def conv(self, p, cin, cout, k, group, bias=True):
        self.add(p + "weight", (cout, cin, k, k), "w", group)
        if bias:
            self.add(p + "bias", (cout,), "b", group)

    def norm(self, p, ch, group):
        self.add(p + "weight", (ch,), "n", group)
        self.add(p + "bias", (ch,), "b", group)


def _unet_resblock(L, p, cin, cout, emb, g="unet"):
    L.norm(p + "in_layers.0.", cin, g)
    L.conv(p + "in_layers.2.", cin, cout, 3, g)
    L.linear(p + "emb_layers.1.", emb, cout, g)
    L.norm(p + "out_layers.0.", cout, g)
    L.conv(p + "out_layers.3.", cout, cout, 3, g)
    if cin != cout:
        L.conv(p + "skip_connection.", cin, cout, 1, g)


def _unet_transformer(L, p, ch, depth, ctx, linear, g="unet"):
    L.norm(p + "norm.", ch, g)
    (L.linear if linear else (lambda q, a, b, gg: L.conv(q, a, b, 1, gg)))(p + "proj_in.", ch, ch, g)
    for d in range(depth):
        b = f"{p}transformer_blocks.{d}."
        for a, kv in (("attn1", ch), ("attn2", ctx)):
            L.linear(f"{b}{a}.to_q.", ch, ch, g, bias=False)
            L.linear(f"{b}{a}.to_k.", kv, ch, g, bias=False)
            L.linear(f"{b}{a}.to_v.", kv, ch, g, bias=False)
            L.linear(f"{b}{a}.to_out.0.", ch, ch, g)
        L.linear(b + "ff.net.0.proj.", ch, ch * 8, g)  # GEGLU: 2 x (4 x ch)
        L.linear(b + "ff.net.2.", ch * 4, ch, g)
        for n in ("norm1.", "norm2.", "norm3."):
            L.norm(b + n, ch, g)
    (L.linear if linear else (lambda q, a, b, gg: L.conv(q, a, b, 1, gg)))(p + "proj_out.", ch, ch, g)


def _unet(L, cfg, prefix="model.diffusion_model."):
    """The ldm/sgm openaimodel.UNetModel layout ComfyUI loads (no temporal layers)."""
    p = prefix
    mc = cfg["model_channels"]
    emb = mc * 4
    ctx = cfg["context_dim"]
    lin = cfg["use_linear_in_transformer"]
    tdepth = list(cfg["transformer_depth"])
    tdepth_out = list(cfg["transformer_depth_output"])
    L.linear(p + "time_embed.0.", mc, emb, "unet")
    L.linear(p + "time_embed.2.", emb, emb, "unet")
    if cfg["adm_in_channels"]:
        L.linear(p + "label_emb.0.0.", cfg["adm_in_channels"], emb, "unet")
        L.linear(p + "label_emb.0.2.", emb, emb, "unet")
    L.conv(p + "input_blocks.0.0.", 4, mc, 3, "unet")
    chans = [mc]
    ch = mc
    n = 1
    levels = len(cfg["channel_mult"])
    for level, mult in enumerate(cfg["channel_mult"]):
        for _ in range(cfg["num_res_blocks"][level]):
            _unet_resblock(L, f"{p}input_blocks.{n}.0.", ch, mult * mc, emb)
            ch = mult * mc
            depth = tdepth.pop(0)
            if depth:
                _unet_transformer(L, f"{p}input_blocks.{n}.1.", ch, depth, ctx, lin)
            chans.append(ch)
            n += 1
        if level != levels - 1:
            L.conv(f"{p}input_blocks.{n}.0.op.", ch, ch, 3, "unet")
            chans.append(ch)
            n += 1
    _unet_resblock(L, p + "middle_block.0.", ch, ch, emb)
    if cfg["transformer_depth_middle"] >= 0:
        _unet_transformer(L, p + "middle_block.1.", ch, cfg["transformer_depth_middle"], ctx, lin)
        _unet_resblock(L, p + "middle_block.2.", ch, ch, emb)
    n = 0
    for level, mult in list(enumerate(cfg["channel_mult"]))[::-1]:
        for i in range(cfg["num_res_blocks"][level] + 1):
            ich = chans.pop()
            _unet_resblock(L, f"{p}output_blocks.{n}.0.", ch + ich, mc * mult, emb)
            ch = mc * mult
            j = 1
            depth = tdepth_out.pop()
            if depth:
                _unet_transformer(L, f"{p}output_blocks.{n}.1.", ch, depth, ctx, lin)
                j = 2
            if level and i == cfg["num_res_blocks"][level]:
                L.conv(f"{p}output_blocks.{n}.{j}.conv.", ch, ch, 3, "unet")
            n += 1
    L.norm(p + "out.0.", ch, "unet")
    L.conv(p + "out.2.", ch, 4, 3, "unet")


def _clip_hf(L, p, c, g):
    """HF CLIPTextModel layout (``text_model.*``), as SD1 and SDXL's CLIP-L store it."""
    w = c["width"]
    L.add(p + "text_model.embeddings.token_embedding.weight", (c["vocab"], w), "e", g)
    L.add(p + "text_model.embeddings.position_embedding.weight", (c["positions"], w), "e", g)
    for i in range(c["layers"]):
        b = f"{p}text_model.encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            L.linear(f"{b}self_attn.{n}.", w, w, g)
        L.norm(b + "layer_norm1.", w, g)
        L.norm(b + "layer_norm2.", w, g)
        L.linear(b + "mlp.fc1.", w, c["mlp"], g)
        L.linear(b + "mlp.fc2.", c["mlp"], w, g)
    L.norm(p + "text_model.final_layer_norm.", w, g)


def _clip_openclip(L, p, c, g):
    """OpenCLIP text tower layout, as SD2 (ViT-H) and SDXL (bigG) checkpoints store it."""
    w = c["width"]
    L.add(p + "token_embedding.weight", (c["vocab"], w), "e", g)
    L.add(p + "positional_embedding", (c["positions"], w), "e", g)
    for i in range(c["layers"]):
        b = f"{p}transformer.resblocks.{i}."
        L.norm(b + "ln_1.", w, g)
        L.add(b + "attn.in_proj_weight", (3 * w, w), "w", g)
        L.add(b + "attn.in_proj_bias", (3 * w,), "b", g)
        L.linear(b + "attn.out_proj.", w, w, g)
        L.norm(b + "ln_2.", w, g)
        L.linear(b + "mlp.c_fc.", w, c["mlp"], g)
        L.linear(b + "mlp.c_proj.", c["mlp"], w, g)
    L.norm(p + "ln_final.", w, g)
    L.add(p + "text_projection", (w, w), "w", g)  # stored (in, out): ComfyUI transposes it
    L.add(p + "logit_scale", (), "s:4.6052", g)


def _taesd(L, p, family, g="vae"):
    def block(q):
        for k in (0, 2, 4):
            L.conv(f"{q}conv.{k}.", 64, 64, 3, g)

    e = p + "taesd_encoder."
    L.conv(e + "0.", 3, 64, 3, g)
    block(e + "1.")
    for s in (2, 6, 10):
        L.conv(f"{e}{s}.", 64, 64, 3, g, bias=False)  # stride-2 convs
        for k in range(s + 1, s + 4):
            block(f"{e}{k}.")
    L.conv(e + "14.", 64, 4, 3, g)
    d = p + "taesd_decoder."
    L.conv(d + "1.", 4, 64, 3, g)
    for s in (3, 8, 13):
        for k in range(s, s + 3):
            block(f"{d}{k}.")
        L.conv(f"{d}{s + 4}.", 64, 64, 3, g, bias=False)  # after each Upsample
    block(d + "18.")
    L.conv(d + "19.", 64, 3, 3, g)
    L.add(p + "vae_scale", (), f"c:{TAESD_SCALE[family]}", g)
    L.add(p + "vae_shift", (), "c:0.0", g)


def _kl_vae(L, p, g="vae"):
    """The SD1/SD2/SDXL AutoencoderKL (ch 128, ch_mult 1,2,4,4, 2 res blocks, z 4) in ldm layout."""
    ch, mult, nres = 128, (1, 2, 4, 4), 2

    def res(q, cin, cout):
        L.norm(q + "norm1.", cin, g)
        L.conv(q + "conv1.", cin, cout, 3, g)
        L.norm(q + "norm2.", cout, g)
        L.conv(q + "conv2.", cout, cout, 3, g)
        if cin != cout:
            L.conv(q + "nin_shortcut.", cin, cout, 1, g)

    def mid(q, c):
        res(q + "mid.block_1.", c, c)
        L.norm(q + "mid.attn_1.norm.", c, g)
        for n in ("q", "k", "v", "proj_out"):
            L.conv(f"{q}mid.attn_1.{n}.", c, c, 1, g)
        res(q + "mid.block_2.", c, c)

    e = p + "encoder."
    L.conv(e + "conv_in.", 3, ch, 3, g)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(nres):
            res(f"{e}down.{i}.block.{j}.", cin, ch * m)
            cin = ch * m
        if i != len(mult) - 1:
            L.conv(f"{e}down.{i}.downsample.conv.", cin, cin, 3, g)
    mid(e, cin)
    L.norm(e + "norm_out.", cin, g)
    L.conv(e + "conv_out.", cin, 8, 3, g)
    d = p + "decoder."
    cin = ch * mult[-1]
    L.conv(d + "conv_in.", 4, cin, 3, g)
    mid(d, cin)
    for i in reversed(range(len(mult))):
        for j in range(nres + 1):
            res(f"{d}up.{i}.block.{j}.", cin, ch * mult[i])
            cin = ch * mult[i]
        if i != 0:
            L.conv(f"{d}up.{i}.upsample.conv.", cin, cin, 3, g)
    L.norm(d + "norm_out.", cin, g)
    L.conv(d + "conv_out.", cin, 3, 3, g)
    L.conv(p + "quant_conv.", 8, 8, 1, g)
    L.conv(p + "post_quant_conv.", 4, 4, 1, g)


def layout(family: str, vae: str = "taesd") -> "_Layout":
    """Every key of a ``family`` checkpoint with its shape, without making any tensor."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if vae not in ("taesd", "kl"):
        raise ValueError(f"unknown vae {vae!r}; expected 'taesd' or 'kl'")
    L = _Layout()
    _unet(L, UNET_LAYOUTS[family])
    if family == "sd15":
        _clip_hf(L, "cond_stage_model.transformer.", CLIP_L, "te")
    elif family == "sd2":
        _clip_openclip(L, "cond_stage_model.model.", CLIP_H, "te")
    else:
        _clip_hf(L, "conditioner.embedders.0.transformer.", CLIP_L, "te")
        _clip_openclip(L, "conditioner.embedders.1.model.", CLIP_G, "te")
    if vae == "taesd":
        _taesd(L, "first_stage_model.", family)
    else:
        _kl_vae(L, "first_stage_model.")
    return L


def attention_modules(family: str, which: str = "to_q") -> list:
    """UNet module paths (ComfyUI/ldm naming, without ``model.diffusion_model.``) of every
    ``attn1``/``attn2`` ``which`` projection (to_q, to_k, to_v or to_out.0) in a ``family`` fixture."""
    out = []
    pre = "model.diffusion_model."
    for k in layout(family).items:
        if k.startswith(pre) and k.endswith(f".{which}.weight") and ".attn" in k:
            out.append(k[len(pre):-len(".weight")])
    return out


def param_counts(family: str, vae: str = "taesd") -> dict:
    L = layout(family, vae)
    counts = {"unet": 0, "te": 0, "vae": 0}
    for k, (shape, _) in L.items.items():
        counts[L.groups[k]] += math.prod(shape)
    counts["total"] = sum(counts.values())
    return counts


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------


def _key_seed(seed: int, key: str) -> int:
    h = hashlib.sha256(f"tunekit-tiny:{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _tensor(torch, key, shape, kind, seed, dtype):
    if kind.startswith("c:"):  # a fixed constant (TAESD latent scale/shift)
        return torch.tensor(float(kind[2:]), dtype=dtype)
    g = torch.Generator().manual_seed(_key_seed(seed, key))
    gen_dtype = torch.float32 if dtype in (torch.float32, torch.float64) else torch.bfloat16
    if dtype == torch.float16:
        gen_dtype = torch.float16
    if kind.startswith("s:"):
        return (float(kind[2:]) + 0.02 * torch.randn((), generator=g)).to(dtype)
    x = torch.randn(shape, generator=g, dtype=gen_dtype)
    if kind == "w":
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        x.mul_(1.0 / math.sqrt(fan_in))
    elif kind == "n":
        x.mul_(0.02).add_(1.0)
    else:  # "b", "e"
        x.mul_(0.02)
    return x.to(dtype)


def _torch_dtype(torch, name):
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return getattr(torch, _DTYPES[name])


def make_state_dict(family: str, seed: int = 0, vae: str = "taesd", te_dtype: str = "fp8",
                    unet_dtype: str = "fp32", vae_dtype: str | None = None,
                    parts=("unet", "te", "vae")) -> dict:
    """The tensors of a tiny ``family`` checkpoint (see the module docstring), keyed as in the file.
    ``parts`` picks a subset of "unet", "te", "vae" (values are seeded per key: the same as in the
    whole file), e.g. ``parts=("unet",)`` for a UNet without the 0.1-0.8 B text-encoder parameters."""
    import torch

    unknown = set(parts) - {"unet", "te", "vae"}
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; expected 'unet', 'te', 'vae'")
    L = layout(family, vae)
    te_2d = _torch_dtype(torch, te_dtype)
    te_1d = torch.float32 if te_dtype == "fp32" else torch.float16
    unet_t = _torch_dtype(torch, unet_dtype)
    vae_t = _torch_dtype(torch, vae_dtype or ("fp16" if vae == "kl" else "fp32"))
    sd = {}
    for key, (shape, kind) in L.items.items():
        group = L.groups[key]
        if group not in parts:
            continue
        if group == "unet":
            dt = unet_t
        elif group == "vae":
            dt = vae_t
        else:
            dt = te_2d if len(shape) >= 2 else te_1d
        sd[key] = _tensor(torch, key, shape, kind, seed, dt)
    return sd


def _sort_header_metadata(path):
    """safetensors writes ``__metadata__`` in hash-map order, which changes from run to run: rewrite
    the header in place with the metadata sorted, so a seed gives a byte-identical file."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw, object_pairs_hook=OrderedDict)
        if "__metadata__" not in header:
            return
        header["__metadata__"] = OrderedDict(sorted(header["__metadata__"].items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        new += b" " * (n - len(new))
        if len(new) != n or json.loads(new) != json.loads(raw):
            raise RuntimeError(f"cannot normalise the safetensors header of {path}")
        f.seek(8)
        f.write(new)


def _save(family, path, seed, vae, te_dtype, unet_dtype, vae_dtype):
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    sd = make_state_dict(family, seed, vae, te_dtype, unet_dtype, vae_dtype)
    meta = {
        "format": "pt",
        "tunekit.tiny_model": family,
        "tunekit.tiny_model.seed": str(seed),
        "tunekit.tiny_model.vae": vae,
        "tunekit.tiny_model.generator": GENERATOR_VERSION,
        "tunekit.tiny_model.unet": json.dumps(UNET_LAYOUTS[family], sort_keys=True),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    _sort_header_metadata(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates the file 0600
    os.replace(tmp, path)
    return {"path": str(path), "bytes": path.stat().st_size, "seconds": time.perf_counter() - t0,
            "tensors": len(sd), "params": param_counts(family, vae)}


def make_sd15(path, seed: int = 0, vae: str = "taesd", te_dtype: str = "fp8", unet_dtype: str = "fp32",
              vae_dtype: str | None = None) -> dict:
    """Write a tiny SD1.5 checkpoint; returns {path, bytes, seconds, tensors, params}."""
    return _save("sd15", path, seed, vae, te_dtype, unet_dtype, vae_dtype)


def make_sdxl(path, seed: int = 0, vae: str = "taesd", te_dtype: str = "fp8", unet_dtype: str = "fp32",
              vae_dtype: str | None = None) -> dict:
    """Write a tiny SDXL checkpoint (the text encoders alone are 817 M params)."""
    return _save("sdxl", path, seed, vae, te_dtype, unet_dtype, vae_dtype)


def make_sd2(path, seed: int = 0, vae: str = "taesd", te_dtype: str = "fp8", unet_dtype: str = "fp32",
             vae_dtype: str | None = None) -> dict:
    """Write a tiny SD2.x checkpoint (OpenCLIP-H under ``cond_stage_model.model.``, epsilon)."""
    return _save("sd2", path, seed, vae, te_dtype, unet_dtype, vae_dtype)


MAKERS = {"sd15": make_sd15, "sdxl": make_sdxl, "sd2": make_sd2}

# ---------------------------------------------------------------------------------------------
# Cross-check against ComfyUI's own modules (meta device: no memory, ~seconds)
# ---------------------------------------------------------------------------------------------


def _torchvision_stand_in():
    """ComfyUI imports torchvision at module level (Stable Cascade / Cosmos code only). Where it does not
    import (PyPI's build beside a CPU torch), register empty stand-ins, as the test hosts' stubs do."""
    import importlib
    import types

    try:
        importlib.import_module("torchvision")
        importlib.import_module("torchvision.transforms")
    except Exception:  # noqa: BLE001  (ImportError, or RuntimeError from a broken binary build)
        import importlib.machinery

        for name in ("torchvision", "torchvision.transforms", "torchvision.models"):
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            module.__path__ = []
            sys.modules[name] = module
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision"].models = sys.modules["torchvision.models"]


def import_comfy(comfy_dir: str | None = None):
    """Put ComfyUI on sys.path (``comfy_dir`` or $COMFYUI_DIR), force CPU, return the comfy package."""
    comfy_dir = comfy_dir or os.environ.get("COMFYUI_DIR")
    if "comfy" not in sys.modules:
        if not comfy_dir:
            raise RuntimeError("ComfyUI not found: pass comfy_dir / --comfy-dir or set COMFYUI_DIR")
        comfy_dir = str(Path(comfy_dir).resolve())
        if comfy_dir not in sys.path:
            sys.path.insert(0, comfy_dir)
    _torchvision_stand_in()
    import comfy.cli_args  # noqa: E402  (argument parsing is off unless ComfyUI's main enabled it)

    comfy.cli_args.args.cpu = True
    import comfy.model_detection  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.supported_models  # noqa: F401

    return sys.modules["comfy"]


def compare_with_comfy(family: str, vae: str = "taesd", comfy_dir: str | None = None) -> dict:
    """Detect ``family``'s layout with ComfyUI, build ComfyUI's UNet, text encoder and VAE on the meta
    device and compare: returns {model_class, unet_config, missing, unexpected, shape_mismatch}, each
    key list in ComfyUI's own (post-conversion) naming. Empty lists mean a clean load."""
    import torch

    comfy = import_comfy(comfy_dir)
    L = layout(family, vae)
    sd = {k: torch.empty(s, device="meta") for k, (s, _) in L.items.items()}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    unet_config = comfy.model_detection.detect_unet_config(sd, prefix)
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    res = {"model_class": type(model_config).__name__ if model_config else None, "unet_config": unet_config,
           "missing": [], "unexpected": [], "shape_mismatch": []}
    if model_config is None:
        return res

    def diff(name, have: dict, module, ignore_missing=()):
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        for k in want:
            if k not in have and not any(i in k for i in ignore_missing):
                res["missing"].append(f"{name}:{k}")
        for k, s in have.items():
            if k not in want:
                res["unexpected"].append(f"{name}:{k}")
            elif tuple(s) != want[k]:
                res["shape_mismatch"].append(f"{name}:{k} {tuple(s)} != {want[k]}")

    model_config.set_inference_dtype(torch.float32, None)
    unet_sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    unet_sd = model_config.process_unet_state_dict(unet_sd)
    base = model_config.get_model(dict(sd), prefix, device="meta")
    diff("unet", {k: v.shape for k, v in unet_sd.items()}, base.diffusion_model)

    target = model_config.clip_target(state_dict=sd)
    clip_sd = model_config.process_clip_state_dict(dict(sd))
    with torch.device("meta"):
        te = target.clip(device="meta", dtype=torch.float16, model_options={})
    # ComfyUI itself only logs these two at debug level when absent (SD1 files cannot carry them).
    diff("clip", {k: v.shape for k, v in clip_sd.items()}, te,
         ignore_missing=(".logit_scale", ".transformer.text_projection.weight") if family == "sd15" else
         ("clip_l.logit_scale", "clip_l.transformer.text_projection.weight"))

    vae_sd = comfy.utils.state_dict_prefix_replace(dict(sd), {k: "" for k in model_config.vae_key_prefix},
                                                   filter_keys=True)
    vae_sd = model_config.process_vae_state_dict(vae_sd)
    with torch.device("meta"):
        if vae == "taesd":
            vae_model = comfy.taesd.taesd.TAESD(latent_channels=4)
        else:
            from comfy.ldm.models.autoencoder import AutoencoderKL

            ddconfig = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3,
                        'ch': 128, 'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [],
                        'dropout': 0.0}
            vae_model = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    diff("vae", {k: v.shape for k, v in vae_sd.items()}, vae_model)
    return res


# ---------------------------------------------------------------------------------------------
# A small learnable synthetic dataset
# ---------------------------------------------------------------------------------------------

_COLOURS = {"red": (220, 30, 30), "green": (30, 190, 60), "blue": (40, 70, 220), "orange": (240, 140, 20),
            "purple": (150, 40, 200)}


def make_demo_dataset(folder, n: int = 8, seed: int = 0, size: int = 64, trigger: str = "tkdemo",
                      colour: str = "red", pattern: str = "checker") -> list:
    """Write ``n`` ``size``x``size`` PNGs of one saturated ``colour`` in a simple ``pattern``
    ("checker", "stripes" or "rings") on a near-white ground, with small per-image jitter (shift,
    brightness, noise), plus ``.txt`` captions "<trigger>, a <colour> <pattern> pattern". Deterministic
    for the arguments. Returns the written paths (image, caption, image, caption, ...)."""
    import numpy as np
    from PIL import Image

    if colour not in _COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {sorted(_COLOURS)}")
    if pattern not in ("checker", "stripes", "rings"):
        raise ValueError(f"unknown pattern {pattern!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fg = np.array(_COLOURS[colour], dtype=np.float32)
    bg = np.array((245, 245, 240), dtype=np.float32)
    cell = max(4, size // 8)
    yy, xx = np.mgrid[0:size, 0:size]
    files = []
    for i in range(n):
        dx, dy = rng.integers(0, cell, size=2)
        if pattern == "checker":
            mask = (((xx + dx) // cell) + ((yy + dy) // cell)) % 2 == 0
        elif pattern == "stripes":
            mask = ((xx + yy + dx) // cell) % 2 == 0
        else:
            r = np.hypot(xx - size / 2 + dx - cell / 2, yy - size / 2 + dy - cell / 2)
            mask = (r // cell).astype(int) % 2 == 0
        gain = 1.0 + rng.uniform(-0.08, 0.08)
        img = np.where(mask[..., None], fg * gain, bg)
        img = img + rng.normal(0.0, 4.0, size=img.shape)
        img = np.clip(img, 0, 255).astype(np.uint8)
        stem = folder / f"{trigger}_{i:03d}"
        Image.fromarray(img, "RGB").save(stem.with_suffix(".png"), optimize=False)
        stem.with_suffix(".txt").write_text(f"{trigger}, a {colour} {pattern} pattern\n", encoding="utf-8")
        files += [stem.with_suffix(".png"), stem.with_suffix(".txt")]
    return files


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for fam in FAMILIES:
        p = sub.add_parser(fam, help=f"write a tiny {fam} checkpoint")
        p.add_argument("out")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--vae", choices=("taesd", "kl"), default="taesd")
        p.add_argument("--te-dtype", choices=("fp8", "fp16", "fp32"), default="fp8")
        p.add_argument("--unet-dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
        p.add_argument("--vae-dtype", choices=("fp32", "fp16", "bf16"), default=None)
        p.add_argument("--check", action="store_true",
                       help="also compare the layout with ComfyUI's own modules (needs --comfy-dir)")
        p.add_argument("--comfy-dir", default=None, help="ComfyUI root (default: $COMFYUI_DIR)")
    p = sub.add_parser("dataset", help="write the synthetic demo dataset")
    p.add_argument("folder")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("layout", help="print the UNet attention modules and parameter counts")
    p.add_argument("family", choices=FAMILIES)
    a = ap.parse_args(argv)

    if a.cmd == "dataset":
        files = make_demo_dataset(a.folder, n=a.n, seed=a.seed)
        print(json.dumps({"files": [str(f) for f in files]}, indent=1))
        return 0
    if a.cmd == "layout":
        print(json.dumps({"unet": UNET_LAYOUTS[a.family], "params": param_counts(a.family),
                          "attn_to_q": attention_modules(a.family)}, indent=1))
        return 0
    info = MAKERS[a.cmd](a.out, seed=a.seed, vae=a.vae, te_dtype=a.te_dtype, unet_dtype=a.unet_dtype,
                         vae_dtype=a.vae_dtype)
    rc = 0
    if a.check:
        try:
            cmp = compare_with_comfy(a.cmd, a.vae, a.comfy_dir)
        except RuntimeError as exc:
            print(json.dumps(info, indent=1))
            print(f"error: {exc}", file=sys.stderr)
            return 2
        info["comfy"] = {k: v for k, v in cmp.items() if k != "unet_config"}
        ok = cmp["model_class"] == EXPECTED_COMFY_CLASS[a.cmd] and not (
            cmp["missing"] or cmp["unexpected"] or cmp["shape_mismatch"])
        info["comfy"]["ok"] = ok
        rc = 0 if ok else 1
    print(json.dumps(info, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
