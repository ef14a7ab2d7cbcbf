"""Folders of images with caption sidecars (`photo.png` + `photo.txt`), optionally recursive, and
kohya's legacy `<repeats>_<class tokens>` folder layout."""

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import DatasetError
from .captions import read_caption_file, with_trigger
from .dataset import Dataset, SkippedImage, Subset, TrainImage
from .images import ImageLoadError, ImageProbe, probe_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# What to do with an image that has no caption file.
MISSING_CAPTION_POLICIES = ("error", "use trigger word")
LEGACY_FOLDER = re.compile(r"^(\d+)_(.+)$")
PROBE_THREADS = min(8, (os.cpu_count() or 2) * 2)


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (and its subfolders), sorted; hidden files and folders are left out."""
    walk = folder.rglob("*") if recursive else folder.iterdir()
    found = []
    for path in walk:
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") for part in relative):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.append(path)
    return sorted(found)


def probe_files(paths: list[Path]) -> tuple[dict[Path, ImageProbe], list[SkippedImage]]:
    """Size and hash of every readable image (in threads); unreadable ones come back with why."""
    with ThreadPoolExecutor(PROBE_THREADS) as pool:
        results = list(pool.map(_probe_or_reason, paths))
    probes, skipped = {}, []
    for path, result in zip(paths, results):
        if isinstance(result, str):
            log.warning("TuneKit skips %s: %s", path, result)
            skipped.append(SkippedImage(str(path), result))
        else:
            probes[path] = result
    return probes, skipped


def _probe_or_reason(path: Path) -> ImageProbe | str:
    try:
        return probe_image(path)
    except ImageLoadError as error:
        return error.reason
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"


def scan_image_folder(
    folder: Path,
    caption_extension: str = ".txt",
    trigger_word: str = "",
    missing_caption: str = "error",
    recursive: bool = False,
    first_line_only: bool = False,
    **subset,
) -> Dataset:
    """Read every image in `folder` with its caption, as one subset.

    Unreadable images are skipped and listed; a missing caption follows `missing_caption`;
    `subset` sets the Subset's other fields (repeats, captions, augment, buckets, is_reg...).
    """
    files = _image_files(folder, recursive)
    probes, skipped = probe_files(files)
    images, uncaptioned, problems = [], [], []
    for path, probe in probes.items():
        try:
            caption = read_caption_file(path.with_suffix(caption_extension), first_line_only)
        except DatasetError as error:
            problems.append(str(error))
            continue
        if caption is None:
            uncaptioned.append(path)
            caption = subset.get("class_tokens", "")
        images.append(TrainImage(str(path), with_trigger(caption, trigger_word), size=probe.size, digest=probe.digest))
    if problems:
        raise DatasetError("Some caption files cannot be read:\n" + "\n".join(problems))
    if uncaptioned and missing_caption == "error":
        raise DatasetError(_missing_captions_message(uncaptioned, caption_extension))
    if not images:
        raise DatasetError(f"None of the {len(files)} images in '{folder}' could be read; see the skipped list in the log.")
    subset.setdefault("source", str(folder))
    notes = []
    if uncaptioned:
        fallback = with_trigger(subset.get("class_tokens", ""), trigger_word)
        notes.append(f"{len(uncaptioned)} images in '{folder}' have no {caption_extension} caption file: "
                     f"captioned '{fallback}'" + ("" if fallback else " (empty caption)"))
    name = subset.pop("name", folder.name)
    return Dataset([Subset(name, images, caption_extension=caption_extension, **subset)], skipped, notes)


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"Dataset folder not found: '{folder}'. Pick an existing folder of training images.")
    files = list_images(folder, recursive)
    if not files:
        where = "or its subfolders " if recursive else ""
        raise DatasetError(
            f"No images in '{folder}' {where}(looked for {', '.join(IMAGE_SUFFIXES)}). "
            "Put your training images there, each with a caption file of the same name."
        )
    return files


def is_legacy_layout(folder: Path) -> bool:
    """True when `folder` holds kohya-style `<repeats>_<class tokens>` subfolders (e.g. `10_sks dog`)."""
    return folder.is_dir() and any(LEGACY_FOLDER.match(d.name) for d in folder.iterdir() if d.is_dir())


def scan_legacy_folders(
    folder: Path, caption_extension: str = ".caption", trigger_word: str = "", is_reg: bool = False, **subset
) -> Dataset:
    """kohya's `train_data_dir` layout: each `<repeats>_<class tokens>` subfolder is a subset with those
    repeats; an image without caption file is captioned with the class tokens (as kohya does)."""
    dataset, ignored = Dataset([]), []
    for child in sorted(d for d in folder.iterdir() if d.is_dir()):
        match = LEGACY_FOLDER.match(child.name)
        if not match or int(match.group(1)) < 1:
            ignored.append(child.name)
            continue
        part = scan_image_folder(
            child, caption_extension, trigger_word, "use trigger word", repeats=int(match.group(1)),
            class_tokens=match.group(2), is_reg=is_reg, **subset,
        )
        dataset = dataset.merged(part)
    if not dataset.subsets:
        raise DatasetError(f"No '<repeats>_<class tokens>' folders with images in '{folder}' (e.g. '10_sks dog').")
    dataset.notes.extend(f"folder '{name}' ignored: its name does not start with '<repeats>_'" for name in ignored)
    return dataset


def _missing_captions_message(paths: list[Path], extension: str) -> str:
    shown = ", ".join(path.name for path in paths[:5])
    more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
    return (
        f"{len(paths)} images have no caption file ({extension}): {shown}{more}. "
        f"Add a {extension} file next to each image, or set missing_captions to 'use trigger word'."
    )
