"""Stable Diffusion 1.x. kohya names SD1 UNet modules the diffusers way (FORMATS.md)."""

import re
from dataclasses import dataclass

from .base import Family, kohya_name

_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
_MIDDLE = re.compile(r"^middle_block\.(\d+)\.(.+)$")


def _input_block(index: int, levels: list[int]) -> tuple[int, int]:
    """input_blocks.N (N >= 1) -> (level, position); a level holds its res blocks then a downsampler."""
    position = index - 1
    for level, res_blocks in enumerate(levels):
        if position <= res_blocks:
            return level, position
        position -= res_blocks + 1
    raise ValueError(f"input_blocks.{index} is outside a UNet with levels {levels}")


def _output_block(index: int, levels: list[int]) -> tuple[int, int]:
    """output_blocks.N -> (up level, position); each up level holds res_blocks + 1 blocks."""
    position = index
    for up_level, res_blocks in enumerate(reversed(levels)):
        if position <= res_blocks:
            return up_level, position
        position -= res_blocks + 1
    raise ValueError(f"output_blocks.{index} is outside a UNet with levels {levels}")


def diffusers_attention_path(ldm_path: str, levels: list[int]) -> str:
    """Map a module inside a transformer (attention) block from ldm to diffusers naming.

    `levels` is the number of res blocks per level (ComfyUI's `num_res_blocks`). Only the
    attention blocks (sub-index 1) are mapped: they are what kohya's LoRA targets.
    """
    if match := _MIDDLE.match(ldm_path):
        if match.group(1) != "1":
            raise ValueError(f"{ldm_path} is not inside the middle attention block")
        return f"mid_block.attentions.0.{match.group(2)}"
    match = _BLOCK.match(ldm_path)
    if not match or match.group(3) != "1":
        raise ValueError(f"{ldm_path} is not inside an attention block")
    kind, index, rest = match.group(1), int(match.group(2)), match.group(4)
    if kind == "input_blocks":
        level, position = _input_block(index, levels)
        return f"down_blocks.{level}.attentions.{position}.{rest}"
    level, position = _output_block(index, levels)
    return f"up_blocks.{level}.attentions.{position}.{rest}"


@dataclass(frozen=True)
class SD1Family(Family):
    def kohya_unet_name(self, ldm_path: str, unet_levels: list[int]) -> str:
        return kohya_name("lora_unet", diffusers_attention_path(ldm_path, unet_levels))


SD1 = SD1Family(
    name="sd1",
    title="SD 1.x",
    base_model_version="sd_v1",
    modelspec_architecture="stable-diffusion-v1",
    default_resolution=512,
    size_conditioning=False,
)
