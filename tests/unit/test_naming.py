"""kohya key names for SD1 (diffusers-style) and SDXL (ldm-style), as FORMATS.md lists them."""

import pytest

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


def test_sd1_refuses_modules_outside_attention_blocks():
    with pytest.raises(ValueError):
        SD1.kohya_unet_name("input_blocks.1.0.in_layers.2", SD15_LEVELS)


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


def test_unsupported_family_error_names_the_family_and_the_fix():
    with pytest.raises(UnsupportedModelError, match=r"'sd2'.*Supported families: SD 1.x, SDXL"):
        get_family("sd2")
