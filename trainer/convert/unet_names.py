"""UNet module paths: the ldm names single-file checkpoints and ComfyUI use <-> the diffusers names.

One table for every layer (res blocks, attention, samplers, embeddings), not only attention: LoCon
files and checkpoint merges touch all of them. The mapping depends only on how many res blocks each
level holds and which levels carry attention, so it is given as a `UNetLayout`, not a model config.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass

# Inside a res block the two layouts name the same layers differently.
_RES_LDM_TO_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RES_DIFFUSERS_TO_LDM = {value: key for key, value in _RES_LDM_TO_DIFFUSERS.items()}

# Layers outside the blocks.
_TOP_LDM_TO_DIFFUSERS = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_TOP_DIFFUSERS_TO_LDM = {value: key for key, value in _TOP_LDM_TO_DIFFUSERS.items()}
# Older diffusers configs call SDXL's size embedding `class_embedding`; ComfyUI reads both names.
_TOP_DIFFUSERS_TO_LDM |= {"class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"}


class UNetNameError(ValueError):
    """A module path that is not a layer of a UNet with the given layout."""


@dataclass(frozen=True)
class UNetLayout:
    """Res blocks per level and whether each level's blocks carry a transformer (attention)."""

    res_blocks: tuple[int, ...]
    attention: tuple[bool, ...]

    def __post_init__(self):
        if len(self.res_blocks) != len(self.attention) or not self.res_blocks:
            raise ValueError(f"a UNet layout needs one entry per level in both fields, got {self}")


def _split_res(rest: str, table: dict[str, str], where: str) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    raise UNetNameError(f"'{rest}' is not a layer of a res block ({where})")


def _input_position(index: int, layout: UNetLayout) -> tuple[int, int]:
    """input_blocks.N (N >= 1) -> (level, position); position == res_blocks[level] is the downsampler."""
    position = index - 1
    last = len(layout.res_blocks) - 1
    for level, count in enumerate(layout.res_blocks):
        blocks = count + (level != last)  # every level but the last ends with a downsampler
        if position < blocks:
            return level, position
        position -= blocks
    raise UNetNameError(f"input_blocks.{index} is outside a UNet with {layout.res_blocks} res blocks per level")


def _output_position(index: int, layout: UNetLayout) -> tuple[int, int]:
    """output_blocks.N -> (up level, position); each up level holds res_blocks + 1 blocks."""
    position = index
    for up_level, count in enumerate(reversed(layout.res_blocks)):
        if position <= count:
            return up_level, position
        position -= count + 1
    raise UNetNameError(f"output_blocks.{index} is outside a UNet with {layout.res_blocks} res blocks per level")


_LDM_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)(?:\.(.+))?$")
_LDM_MIDDLE = re.compile(r"^middle_block\.(\d)\.(.+)$")


def ldm_to_diffusers(path: str, layout: UNetLayout) -> str:
    """`input_blocks.1.1.proj_in` -> `down_blocks.0.attentions.0.proj_in` (module paths, no `.weight`)."""
    for old, new in _TOP_LDM_TO_DIFFUSERS.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    if match := _LDM_MIDDLE.match(path):
        part, rest = int(match.group(1)), match.group(2)
        if part == 1:
            return f"mid_block.attentions.0.{rest}"
        if part in (0, 2):
            return f"mid_block.resnets.{part // 2}.{_split_res(rest, _RES_LDM_TO_DIFFUSERS, path)}"
    elif match := _LDM_BLOCK.match(path):
        kind, index, part, rest = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4) or ""
        if kind == "input_blocks":
            return _ldm_input(index, part, rest, layout, path)
        return _ldm_output(index, part, rest, layout, path)
    raise UNetNameError(f"'{path}' is not a layer of an SD UNet (ldm naming)")


def _ldm_input(index: int, part: int, rest: str, layout: UNetLayout, path: str) -> str:
    level, position = _input_position(index, layout)
    prefix = f"down_blocks.{level}"
    if position == layout.res_blocks[level]:
        if part == 0 and rest == "op":
            return f"{prefix}.downsamplers.0.conv"
    elif part == 0:
        return f"{prefix}.resnets.{position}.{_split_res(rest, _RES_LDM_TO_DIFFUSERS, path)}"
    elif part == 1 and rest:
        return f"{prefix}.attentions.{position}.{rest}"
    raise UNetNameError(f"'{path}' is not a layer of an SD UNet with layout {layout}")


