"""Make the checkout importable as the package `tunekit` without running its ComfyUI entry point."""

import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if "tunekit" not in sys.modules:
    package = types.ModuleType("tunekit")
    package.__path__ = [str(REPO)]
    sys.modules["tunekit"] = package
