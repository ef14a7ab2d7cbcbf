"""Export any TuneKit dataset as a kohya dataset TOML that sd-scripts (and TuneKit) read back.

A subset whose images are exactly one folder's images with matching caption files is referenced where it
is. Any other subset (images from the graph, a recursive folder, captions changed by a trigger word, a
metadata.jsonl) is written out: images as PNG (a MASK becomes the alpha channel, with `alpha_mask = true`)
and captions as `.txt`, into `<out_dir>/<n>_<subset name>/`. Nothing existing is overwritten.
"""

import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import atomic_write, unused_path
from .captions import read_caption_file
from .dataset import Dataset, Subset, TrainImage
from .folder import list_images
from .kohya_toml import _toml_value

UNSAFE = re.compile(r"[^A-Za-z0-9 _.-]+")


def export_kohya_toml(dataset: Dataset, out_dir: Path, name: str = "dataset.toml") -> Path:
    """Write `<out_dir>/<name>` (a new name if it exists) and any subset folders it needs; return the TOML path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict = {}
    for index, subset in enumerate(dataset.subsets):
        groups.setdefault(subset.buckets, []).append((index, subset))
    blocks = ["# Written by TuneKit: a kohya sd-scripts dataset config (--dataset_config).", ""]
    for settings, members in groups.items():
        blocks.append("[[datasets]]")
        blocks.extend(_lines(_dataset_values(settings, [subset for _, subset in members])))
        for index, subset in members:
            folder = _single_folder(subset)
            image_dir = folder or _write_subset(subset, index, out_dir)
            blocks += ["", "  [[datasets.subsets]]"]
            blocks.extend("  " + line for line in _lines(_subset_values(subset, image_dir, folder is not None)))
        blocks.append("")
    path = unused_path(out_dir / name)
    atomic_write(path, lambda temp: temp.write_text("\n".join(blocks), encoding="utf-8"))
    return path


def _lines(values: dict) -> list[str]:
    return [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]


def _dataset_values(settings, subsets: list[Subset]) -> dict:
    values = {"enable_bucket": settings.enabled, "bucket_reso_steps": settings.steps,
              "bucket_no_upscale": settings.no_upscale}
    if settings.resolution:
        values["resolution"] = list(settings.resolution)
    values["min_bucket_reso"], values["max_bucket_reso"] = settings.min_reso, settings.max_reso
    weights = {subset.loss_weight for subset in subsets if subset.is_reg}
    if weights:
        values["prior_loss_weight"] = max(weights)  # kohya has one per dataset
    return values


def _subset_values(subset: Subset, image_dir: str, referenced: bool) -> dict:
    captions, augment = subset.captions, subset.augment
    values = {
        "image_dir": image_dir,
        "num_repeats": subset.repeats,
        "caption_extension": subset.caption_extension if referenced else ".txt",
        "is_reg": subset.is_reg,
        "class_tokens": subset.class_tokens or None,
        "shuffle_caption": captions.shuffle,
        "keep_tokens": captions.keep_tokens,
        "keep_tokens_separator": captions.keep_tokens_separator or None,
        "caption_separator": captions.separator,
        "secondary_separator": captions.secondary_separator or None,
        "caption_prefix": captions.prefix or None,
        "caption_suffix": captions.suffix or None,
        "caption_dropout_rate": captions.dropout_rate,
        "caption_dropout_every_n_epochs": captions.dropout_every_n_epochs,
        "caption_tag_dropout_rate": captions.tag_dropout_rate,
        "token_warmup_min": captions.token_warmup_min,
        "token_warmup_step": captions.token_warmup_step,
        "flip_aug": augment.flip,
        "random_crop": augment.random_crop,
        "resize_interpolation": augment.interpolation,
        "alpha_mask": augment.alpha_mask or any(image.mask is not None for image in subset.images),
    }
    return values


def _single_folder(subset: Subset) -> str | None:
    """The folder a subset can be referenced as, when kohya would read exactly these images and captions."""
    if any(image.pixels is not None or image.mask is not None for image in subset.images):
        return None
    folders = {Path(image.source).parent for image in subset.images}
    if len(folders) != 1:
        return None
    folder = folders.pop()
    sources = {Path(image.source).resolve() for image in subset.images}
    if {path.resolve() for path in list_images(folder)} != sources:
        return None
    for image in subset.images:
        kohya_caption = read_caption_file(Path(image.source).with_suffix(subset.caption_extension), first_line_only=True)
        if (kohya_caption if kohya_caption is not None else subset.class_tokens) != image.caption:
            return None
    return str(folder)


def _write_subset(subset: Subset, index: int, out_dir: Path) -> str:
    target = unused_path(out_dir / f"{subset.repeats}_{UNSAFE.sub('_', subset.name).strip() or 'subset'}_{index}")
    target.mkdir(parents=True)
    for number, image in enumerate(subset.images):
        stem = f"{number:05d}_{UNSAFE.sub('_', Path(image.name).stem)[:40]}"
        _write_image(target / f"{stem}.png", image)
        (target / f"{stem}.txt").write_text(image.caption, encoding="utf-8")
    return str(target)


def _write_image(path: Path, image: TrainImage) -> None:
    picture = image.load()
    if image.mask is not None:
        alpha = Image.fromarray((np.clip(image.mask, 0, 1) * 255).round().astype(np.uint8), "L")
        picture = picture.copy()
        picture.putalpha(alpha.resize(picture.size))
    picture.save(path)
