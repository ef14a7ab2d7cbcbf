"""Tiny LoRA dicts and UNet key layouts for the conversion tests (no model, no file unless asked)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import tiny_models

# The real models' UNet configs in tiny_models' terms: only key names are made from them, no tensor.
REAL_UNETS = {
    "sd1": dict(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2] * 4,
                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                transformer_depth_output=[1] * 9 + [0] * 3, context_dim=768,
                use_linear_in_transformer=False, adm_in_channels=None),
    "sdxl": dict(model_channels=320, channel_mult=[1, 2, 4], num_res_blocks=[2] * 3,
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], context_dim=2048,
                 use_linear_in_transformer=True, adm_in_channels=2816),
}


def real_unet_modules(family: str) -> list[str]:
    """Every weight-bearing UNet layer of the real SD1/SDXL model, ldm naming (no `.weight`)."""
    layout = tiny_models._Layout()
    tiny_models._unet(layout, REAL_UNETS[family], prefix="")
    return [key[: -len(".weight")] for key in layout.items if key.endswith(".weight")]


def lora_pair(out_features: int, in_features: int, rank: int, conv: bool = False, seed: int = 0,
              dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn((rank, in_features, 3, 3) if conv else (rank, in_features), generator=generator)
    up = torch.randn((out_features, rank, 1, 1) if conv else (out_features, rank), generator=generator)
    return (up * 0.01).to(dtype), (down * 0.01).to(dtype)


def add_lora(tensors: dict, name: str, out_features: int, in_features: int, rank: int = 4, alpha: float | None = 2.0,
             conv: bool = False, seed: int = 0, dtype=torch.float32) -> dict:
    up, down = lora_pair(out_features, in_features, rank, conv, seed, dtype)
    tensors[f"{name}.lora_up.weight"] = up
    tensors[f"{name}.lora_down.weight"] = down
    if alpha is not None:
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return tensors


def kohya_sd1() -> dict[str, torch.Tensor]:
    """A kohya SD1 LoCon: attention, res-block convs, a downsampler, an upsampler, mixed ranks/alphas, the TE."""
    t: dict = {}
    add_lora(t, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768, seed=1)
    add_lora(t, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0", 320, 320, rank=8, alpha=4, seed=2)
    add_lora(t, "lora_unet_down_blocks_1_resnets_0_conv1", 640, 320, conv=True, seed=3)
    add_lora(t, "lora_unet_down_blocks_0_downsamplers_0_conv", 320, 320, conv=True, seed=4)
    add_lora(t, "lora_unet_up_blocks_1_upsamplers_0_conv", 1280, 1280, conv=True, seed=5)
    add_lora(t, "lora_unet_mid_block_resnets_1_time_emb_proj", 1280, 1280, alpha=1, seed=6)
    add_lora(t, "lora_unet_up_blocks_3_attentions_2_proj_out", 320, 320, seed=7)
    for index, projection in enumerate(("q_proj", "k_proj", "v_proj", "out_proj")):
        add_lora(t, f"lora_te_text_model_encoder_layers_11_self_attn_{projection}", 768, 768, seed=10 + index)
    add_lora(t, "lora_te_text_model_encoder_layers_0_mlp_fc1", 3072, 768, seed=20)
    return t


def kohya_sdxl(dtype=torch.float16) -> dict[str, torch.Tensor]:
    t: dict = {}
    add_lora(t, "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", 640, 2048, seed=1, dtype=dtype)
    add_lora(t, "lora_unet_output_blocks_2_2_conv", 1280, 1280, conv=True, seed=2, dtype=dtype)
    add_lora(t, "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj", 10240, 1280, seed=3, dtype=dtype)
    add_lora(t, "lora_unet_label_emb_0_0", 1280, 2816, seed=4, dtype=dtype)
    add_lora(t, "lora_te1_text_model_encoder_layers_5_self_attn_q_proj", 768, 768, seed=5, dtype=dtype)
    add_lora(t, "lora_te2_text_model_encoder_layers_31_mlp_fc2", 1280, 5120, rank=2, seed=6, dtype=dtype)
    return t


def mini_checkpoint(family: str = "sd1", seed: int = 0) -> dict[str, torch.Tensor]:
    """A few layers of each part of a single-file checkpoint under their real names, at toy sizes: enough
    for family detection, layout reading, merging and extracting (UNet 8 wide, context 12, CLIP 16 wide)."""
    g = torch.Generator().manual_seed(seed)
    w = lambda *shape: torch.randn(shape, generator=g) / shape[-1] ** 0.5
    u = "model.diffusion_model."
    t = {
        f"{u}input_blocks.0.0.weight": w(8, 4, 3, 3), f"{u}input_blocks.0.0.bias": w(8),
        f"{u}input_blocks.1.0.in_layers.2.weight": w(8, 8, 3, 3),
        f"{u}input_blocks.1.1.proj_in.weight": w(8, 8, 1, 1),
        f"{u}input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": w(8, 8),
        f"{u}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": w(8, 12),
        f"{u}middle_block.1.transformer_blocks.0.attn2.to_v.weight": w(8, 12),
        f"{u}output_blocks.0.1.transformer_blocks.0.attn1.to_out.0.weight": w(8, 8),
        f"{u}output_blocks.0.1.transformer_blocks.0.attn1.to_out.0.bias": w(8),
        "first_stage_model.decoder.conv_out.weight": w(3, 8, 3, 3),
    }
    if family == "sd1":
        te = "cond_stage_model.transformer.text_model.encoder.layers.0."
        t.update({f"{te}self_attn.q_proj.weight": w(16, 16), f"{te}self_attn.q_proj.bias": w(16),
                  f"{te}mlp.fc1.weight": w(32, 16), f"{te}layer_norm1.weight": w(16)})
    else:  # SDXL: CLIP-L in HF layout, bigG in OpenCLIP layout (fused q/k/v)
        te1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0."
        te2 = "conditioner.embedders.1.model.transformer.resblocks.0."
        t.update({f"{te1}self_attn.v_proj.weight": w(16, 16), f"{te2}attn.in_proj_weight": w(48, 16),
                  f"{te2}attn.in_proj_bias": w(48), f"{te2}attn.out_proj.weight": w(16, 16), f"{te2}mlp.c_fc.weight": w(32, 16),
                  "conditioner.embedders.1.model.text_projection": w(16, 16)})
    return t


SMALL_UNETS = {  # real key structure (levels, res blocks, depths) at a fraction of the width
    "sd1": dict(model_channels=64, channel_mult=[1, 2], num_res_blocks=[2, 2], transformer_depth=[1, 1, 0, 0],
                transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 0, 0, 0], context_dim=768,
                use_linear_in_transformer=False, adm_in_channels=None),
    "sd2": dict(model_channels=64, channel_mult=[1, 2], num_res_blocks=[2, 2], transformer_depth=[1, 1, 1, 1],
                transformer_depth_middle=1, transformer_depth_output=[1] * 6, context_dim=1024,
                use_linear_in_transformer=True, adm_in_channels=None),
    "sdxl": dict(model_channels=64, channel_mult=[1, 1, 2], num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 1, 1, 2, 2],
                 transformer_depth_middle=2, transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], context_dim=2048,
                 use_linear_in_transformer=True, adm_in_channels=2816),
}
SMALL_CLIP = dict(width=64, layers=3, heads=1, mlp=128, vocab=49408, positions=77)


def _small_vae(layout, prefix: str) -> None:
    """A KL autoencoder in ldm layout: 2 levels of 32/64 channels, one res block each (tiny_models' is 84 M)."""
    def res(q, cin, cout):
        layout.norm(q + "norm1.", cin, "vae")
        layout.conv(q + "conv1.", cin, cout, 3, "vae")
        layout.norm(q + "norm2.", cout, "vae")
        layout.conv(q + "conv2.", cout, cout, 3, "vae")
        if cin != cout:
            layout.conv(q + "nin_shortcut.", cin, cout, 1, "vae")

    def mid(q, c):
        res(q + "mid.block_1.", c, c)
        layout.norm(q + "mid.attn_1.norm.", c, "vae")
        for name in ("q", "k", "v", "proj_out"):
            layout.conv(f"{q}mid.attn_1.{name}.", c, c, 1, "vae")
        res(q + "mid.block_2.", c, c)

    e, d = prefix + "encoder.", prefix + "decoder."
    layout.conv(e + "conv_in.", 3, 32, 3, "vae")
    res(e + "down.0.block.0.", 32, 32)
    layout.conv(e + "down.0.downsample.conv.", 32, 32, 3, "vae")
    res(e + "down.1.block.0.", 32, 64)
    mid(e, 64)
    layout.norm(e + "norm_out.", 64, "vae")
    layout.conv(e + "conv_out.", 64, 8, 3, "vae")
    layout.conv(d + "conv_in.", 4, 64, 3, "vae")
    mid(d, 64)
    res(d + "up.1.block.0.", 64, 64)
    res(d + "up.1.block.1.", 64, 64)
    layout.conv(d + "up.1.upsample.conv.", 64, 64, 3, "vae")
    res(d + "up.0.block.0.", 64, 32)
    res(d + "up.0.block.1.", 32, 32)
    layout.norm(d + "norm_out.", 32, "vae")
    layout.conv(d + "conv_out.", 32, 3, 3, "vae")
    layout.conv(prefix + "quant_conv.", 8, 8, 1, "vae")
    layout.conv(prefix + "post_quant_conv.", 4, 4, 1, "vae")


def small_checkpoint(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A single-file SD1 / SD2 / SDXL checkpoint with every part in its real layout, small enough for unit
    tests (~10-40 M parameters): the UNet's levels and depths, 3-layer CLIPs, a 2-level KL VAE."""
    layout = tiny_models._Layout()
    tiny_models._unet(layout, SMALL_UNETS[family])
    if family == "sd1":
        tiny_models._clip_hf(layout, "cond_stage_model.transformer.", SMALL_CLIP, "te")
    elif family == "sd2":
        tiny_models._clip_openclip(layout, "cond_stage_model.model.", SMALL_CLIP, "te")
    else:
        tiny_models._clip_hf(layout, "conditioner.embedders.0.transformer.", SMALL_CLIP, "te")
        tiny_models._clip_openclip(layout, "conditioner.embedders.1.model.", SMALL_CLIP, "te")
    _small_vae(layout, "first_stage_model.")
    tensors = {key: tiny_models._tensor(torch, key, shape, kind, seed, torch.float32) for key, (shape, kind) in layout.items.items()}
    tensors["alphas_cumprod"] = torch.linspace(0.9991, 0.0047, 1000, dtype=torch.float32)
    return tensors


def run_python(code: str, *args: str, timeout: int = 300) -> str:
    """Run `code` in a fresh interpreter of this venv, without PYTHONPATH. The test host puts import-only
    stand-ins there (tools/comfy_host.py: torchvision), which transformers takes for the real package and
    then fails to import its models; TuneKit's own code never needs them."""
    import os
    import subprocess

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def needs(package: str) -> None:
    import importlib.util

    import pytest

    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (requirements.txt lists it)")
