"""The test command (README, .ci/run): provision the ComfyUI test host, then run every test in it.

    python3 tools/run_tests.py [pytest arguments]

Needs only a Python >= 3.10 and access to PyPI; the first run downloads and builds the host
(about 2 minutes), later runs reuse it from .cache/.
"""

import logging
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import comfy_host  # noqa: E402

log = logging.getLogger("tunekit.tests")


def main(pytest_args: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    began = time.monotonic()
    host = comfy_host.provision(with_test_deps=True)
    log.info("ComfyUI %s test host ready in %.0f s: %s", host.version, time.monotonic() - began, host.root)
    command = [str(host.python), "-m", "pytest", "tests", *pytest_args]
    code = subprocess.call(command, cwd=REPO, env=host.env())
    log.info("Tests finished with exit code %d after %.0f s in all.", code, time.monotonic() - began)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
