"""Reading `.ckpt` / `.pt` pickles without running them.

A pickle can call any Python function while it loads, so a `.ckpt` from the internet can run code. TuneKit
reads them only through `torch.load(weights_only=True)`, whose unpickler builds tensors and plain containers
and refuses every other global. Two kinds of harmless training leftovers are let through as data: numpy
scalars (a `global_step`) and Lightning's `ModelCheckpoint` callback state, rebuilt as an inert stand-in
whose state is thrown away. Anything else is refused, with the names the file asked for.
"""

import logging
import pickle
import zipfile
from pathlib import Path

import torch

from .errors import ConversionError, UnsafeCheckpointError

log = logging.getLogger("tunekit.convert")

# Training-loop state Lightning pickles next to the weights: we only need it to not stop the load.
_LIGHTNING_LEFTOVERS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
)


class DiscardedTrainingState:
    """Stands in for a training-only object in a checkpoint: built from data, keeps nothing, runs nothing."""

    def __setstate__(self, state) -> None:
        pass


def _allowed_globals() -> list:
    allowed: list = [(DiscardedTrainingState, name) for name in _LIGHTNING_LEFTOVERS]
    try:  # numpy scalars (e.g. a global_step) are plain data: a dtype and its bytes
        import numpy

        core = getattr(numpy, "_core", None) or numpy.core
        allowed += [(core.multiarray.scalar, f"{module}.multiarray.scalar") for module in ("numpy.core", "numpy._core")]
        allowed += [numpy.dtype] + [type(numpy.dtype(name)) for name in ("int64", "int32", "float64", "float32")]
    except (ImportError, AttributeError):
        pass
    return allowed


def load_pickle(path: Path, mmap: bool = True) -> object:
    """The unpickled object, tensors memory-mapped where the file format allows (no copy in RAM)."""
    path = Path(path)
    zipped = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"'{path.name}' is a pickle that needs code to load ({_needed_globals(path, zipped, error)}). TuneKit "
            "never runs code from a model file. Get a .safetensors version of this model, or convert it with a "
            "tool you trust in an isolated environment."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as error:
        raise ConversionError(
            f"'{path.name}' cannot be read as a PyTorch checkpoint ({str(error).splitlines()[0]}). It is truncated, "
            "corrupt, or not a checkpoint; download or copy it again."
        ) from None


def _needed_globals(path: Path, zipped: bool, error: Exception) -> str:
    if zipped:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            if names:
                return "it asks for " + ", ".join(sorted(names)[:5])
        except Exception as listing_error:  # noqa: BLE001 - only decorates the message
            log.debug("Could not list the globals of %s: %s", path, listing_error)
    return str(error).splitlines()[0]


def state_dict_of(loaded: object, name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights of a loaded checkpoint and what was left out: Lightning keeps them under `state_dict`,
    next to optimizer states, callbacks and counters that a model file does not need."""
    if not isinstance(loaded, dict):
        raise ConversionError(f"'{name}' holds a {type(loaded).__name__}, not a dictionary of weights.")
    inner = loaded.get("state_dict", loaded)
    dropped = [key for key in loaded if key != "state_dict"] if inner is not loaded else []
    if not isinstance(inner, dict):
        raise ConversionError(f"'{name}' has a 'state_dict' entry that is a {type(inner).__name__}, not weights.")
    tensors = {key: value for key, value in inner.items() if isinstance(value, torch.Tensor)}
    dropped += [key for key in inner if key not in tensors]
    if not tensors:
        raise ConversionError(f"'{name}' contains no tensors: it is not a model checkpoint.")
    return tensors, dropped


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    tensors, dropped = state_dict_of(load_pickle(path), Path(path).name)
    if dropped:
        log.info("Left out of %s: %s (training state, not weights)", Path(path).name, ", ".join(map(str, dropped[:8])))
    return tensors
