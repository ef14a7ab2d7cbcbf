"""A folder of images with caption sidecars (`photo.png` + `photo.txt`)."""

import logging
from pathlib import Path

from ..errors import DatasetError
from .dataset import Dataset, SkippedImage, TrainImage
from .images import ImageLoadError, load_rgb

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# What to do with an image that has no caption file.
MISSING_CAPTION_POLICIES = ("error", "use trigger word")


def scan_image_folder(
    folder: Path,
    caption_extension: str = ".txt",
    trigger_word: str = "",
    missing_caption: str = "error",
) -> Dataset:
    """Read every image in `folder` (not recursive) with its caption.

    Unreadable images are skipped and listed; a missing caption follows `missing_caption`.
    """
    if not folder.is_dir():
        raise DatasetError(f"Dataset folder not found: '{folder}'. Pick an existing folder of training images.")
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(
            f"No images in '{folder}' (looked for {', '.join(IMAGE_SUFFIXES)}). "
            "Put your training images there, each with a caption file of the same name."
        )
    images, skipped, uncaptioned = [], [], []
    for path in files:
        try:
            load_rgb(path)
        except ImageLoadError as error:
            log.warning("TuneKit skips %s: %s", path, error.reason)
            skipped.append(SkippedImage(str(path), error.reason))
            continue
        caption = _read_caption(path.with_suffix(caption_extension))
        if caption is None:
            uncaptioned.append(path)
            if missing_caption == "error":
                continue
            caption = ""
        images.append(TrainImage(str(path), _with_trigger(caption, trigger_word)))
    if uncaptioned and missing_caption == "error":
        raise DatasetError(_missing_captions_message(uncaptioned, caption_extension))
    if not images:
        raise DatasetError(f"None of the {len(files)} images in '{folder}' could be read; see the skipped list in the log.")
    return Dataset(images, skipped)


def _read_caption(path: Path) -> str | None:
    if not path.is_file():
        return None
    return " ".join(path.read_text(encoding="utf-8", errors="replace").split())


def _with_trigger(caption: str, trigger_word: str) -> str:
    trigger_word = trigger_word.strip()
    if not trigger_word or trigger_word in caption:
        return caption or trigger_word
    return f"{trigger_word}, {caption}" if caption else trigger_word


def _missing_captions_message(paths: list[Path], extension: str) -> str:
    shown = ", ".join(path.name for path in paths[:5])
    more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
    return (
        f"{len(paths)} images have no caption file ({extension}): {shown}{more}. "
        f"Add a {extension} file next to each image, or set missing_captions to 'use trigger word'."
    )
