"""Captions: sidecar files, trigger words, and kohya's per-step caption processing.

`process_caption` follows sd-scripts `BaseDataset.process_caption` (prefix/suffix, caption dropout,
`keep_tokens` / `keep_tokens_separator`, token warmup, shuffle, tag dropout, secondary separator), drawing
its random numbers from the `random.Random` it is given, so a seeded step always makes the same caption.
"""

import math
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError


@dataclass(frozen=True)
class CaptionOptions:
    shuffle: bool = False  # shuffle_caption
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    separator: str = ","  # caption_separator
    secondary_separator: str = ""
    prefix: str = ""  # caption_prefix
    suffix: str = ""  # caption_suffix
    dropout_rate: float = 0.0  # caption_dropout_rate
    dropout_every_n_epochs: int = 0  # caption_dropout_every_n_epochs
    tag_dropout_rate: float = 0.0  # caption_tag_dropout_rate
    token_warmup_min: int = 1
    token_warmup_step: float = 0  # < 1: a fraction of the run's steps

    @property
    def varies(self) -> bool:
        """True when a caption may differ between steps: its text embedding cannot be cached."""
        return bool(
            self.shuffle or self.dropout_rate > 0 or self.dropout_every_n_epochs > 0
            or self.tag_dropout_rate > 0 or self.token_warmup_step > 0
        )

    def problems(self) -> list[str]:
        found = []
        for name in ("dropout_rate", "tag_dropout_rate"):
            if not 0 <= getattr(self, name) <= 1:
                found.append(f"caption {name} is {getattr(self, name)}: use a value in [0, 1].")
        if self.keep_tokens < 0:
            found.append(f"keep_tokens is {self.keep_tokens}: use 0 or more.")
        if not self.separator:
            found.append("caption_separator is empty: use ',' (kohya's default).")
        return found


def read_utf8(path: Path, what: str = "file") -> str:
    """The text of `path`; not UTF-8 raises a DatasetError naming the file, line and byte, with the fix."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DatasetError(
            f"{path}:{line}: the {what} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}). "
            "Save the file as UTF-8 (most editors: 'Save with encoding' > UTF-8)."
        ) from None


def read_caption_file(path: Path, first_line_only: bool = False) -> str | None:
    """The caption in `path` (lines joined by spaces, or kohya's first line only), None when there is no file.

    A file that is not UTF-8 raises a DatasetError naming the file, line and byte, with the fix.
    """
    if not path.is_file():
        return None
    text = read_utf8(path, "caption")
    if first_line_only:
        text = next(iter(text.splitlines()), "")
    return " ".join(text.split())


def with_trigger(caption: str, trigger_word: str) -> str:
    """Prepend the trigger word unless the caption already has it."""
    trigger_word = trigger_word.strip()
    if not trigger_word or trigger_word in caption:
        return caption or trigger_word
    return f"{trigger_word}, {caption}" if caption else trigger_word


def process_caption(
    caption: str, options: CaptionOptions, rng: random.Random, epoch: int = 1, step: int = 0, max_steps: int = 1
) -> str:
    """One step's caption (kohya `process_caption`). `epoch` is 1-based, `step` 0-based."""
    if options.prefix:
        caption = f"{options.prefix} {caption}"
    if options.suffix:
        caption = f"{caption} {options.suffix}"
    dropped = options.dropout_rate > 0 and rng.random() < options.dropout_rate
    if dropped or (options.dropout_every_n_epochs > 0 and epoch % options.dropout_every_n_epochs == 0):
        return ""
    if options.shuffle or options.token_warmup_step > 0 or options.tag_dropout_rate > 0:
        caption = _reorder_tags(caption, options, rng, step, max_steps)
    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.separator)
    return caption


def _reorder_tags(caption: str, options: CaptionOptions, rng: random.Random, step: int, max_steps: int) -> str:
    fixed, flex, fixed_suffix = split_tags(caption, options)
    warmup = options.token_warmup_step
    if 0 < warmup < 1:
        warmup = math.floor(warmup * max_steps)
    if warmup and step < warmup:
        flex = flex[: math.floor(step * ((len(flex) - options.token_warmup_min) / warmup)) + options.token_warmup_min]
    if options.shuffle:
        rng.shuffle(flex)
    if options.tag_dropout_rate > 0:
        flex = [tag for tag in flex if rng.random() >= options.tag_dropout_rate]
    return ", ".join(fixed + flex + fixed_suffix)


def split_tags(caption: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(kept in front, shuffled/dropped, kept at the end), as kohya splits them."""
    sep, keep_sep = options.separator, options.keep_tokens_separator

    def tags(text: str) -> list[str]:
        return [tag.strip() for tag in text.split(sep) if tag.strip()]

    if keep_sep and keep_sep in caption:
        fixed_part, flex_part = caption.split(keep_sep, 1)
        suffix = []
        if keep_sep in flex_part:
            flex_part, suffix_part = flex_part.split(keep_sep, 1)
            suffix = tags(suffix_part)
        return tags(fixed_part), tags(flex_part), suffix
    all_tags = [tag.strip() for tag in caption.strip().split(sep)]
    if options.keep_tokens > 0:
        return all_tags[: options.keep_tokens], all_tags[options.keep_tokens:], []
    return [], all_tags, []
