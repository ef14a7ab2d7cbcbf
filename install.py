"""ComfyUI-Manager runs this after `pip install -r requirements.txt`.

It only checks the environment and reports; it installs nothing, edits no paths and is
safe to run any number of times.
"""

import importlib.util
import logging
import sys

MIN_PYTHON = (3, 10)
MIN_TORCH = (2, 1)
REQUIRED_MODULES = ("numpy", "PIL", "safetensors")

log = logging.getLogger("tunekit.install")


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def problems() -> list[str]:
    found = []
    if sys.version_info < MIN_PYTHON:
        found.append(f"Python {sys.version.split()[0]} is too old: TuneKit needs Python >= 3.10.")
    for module in REQUIRED_MODULES:
        if importlib.util.find_spec(module) is None:
            found.append(f"Module '{module}' is missing: run `pip install -r requirements.txt` in ComfyUI's environment.")
    if importlib.util.find_spec("torch") is None:
        found.append("torch is missing: TuneKit uses the torch that ComfyUI runs on; install ComfyUI first.")
    else:
        import torch

        if _version_tuple(torch.__version__) < MIN_TORCH:
            found.append(f"torch {torch.__version__} is too old: TuneKit needs torch >= 2.1 (update ComfyUI's torch).")
    return found


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    found = problems()
    for problem in found:
        log.error("TuneKit: %s", problem)
    if not found:
        log.info("TuneKit: environment OK (Python %s).", sys.version.split()[0])
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
