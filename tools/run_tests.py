"""The test command (README, .ci/run): provision the ComfyUI test host, then run every test in it.

    python3 tools/run_tests.py [pytest arguments]

Needs only a Python >= 3.10 and access to PyPI (and Debian's packages, for the browser test's
Chromium); the first run downloads and builds the host (about 2 minutes), later runs reuse it
from .cache/. With no paths among the arguments pytest runs its testpaths (tests/); with paths,
only those.
"""

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import comfy_host  # noqa: E402

log = logging.getLogger("tunekit.tests")
CHROMIUM = Path("/usr/bin/chromium")
BROWSER_TEST = REPO / "tests" / "e2e" / "test_ui.py"


def selects(test_file: Path, pytest_args: list[str]) -> bool:
    """Whether these arguments run test_file: no path among them (all of tests/) or a path holding it."""
    paths = [REPO / arg.split("::")[0] for arg in pytest_args if not arg.startswith("-")]
    paths = [path.resolve() for path in paths if path.exists()]
    return not paths or any(path == test_file or path in test_file.parents for path in paths)


def ensure_chromium() -> None:
    """Install Debian's Chromium for the browser test when it is missing (CI runs as root on a fresh machine).

    Without root or apt-get the test skips and says why; a failed install stops the run."""
    if CHROMIUM.exists():
        return
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        log.warning("%s is missing and needs root and apt-get to install: the browser test will skip", CHROMIUM)
        return
    began, log_path = time.monotonic(), REPO / ".cache" / "apt-chromium.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-qq", "--no-install-recommends", "chromium", "fonts-liberation"]
    log.info("Installing Debian's chromium for the browser test (log: %s)", log_path)
    with open(log_path, "a") as out:
        def run(args: list[str]) -> int:
            return subprocess.run(args, check=False, stdout=out, stderr=subprocess.STDOUT, env=env).returncode

        # Package lists may be missing or stale on a fresh machine: update only when the install needs it.
        if run(install) != 0 and (run([apt, "update", "-qq"]) != 0 or run(install) != 0):
            raise SystemExit(f"apt-get could not install chromium; see {log_path}")
    log.info("chromium installed in %.0f s", time.monotonic() - began)


def main(pytest_args: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    began = time.monotonic()
    if selects(BROWSER_TEST, pytest_args):
        ensure_chromium()
    host = comfy_host.provision(with_test_deps=True)
    log.info("ComfyUI %s test host ready in %.0f s: %s", host.version, time.monotonic() - began, host.root)
    command = [str(host.python), "-m", "pytest", *pytest_args]  # no paths: pyproject's testpaths (tests/)
    code = subprocess.call(command, cwd=REPO, env=host.env())
    log.info("Tests finished with exit code %d after %.0f s in all.", code, time.monotonic() - began)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
