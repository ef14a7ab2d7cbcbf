"""Captions of a `Dataset` in the graph: change them (returning a new Dataset, files untouched) and save them
to `.txt` sidecars beside the images, atomically, never replacing an existing file unless asked."""

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..data.captions import read_utf8
from ..data.dataset import Dataset, Subset, TrainImage
from ..errors import DatasetError, TuneKitError
from ..files import atomic_write

log = logging.getLogger(__name__)

# Save modes: write only captions that have no sidecar yet, or also replace sidecars whose text differs.
SAVE_MODES = ("only missing", "overwrite")


@dataclass(frozen=True)
class CaptionChange:
    image: str
    before: str
    after: str


def map_captions(dataset: Dataset, change: Callable[[TrainImage], str]) -> tuple[Dataset, list[CaptionChange]]:
    """A new Dataset whose images carry `change(image)` as caption, and the captions that changed."""
    changes = []

    def changed(image: TrainImage) -> TrainImage:
        after = change(image)
        if after == image.caption:
            return image
        changes.append(CaptionChange(image.name, image.caption, after))
        return replace(image, caption=after)

    subsets = [replace(subset, images=[changed(image) for image in subset.images]) for subset in dataset.subsets]
    return Dataset(subsets, dataset.skipped, dataset.notes), changes


def sidecar_path(image: TrainImage, subset: Subset) -> Path | None:
    """Where the image's caption file is (`photo.png` -> `photo.txt`); None for images from the graph."""
    if image.pixels is not None:
        return None
    return Path(image.source).with_suffix(subset.caption_extension)


def has_caption_file(image: TrainImage, subset: Subset) -> bool:
    """Whether the image has a caption file with some text (an empty file counts as none)."""
    path = sidecar_path(image, subset)
    return path is not None and bool(_current_text(path))


def changes_summary(changes: list[CaptionChange], total: int, what: str, examples: int = 3) -> str:
    lines = [f"{what}: changed {len(changes)} of {total} captions."]
    lines += [f"  {c.image}: {c.before!r} -> {c.after!r}" for c in changes[:examples]]
    if len(changes) > examples:
        lines.append(f"  ... and {len(changes) - examples} more")
    return "\n".join(lines)


@dataclass
class SaveReport:
    mode: str
    created: list[str] = field(default_factory=list)  # sidecars that did not exist
    overwritten: list[str] = field(default_factory=list)  # sidecars whose text was replaced
    unchanged: list[str] = field(default_factory=list)  # sidecars that already hold the caption
    kept: list[str] = field(default_factory=list)  # existing sidecars that differ, left alone ("only missing")
    no_file: list[str] = field(default_factory=list)  # images from the graph: nowhere to put a sidecar

    def summary(self) -> str:
        lines = [f"Saved captions ({self.mode}): {len(self.created)} created, {len(self.overwritten)} overwritten, "
                 f"{len(self.unchanged)} unchanged."]
        if self.kept:
            lines.append(f"Kept {len(self.kept)} existing caption files that differ (e.g. {self.kept[0]}): "
                         "choose mode 'overwrite' to replace them.")
        if self.no_file:
            lines.append(f"{len(self.no_file)} images came from the graph and have no file to put a caption beside: "
                         "use 'Save Dataset as kohya TOML' for them.")
        for name, paths in (("created", self.created), ("overwritten", self.overwritten)):
            lines += [f"  {name}: {path}" for path in paths[:20]]
        return "\n".join(lines)


def save_captions(dataset: Dataset, mode: str = "only missing", check_path: Callable[[Path], None] | None = None) -> SaveReport:
    """Write each image's caption to its sidecar, one atomic replace per file, following `mode` (SAVE_MODES).

    `check_path(path)` may raise to refuse a sidecar outside the allowed folders; every path is checked
    before anything is written, so a refused one writes nothing.
    """
    if mode not in SAVE_MODES:
        raise TuneKitError(f"Save mode {mode!r} is not one of {', '.join(SAVE_MODES)}.")
    targets = [(sidecar_path(image, subset), image) for subset in dataset.subsets for image in subset.images]
    for path, _ in targets:
        if path is not None and check_path:
            check_path(path)
    report = SaveReport(mode)
    for path, image in targets:
        if path is None:
            report.no_file.append(image.name)
            continue
        current = _current_text(path)
        text = image.caption.strip()
        if current == text:
            report.unchanged.append(str(path))
        elif current is not None and mode == "only missing":
            report.kept.append(str(path))
        else:
            atomic_write(path, lambda temp, text=text: temp.write_text(text, encoding="utf-8"))
            (report.created if current is None else report.overwritten).append(str(path))
    log.info("TuneKit: %s", report.summary().splitlines()[0])
    return report


def _current_text(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        return read_utf8(path, "caption").strip()
    except DatasetError:
        return ""  # not UTF-8: differs from any caption, replaced only in 'overwrite' mode
