"""Every folder a node receives is resolved and must stay inside the roots TuneKit may use."""

import os
import re
from pathlib import Path

import folder_paths

from ..trainer.errors import TuneKitError

# Extra dataset roots, separated like PATH (";" on Windows, ":" elsewhere).
DATASET_ROOTS_ENV = "TUNEKIT_DATASET_ROOTS"
# Where cached latents live (default: ComfyUI's user directory, which survives restarts unlike temp/).
CACHE_DIR_ENV = "TUNEKIT_CACHE_DIR"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,99}$")


class PathNotAllowed(TuneKitError):
    pass


def allowed_roots() -> list[Path]:
    roots = [folder_paths.get_input_directory(), folder_paths.get_output_directory(), folder_paths.get_user_directory()]
    roots.append(folder_paths.models_dir)
    roots.extend(filter(None, os.environ.get(DATASET_ROOTS_ENV, "").split(os.pathsep)))
    return [Path(root).resolve() for root in roots]


def route_roots() -> list[Path]:
    """What the browser may reach through TuneKit's routes: ComfyUI's input directory and the configured
    dataset roots only (not output/, user/ or models/, which nodes may read)."""
    roots = [folder_paths.get_input_directory(), *filter(None, os.environ.get(DATASET_ROOTS_ENV, "").split(os.pathsep))]
    return [Path(root).resolve() for root in roots]


def resolve_dataset_folder(text: str, base: Path | None = None, roots: list[Path] | None = None) -> Path:
    """A folder typed by the user: relative to `base` (ComfyUI's input directory by default), or
    absolute; either way inside one of `roots` (default: the allowed roots; symlinks resolved first)."""
    text = text.strip()
    if not text:
        raise PathNotAllowed("No dataset folder given: type a folder name inside ComfyUI's input directory.")
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        candidate = Path(base or folder_paths.get_input_directory()) / candidate
    resolved = candidate.resolve()
    roots = roots or allowed_roots()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise PathNotAllowed(
            f"'{text}' is outside the folders TuneKit may read ({', '.join(map(str, roots))}). Move the images "
            f"into ComfyUI's input folder, or add its parent to the {DATASET_ROOTS_ENV} environment variable."
        )
    return resolved


def checked_name(value: str, what: str) -> str:
    """A file or run name: no separators, no '..', nothing a path could escape with."""
    value = value.strip()
    if not SAFE_NAME.match(value) or ".." in value:
        raise PathNotAllowed(
            f"{what} '{value}' is not a plain name: use letters, digits, spaces, '_', '-' or '.' (no folders)."
        )
    return value


def cache_directory() -> Path:
    """$TUNEKIT_CACHE_DIR, or user/tunekit/cache."""
    configured = os.environ.get(CACHE_DIR_ENV, "").strip()
    return Path(configured) if configured else Path(folder_paths.get_user_directory()) / "tunekit" / "cache"


def latent_cache_directory() -> Path:
    """Where latents are cached across runs."""
    return cache_directory() / "latents"


def thumbnail_cache_directory() -> Path:
    """Where the caption editor's thumbnails are cached."""
    return cache_directory() / "thumbnails"


def run_directory(run_name: str) -> Path:
    return Path(folder_paths.get_output_directory()) / "tunekit" / checked_name(run_name, "run_name")


def loras_directory() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0])
