"""Make the checkout importable as the package `tunekit` without running its ComfyUI entry point,
and pick the ComfyUI host the end-to-end tests run against."""

import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFY_VERSION_ENV = "TUNEKIT_COMFY_VERSION"

if "tunekit" not in sys.modules:
    package = types.ModuleType("tunekit")
    package.__path__ = [str(REPO)]
    sys.modules["tunekit"] = package


def pytest_addoption(parser):
    # Here, not in tests/e2e/conftest.py: pytest reads options only from the root conftest.
    parser.addoption("--comfy-version", default=None, metavar="VERSION",
                     help=f"ComfyUI host of the end-to-end tests (tools/comfy_host.py HOSTS); "
                          f"default ${COMFY_VERSION_ENV}, else the harness's default (0.3.75)")


def pytest_configure(config):
    # One switch: the option wins, then the environment; child processes (tools) see the same choice.
    chosen = config.getoption("--comfy-version")
    if chosen:
        os.environ[COMFY_VERSION_ENV] = chosen


def pytest_report_header(config):
    return f"ComfyUI host for end-to-end tests: {os.environ.get(COMFY_VERSION_ENV) or 'the default (0.3.75)'}"
