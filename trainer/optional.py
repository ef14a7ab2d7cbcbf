"""Optional third-party packages: imported inside the feature that needs them, never when ComfyUI loads
TuneKit, so an absent or broken one disables that feature alone and every other node keeps working.

    bnb = require("bitsandbytes", "8-bit AdamW")   # inside the function that builds the optimizer

A package that is installed but fails to load (bitsandbytes without its CUDA libraries raises
RuntimeError or OSError, not ImportError) counts as missing: the error names the package, the
feature and the command that installs it, and chains the original failure.
"""

import importlib
import logging
import sys
from dataclasses import dataclass
from types import ModuleType

from .errors import TuneKitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptionalPackage:
    module: str  # what `import` names
    pip_name: str  # what `pip install` names
    enables: str  # what a user loses without it


# Every optional package TuneKit may import, and what its absence disables. Required packages
# (numpy, Pillow, safetensors, torch) are in requirements.txt or come with ComfyUI. Register one here before importing it
# through `require`; tests/e2e/test_good_guest.py hides each one from a running host.
OPTIONAL_PACKAGES: dict[str, OptionalPackage] = {
    "bitsandbytes": OptionalPackage("bitsandbytes", "bitsandbytes", "the 'adamw8bit' optimizer"),
    "pytorch_optimizer": OptionalPackage("pytorch_optimizer", "pytorch-optimizer",
                                         "the 'lion', 'prodigy' and 'schedule_free_adamw' optimizers"),
    "onnxruntime": OptionalPackage("onnxruntime", "onnxruntime", "auto-captioning with WD14 taggers"),
    "accelerate": OptionalPackage("accelerate", "accelerate", "headless training on several GPUs (accelerate launch)"),
    # In requirements.txt, so installed with TuneKit; a broken install must still leave training working.
    "diffusers.optimization": OptionalPackage("diffusers.optimization", "diffusers",
                                              "learning-rate schedules other than 'constant'"),
}


class MissingPackage(TuneKitError):
    def __init__(self, module: str, feature: str, pip_name: str, reason: str):
        self.module, self.feature, self.pip_name = module, feature, pip_name
        super().__init__(
            f"{feature} needs the Python package '{pip_name}', which {reason}. Install it into ComfyUI's "
            f"environment ({sys.executable} -m pip install {pip_name}) and restart ComfyUI; "
            f"every other TuneKit feature works without it."
        )


def require(module: str, feature: str, pip_name: str | None = None) -> ModuleType:
    """Import an optional package for `feature`, or raise MissingPackage saying how to install it."""
    known = OPTIONAL_PACKAGES.get(module)
    pip_name = pip_name or (known.pip_name if known else module.split(".")[0])
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name and not module.startswith(error.name) and not error.name.startswith(module):
            reason = f"is installed but cannot import its dependency '{error.name}'"
        else:
            reason = "is not installed"
        raise MissingPackage(module, feature, pip_name, reason) from error
    except Exception as error:  # noqa: BLE001 - a broken install must not look like a TuneKit bug
        log.debug("importing %s failed", module, exc_info=True)
        raise MissingPackage(module, feature, pip_name,
                             f"is installed but failed to load ({type(error).__name__}: {error})") from error


def available(module: str) -> bool:
    """Whether `require(module, ...)` would succeed (imports it: call it only when the feature is used)."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001
        return False
    return True