def _ldm_output(index: int, part: int, rest: str, layout: UNetLayout, path: str) -> str:
    up_level, position = _output_position(index, layout)
    prefix = f"up_blocks.{up_level}"
    if part == 0:
        return f"{prefix}.resnets.{position}.{_split_res(rest, _RES_LDM_TO_DIFFUSERS, path)}"
    if rest == "conv" and part in (1, 2):  # the upsampler follows the res block, or the transformer
        return f"{prefix}.upsamplers.0.conv"
    if part == 1 and rest:
        return f"{prefix}.attentions.{position}.{rest}"
    raise UNetNameError(f"'{path}' is not a layer of an SD UNet with layout {layout}")


_DIFF_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_DIFF_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def diffusers_to_ldm(path: str, layout: UNetLayout) -> str:
    """The inverse of `ldm_to_diffusers`."""
    for old, new in _TOP_DIFFUSERS_TO_LDM.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    if match := _DIFF_MID.match(path):
        kind, index, rest = match.group(1), int(match.group(2)), match.group(3)
        if kind == "attentions" and index == 0:
            return f"middle_block.1.{rest}"
        if kind == "resnets" and index in (0, 1):
            return f"middle_block.{index * 2}.{_split_res(rest, _RES_DIFFUSERS_TO_LDM, path)}"
    elif match := _DIFF_BLOCK.match(path):
        side, level, kind, index, rest = match.group(1), int(match.group(2)), match.group(3), int(match.group(4)), match.group(5)
        if level < len(layout.res_blocks):
            mapped = _diffusers_down(level, kind, index, rest, layout, path) if side == "down_blocks" else \
                _diffusers_up(level, kind, index, rest, layout, path)
            if mapped:
                return mapped
    raise UNetNameError(f"'{path}' is not a layer of an SD UNet with layout {layout} (diffusers naming)")


def _diffusers_down(level: int, kind: str, index: int, rest: str, layout: UNetLayout, path: str) -> str | None:
    first = 1 + sum(count + 1 for count in layout.res_blocks[:level])
    if kind == "downsamplers" and index == 0 and rest == "conv" and level < len(layout.res_blocks) - 1:
        return f"input_blocks.{first + layout.res_blocks[level]}.0.op"
    if index >= layout.res_blocks[level]:
        return None
    if kind == "resnets":
        return f"input_blocks.{first + index}.0.{_split_res(rest, _RES_DIFFUSERS_TO_LDM, path)}"
    if kind == "attentions":
        return f"input_blocks.{first + index}.1.{rest}"
    return None


def _diffusers_up(up_level: int, kind: str, index: int, rest: str, layout: UNetLayout, path: str) -> str | None:
    levels = list(reversed(layout.res_blocks))
    first = sum(count + 1 for count in levels[:up_level])
    count = levels[up_level]
    if kind == "upsamplers" and index == 0 and rest == "conv" and up_level < len(levels) - 1:
        with_attention = layout.attention[len(levels) - 1 - up_level]
        return f"output_blocks.{first + count}.{2 if with_attention else 1}.conv"
    if index > count:
        return None
    if kind == "resnets":
        return f"output_blocks.{first + index}.0.{_split_res(rest, _RES_DIFFUSERS_TO_LDM, path)}"
    if kind == "attentions":
        return f"output_blocks.{first + index}.1.{rest}"
    return None


def layout_from_keys(keys: Iterable[str], prefix: str = "model.diffusion_model.") -> UNetLayout:
    """Read the layout off a single-file checkpoint's UNet keys (ldm naming)."""
    blocks: dict[int, set[str]] = {}
    pattern = re.compile(re.escape(prefix) + r"input_blocks\.(\d+)\.(\d+)\.(\w+)")
    for key in keys:
        if match := pattern.match(key):
            blocks.setdefault(int(match.group(1)), set()).add(f"{match.group(2)}.{match.group(3)}")
    if not blocks:
        raise UNetNameError(f"no UNet input blocks under '{prefix}': this is not an SD-style UNet")
    res_blocks, attention, count, has_attention = [], [], 0, False
    for index in range(1, max(blocks) + 1):
        parts = blocks.get(index, set())
        if "0.op" in parts:  # a downsampler closes the level
            res_blocks.append(count)
            attention.append(has_attention)
            count, has_attention = 0, False
        else:
            count += 1
            has_attention |= any(part.startswith("1.") for part in parts)
    res_blocks.append(count)
    attention.append(has_attention)
    return UNetLayout(tuple(res_blocks), tuple(attention))
