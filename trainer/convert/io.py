"""Reading tensor files with errors a user can act on, and writing them without leaving half a file."""

import errno
import json
import logging
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import safetensors
import safetensors.torch
import torch

from .errors import ConversionError

log = logging.getLogger("tunekit.convert")
T = TypeVar("T")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def check_readable(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"Input file '{path}' does not exist (or is a folder). Check the name and folder.")
    return path


def safetensors_header(path: Path) -> dict:
    """The JSON header, read and checked against the file size before any tensor is touched, so a truncated
    download gets a plain explanation instead of a decoder error halfway through a conversion."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise _truncated(path, f"only {size} bytes")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 100_000_000:
            raise _truncated(path, f"its header claims {length} bytes but the file has {size}")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _truncated(path, f"its header is not valid JSON ({error})") from None
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise _truncated(path, f"its tensors need {8 + length + end} bytes but the file has {size}")
    return header


def _truncated(path: Path, detail: str) -> ConversionError:
    return ConversionError(
        f"'{path.name}' is not a complete safetensors file: {detail}. It is truncated or corrupt; "
        "download or copy it again."
    )


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a small file (a LoRA). Pickles go through the safe loader."""
    path = check_readable(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        from .ckpt import load_pickle_state_dict

        return load_pickle_state_dict(path), {}
    header = safetensors_header(path)
    try:
        return safetensors.torch.load_file(str(path)), dict(header.get("__metadata__") or {})
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise ConversionError(f"Cannot read '{path.name}' as safetensors: {error}. Is it really a .safetensors file?") from None


def guarded_write(path: Path, write: Callable[[], T]) -> T:
    """Run a write that goes through `atomic_write`; turn disk errors into one clear message.
    The temporary file is gone by the time this raises: nothing half-written is left behind."""
    try:
        return write()
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ConversionError(
                f"The disk filled up while writing '{path.name}' in {path.parent}. Nothing was left behind; "
                "free some space (or choose another folder) and run it again."
            ) from error
        raise ConversionError(f"Could not write '{path}': {error.strerror or error}. Check the folder and its permissions.") from error


def refuse_existing(path: Path, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConversionError(f"'{path}' already exists. Choose another name, or ask to overwrite it.")
    return path
