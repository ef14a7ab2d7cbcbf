"""Caption sidecar files of an image folder (`photo.png` + `photo.txt`): read them all, write edited ones
atomically, and report what changed. The caption editor's routes use these; nothing here knows about HTTP."""

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..data.captions import read_utf8
from ..data.folder import IMAGE_SUFFIXES, list_images
from ..errors import DatasetError, TuneKitError
from ..files import atomic_write

EXTENSION = re.compile(r"^\.[A-Za-z0-9_-]{1,16}$")


@dataclass(frozen=True)
class CaptionEntry:
    image: str  # relative to the folder, "/"-separated
    caption: str  # the file's text ("" without a file), trailing newlines dropped
    has_file: bool
    size: int  # the image's bytes and mtime: what a thumbnail is keyed by
    mtime_ns: int
    error: str = ""  # why the caption file could not be read (then `caption` is "")


@dataclass
class CaptionWrites:
    written: list[str] = field(default_factory=list)  # images whose caption file changed
    unchanged: list[str] = field(default_factory=list)  # images whose caption file already had that text


class PathOutsideFolder(TuneKitError):
    """An image name that leads out of its dataset folder ('..', absolute, or through a symlink)."""


def checked_extension(extension: str) -> str:
    """'.txt' for 'txt' or '.txt'; anything that is not a plain file extension raises a DatasetError."""
    extension = extension.strip()
    extension = extension if extension.startswith(".") else f".{extension}"
    if not EXTENSION.match(extension) or extension.lower() in IMAGE_SUFFIXES:
        raise DatasetError(f"Caption extension {extension!r} is not a caption file extension: use e.g. '.txt' or '.caption'.")
    return extension


def inside(path: Path, folder: Path) -> bool:
    """True when `path`, symlinks resolved, lies inside `folder` (itself resolved)."""
    return path.resolve().is_relative_to(folder.resolve())


def image_in_folder(folder: Path, name: str) -> Path:
    """The image `name` (relative, "/"-separated) of `folder`. Absolute names, '..', symlinks that lead out
    of the folder and files that are not images raise a PathOutsideFolder or DatasetError."""
    relative = PurePosixPath(name)
    if not name or relative.is_absolute() or ".." in relative.parts or "\\" in name:
        raise PathOutsideFolder(f"Image name {name!r} is not a plain relative name inside the dataset folder.")
    path = folder / relative
    if not inside(path, folder):
        raise PathOutsideFolder(f"Image {name!r} leads outside the dataset folder {folder} (a symlink?).")
    if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
        raise DatasetError(f"{name!r} is not an image file of {folder}: reload the list, the file may have moved.")
    return path


def read_caption_text(path: Path) -> str | None:
    """The caption file's whole text (trailing newlines dropped), None without a file."""
    if not path.is_file():
        return None
    return read_utf8(path, "caption").rstrip("\r\n")


def read_folder_captions(folder: Path, extension: str = ".txt", recursive: bool = False) -> list[CaptionEntry]:
    """Every image of `folder` (sorted; symlinks leading out of it left out) with its caption."""
    entries, real_folder, leaves = [], folder.resolve(), {}
    for image in list_images(folder, recursive):
        if _leads_out(image, folder, real_folder, leaves):
            continue
        stat = image.stat()
        caption, error = None, ""
        try:
            caption = read_caption_text(image.with_suffix(extension))
        except DatasetError as problem:
            error = str(problem)
        entries.append(CaptionEntry(image.relative_to(folder).as_posix(), caption or "", caption is not None or bool(error),
                                    stat.st_size, stat.st_mtime_ns, error))
    return entries


def _leads_out(image: Path, folder: Path, real_folder: Path, leaves: dict[Path, bool]) -> bool:
    """True when a symlink (the file or a subfolder) leads out of the folder. Resolving every path costs
    more than reading 1,000 captions, so only symlinks and each subfolder once are resolved."""
    if image.is_symlink():
        return not image.resolve().is_relative_to(real_folder)
    if image.parent == folder:
        return False
    if image.parent not in leaves:
        leaves[image.parent] = not image.parent.resolve().is_relative_to(real_folder)
    return leaves[image.parent]


def folders_with_images(root: Path) -> list[tuple[Path, int]]:
    """`root` and its subfolders (one level, hidden ones and symlinks leading out of `root` left out) that hold
    images, each with how many it holds directly."""
    real_root = root.resolve()
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = []
    for folder in candidates:
        if not folder.resolve().is_relative_to(real_root):
            continue
        count = sum(not _leads_out(image, folder, real_root, {}) for image in list_images(folder))
        if count:
            found.append((folder, count))
    return found


def write_captions(folder: Path, captions: Mapping[str, str], extension: str = ".txt",
                   expected: Mapping[str, str] | None = None) -> CaptionWrites:
    """Write each image's caption file whose text differs, one atomic replace per file.

    `expected` holds the text each file had when the editor read it ("" for none): a file that changed on
    disk since (another program, an Auto Caption run) raises CaptionsChangedOnDisk instead of being
    overwritten. Every name and expectation is checked before anything is written, so one problem writes nothing.
    """
    targets = [(name, image_in_folder(folder, name).with_suffix(extension), text) for name, text in captions.items()]
    current = {name: _current_text(path) for name, path, _ in targets}
    changed = [name for name, text in (expected or {}).items() if name in current and (current[name] or "") != text]
    if changed:
        raise CaptionsChangedOnDisk(
            f"{len(changed)} caption file(s) changed on disk since they were read (e.g. {changed[0]!r}): nothing was "
            "saved. Press Reload to see the new text, then make your edits again.", changed)
    result = CaptionWrites()
    for name, path, text in targets:
        if current[name] == text.rstrip("\r\n"):
            result.unchanged.append(name)
            continue
        atomic_write(path, lambda temp, text=text: temp.write_text(text, encoding="utf-8"))
        result.written.append(name)
    return result


def _current_text(path: Path) -> str | None:
    try:
        return read_caption_text(path)
    except DatasetError:
        return None  # not UTF-8: the user's new text replaces it


class CaptionsChangedOnDisk(TuneKitError):
    def __init__(self, message: str, images: list[str]):
        super().__init__(message)
        self.images = images
