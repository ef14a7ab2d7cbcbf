"""Test-only: put on a ComfyUI server's PYTHONPATH by tests/e2e/test_good_guest.py to make packages absent.

TUNEKIT_TEST_HIDE      comma-separated top-level modules made absent, as if never installed: every import
                       finder (and importlib.metadata) stops seeing them, so `import x` raises
                       ModuleNotFoundError and probes such as importlib.util.find_spec("x") give None.
TUNEKIT_TEST_HIDE_LOG  a file that gets one JSON line per attempt to import a hidden module: the module
                       and the files on the importing stack, so a test can tell who tried.
(A package that is installed but broken is a real package the test writes, whose import raises.)
"""
import json
import os
import re
import sys
import traceback

HIDDEN = {name.strip() for name in os.environ.get("TUNEKIT_TEST_HIDE", "").split(",") if name.strip()}
LOG = os.environ.get("TUNEKIT_TEST_HIDE_LOG")


def _hidden(name):
    return name.partition(".")[0] in HIDDEN


def _record(name):
    if LOG:
        stack = [frame.filename for frame in traceback.extract_stack()[:-2]]
        with open(LOG, "a") as out:
            out.write(json.dumps({"module": name, "stack": stack}) + "\n")


class _Filtered:
    """Wraps one meta-path finder: hidden modules and their distributions are not there."""

    def __init__(self, finder, records):
        self._finder, self._records = finder, records

    def find_spec(self, name, path=None, target=None):
        if _hidden(name):
            if self._records:
                _record(name)
            return None
        find = getattr(self._finder, "find_spec", None)
        return find(name, path, target) if find else None

    def find_distributions(self, *args, **kwargs):
        found = getattr(self._finder, "find_distributions", None)
        for dist in found(*args, **kwargs) if found else ():
            name = re.sub(r"[-_.]+", "_", (dist.metadata["Name"] or "")).lower()
            if name not in {re.sub(r"[-_.]+", "_", h).lower() for h in HIDDEN}:
                yield dist

    def __getattr__(self, attr):
        return getattr(self._finder, attr)


if HIDDEN:
    sys.meta_path[:] = [_Filtered(finder, index == 0) for index, finder in enumerate(sys.meta_path)]
