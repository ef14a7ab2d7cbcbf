"""Stable Diffusion 1.x. kohya names SD1 UNet modules the diffusers way (FORMATS.md), LoCon layers included."""

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


# ldm -> diffusers names of the modules outside the levels (ComfyUI's comfy.utils.UNET_MAP_BASIC).
_OUTER = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# Inside a res block (comfy.utils.UNET_MAP_RESNET).
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _rename(rest: str, table: dict[str, str], where: str) -> str:
    for ldm, diffusers in table.items():
        if rest == ldm or rest.startswith(ldm + "."):
            return diffusers + rest[len(ldm):]
    raise ValueError(f"{where}.{rest} is not a module kohya names")


def diffusers_path(ldm_path: str, levels: list[int]) -> str:
    """Map a denoiser module from ldm to diffusers naming, as kohya names SD1 LoRA (and LoCon) modules.

    `levels` is the number of res blocks per level (ComfyUI's `num_res_blocks`). Attention blocks,
    res blocks, down/upsamplers, conv_in/out and the time embedding are mapped, as ComfyUI's own
    `comfy.utils.unet_to_diffusers` maps them (a test checks the two agree).
    """
    for ldm, diffusers in _OUTER.items():
        if ldm_path == ldm or ldm_path.startswith(ldm + "."):
            return diffusers + ldm_path[len(ldm):]
    if match := _MIDDLE.match(ldm_path):
        part, rest = match.group(1), match.group(2)
        if part == "1":
            return f"mid_block.attentions.0.{rest}"
        if part in ("0", "2"):
            return f"mid_block.resnets.{int(part) // 2}.{_rename(rest, _RESNET, ldm_path)}"
        raise ValueError(f"{ldm_path} is outside the middle block")
    match = _BLOCK.match(ldm_path)
    if not match:
        raise ValueError(f"{ldm_path} is not a module of an SD1 UNet")
    kind, index, part, rest = match.group(1), int(match.group(2)), match.group(3), match.group(4)
    if kind == "input_blocks":
        level, position = _input_block(index, levels)
        prefix = f"down_blocks.{level}"
        if part == "0" and position == levels[level]:  # the level's downsampler: input_blocks.N.0.op
            return f"{prefix}.downsamplers.0.{_rename(rest, {'op': 'conv'}, ldm_path)}"
    else:
        level, position = _output_block(index, levels)
        prefix = f"up_blocks.{level}"
        # The level's upsampler follows its last res block (and attention, where the level has one).
        if part == "2" or (part == "1" and (rest == "conv" or rest.startswith("conv."))):
            return f"{prefix}.upsamplers.0.{rest}"
    if part == "0":
        return f"{prefix}.resnets.{position}.{_rename(rest, _RESNET, ldm_path)}"
    if part == "1":
        return f"{prefix}.attentions.{position}.{rest}"
    raise ValueError(f"{ldm_path} is not a module of an SD1 UNet")


@dataclass(frozen=True)
class SD1Family(Family):
    def kohya_unet_name(self, ldm_path: str, unet_levels: list[int]) -> str:
        return kohya_name("lora_unet", diffusers_path(ldm_path, unet_levels))


SD1 = SD1Family(
    name="sd1",
    title="SD 1.x",
    base_model_version="sd_v1",
    modelspec_architecture="stable-diffusion-v1",
    default_resolution=512,
    size_conditioning=False,
)
