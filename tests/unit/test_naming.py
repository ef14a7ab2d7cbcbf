"""kohya key names for SD1 (diffusers-style) and SDXL (ldm-style), as FORMATS.md lists them."""

import pytest
from torch import nn

from tunekit.trainer.adapters import select_targets
from tunekit.trainer.families import SD1, SDXL, get_family
from tunekit.trainer.errors import UnsupportedModelError

from fakes import TinyDenoiser

SD15_LEVELS = [2, 2, 2, 2]


@pytest.mark.parametrize(
    "ldm_path, kohya",
    [
        ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
        ("input_blocks.2.1.proj_in", "lora_unet_down_blocks_0_attentions_1_proj_in"),
        ("input_blocks.4.1.transformer_blocks.0.attn2.to_k", "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"),
        ("input_blocks.8.1.transformer_blocks.0.ff.net.0.proj", "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_ff_net_0_proj"),
        ("middle_block.1.transformer_blocks.0.attn1.to_out.0", "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0"),
        ("output_blocks.3.1.proj_out", "lora_unet_up_blocks_1_attentions_0_proj_out"),
        ("output_blocks.11.1.transformer_blocks.0.ff.net.2", "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2"),
    ],
)
def test_sd15_names_are_diffusers_style(ldm_path, kohya):
    assert SD1.kohya_unet_name(ldm_path, SD15_LEVELS) == kohya


@pytest.mark.parametrize(
    "ldm_path, kohya",
    [  # kohya's LoCon names for the layers outside the attention blocks (ComfyUI's unet_to_diffusers agrees)
        ("input_blocks.1.0.in_layers.2", "lora_unet_down_blocks_0_resnets_0_conv1"),
        ("input_blocks.4.0.skip_connection", "lora_unet_down_blocks_1_resnets_0_conv_shortcut"),
        ("input_blocks.5.0.emb_layers.1", "lora_unet_down_blocks_1_resnets_1_time_emb_proj"),
        ("input_blocks.3.0.op", "lora_unet_down_blocks_0_downsamplers_0_conv"),
        ("input_blocks.11.0.out_layers.3", "lora_unet_down_blocks_3_resnets_1_conv2"),
        ("middle_block.0.in_layers.2", "lora_unet_mid_block_resnets_0_conv1"),
        ("middle_block.2.out_layers.3", "lora_unet_mid_block_resnets_1_conv2"),
        ("output_blocks.2.1.conv", "lora_unet_up_blocks_0_upsamplers_0_conv"),  # a level without attention
        ("output_blocks.5.2.conv", "lora_unet_up_blocks_1_upsamplers_0_conv"),  # after the level's attention
        ("output_blocks.9.0.skip_connection", "lora_unet_up_blocks_3_resnets_0_conv_shortcut"),
        ("input_blocks.0.0", "lora_unet_conv_in"),
        ("out.2", "lora_unet_conv_out"),
        ("time_embed.0", "lora_unet_time_embedding_linear_1"),
        ("time_embed.2", "lora_unet_time_embedding_linear_2"),
    ],
)
def test_sd15_res_block_and_sampler_names_are_kohya_locon_style(ldm_path, kohya):
    assert SD1.kohya_unet_name(ldm_path, SD15_LEVELS) == kohya


@pytest.mark.parametrize("ldm_path", ["input_blocks.1.0", "input_blocks.40.0.in_layers.2", "middle_block.3.conv",
                                      "input_blocks.1.0.in_layers.9", "label_emb.0.0", "output_blocks.1.3.conv"])
def test_sd1_refuses_paths_that_are_not_sd1_modules(ldm_path):
    with pytest.raises(ValueError):
        SD1.kohya_unet_name(ldm_path, SD15_LEVELS)


def test_sdxl_names_keep_ldm_paths():
    path = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert SDXL.kohya_unet_name(path, [2, 2, 2]) == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def test_presets_pick_the_documented_layers():
    modules = dict(TinyDenoiser().named_modules())
    attention = select_targets(modules, "attention")
    transformer = select_targets(modules, "transformer")
    assert len(attention) == 4 * 8  # four transformer blocks x (q, k, v, out) x (attn1, attn2)
    assert len(transformer) == 4 * (8 + 2 + 2)  # + ff.net.0.proj, ff.net.2, proj_in, proj_out
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0" in attention
    assert not any("norm" in path for path in transformer)


def test_all_preset_picks_every_linear_and_conv_and_nothing_else():
    modules = dict(TinyDenoiser().named_modules())
    picked = select_targets(modules, "all")
    expected = [path for path, module in modules.items() if isinstance(module, (nn.Linear, nn.Conv2d))]
    assert list(picked) == expected
    assert set(select_targets(modules, "transformer")) < set(picked)
    assert "input_blocks.0.0" in picked and "time_embed.0" in picked and "out.2" in picked


def test_unsupported_family_error_names_the_family_and_the_fix():
    with pytest.raises(UnsupportedModelError, match=r"'sd2'.*Supported families: SD 1.x, SDXL"):
        get_family("sd2")
