"""File writes that never leave half a file behind and never overwrite a user's file unasked."""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temp_path)` on a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temp_path = Path(temp_name)
    try:
        write(temp_path)
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)
    return path


def unused_path(path: Path) -> Path:
    """`path`, or `name_2.ext`, `name_3.ext`, ... whichever does not exist yet."""
    candidate, counter = path, 2
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}_{counter}{path.suffix}")
        counter += 1
    return candidate


def free_bytes(folder: Path) -> int | None:
    """Free space on the disk `folder` is (or will be) on; None where the disk cannot be asked."""
    existing = next((parent for parent in (folder, *folder.parents) if parent.exists()), None)
    try:
        return shutil.disk_usage(existing).free if existing else None
    except OSError:
        return None


def write_failure(folder: Path, error: Exception) -> str:
    """'(SafetensorError: ...; 3.2 GB free there)': why a write into `folder` failed and the room left there."""
    free = free_bytes(folder)
    space = f"; {readable_size(free)} free there" if free is not None else ""
    return f"({type(error).__name__}: {error}{space})"


def readable_size(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
