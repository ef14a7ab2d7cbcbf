"""The test command (README, .ci/run): provision the ComfyUI test hosts, then run the tests in them.

    python3 tools/run_tests.py [pytest arguments]                 # the CI plan, both hosts
    python3 tools/run_tests.py --comfy-version 0.3.75 [pytest arguments]   # one host only

The CI plan (no --comfy-version among the arguments):
  1. ComfyUI 0.30.0 (the newest a registry serves; what users run): every test, unit and end-to-end,
     including the ComfyUI-Manager install, SDXL, half precision and hidden optional packages.
  2. ComfyUI 0.3.75 (the oldest supported): the end-to-end tests marked `every_host` (the harness, the
     example workflows in the API and in the real frontend, the LoraLoader round trip, the import check).
With --comfy-version (or TUNEKIT_COMFY_VERSION), or with test paths among the arguments, one pytest
session runs with the arguments as given, on that host (default: the first of the plan). Needs only a Python >= 3.10 and access to PyPI (and Debian's packages, for the browser test's
Chromium); the first run downloads and builds each host (about 2 minutes each), later runs reuse them
from .cache/. With no paths among the arguments pytest runs its testpaths (tests/); with paths, only those.
"""

import logging
import os
import shutil
import subprocess
import sys
import threading
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


# (host, extra pytest arguments): the first runs everything, the others what every host must pass.
CI_PLAN = (("0.30.0", []), ("0.3.75", ["tests/e2e", "-m", "every_host"]))


def chosen_version(pytest_args: list[str]) -> str | None:
    """The host named by --comfy-version (either spelling) or TUNEKIT_COMFY_VERSION, if any."""
    for index, arg in enumerate(pytest_args):
        if arg == "--comfy-version" and index + 1 < len(pytest_args):
            return pytest_args[index + 1]
        if arg.startswith("--comfy-version="):
            return arg.split("=", 1)[1]
    return os.environ.get("TUNEKIT_COMFY_VERSION") or None


def run_session(version: str, pytest_args: list[str]) -> tuple[int, float]:
    began = time.monotonic()
    host = comfy_host.provision(version, with_test_deps=True)
    log.info("ComfyUI %s test host ready in %.0f s: %s", host.version, time.monotonic() - began, host.root)
    # No paths: pyproject's testpaths (tests/). The option reaches the e2e fixtures through tests/conftest.py.
    command = [str(host.python), "-m", "pytest", *pytest_args]
    if chosen_version(pytest_args) is None:
        command.append(f"--comfy-version={version}")
    code = subprocess.call(command, cwd=REPO, env=host.env())
    return code, time.monotonic() - began


def provision_ahead(versions: list[str]) -> threading.Thread | None:
    """Provision the later hosts while the first one's tests run (pip downloads and installs overlap them).
    A failure here is only logged: that host's own session provisions it again and reports the error."""
    def work() -> None:
        for version in versions:
            try:
                comfy_host.provision(version, with_test_deps=True)
            except Exception:  # noqa: BLE001 - reported again, properly, by run_session
                log.exception("provisioning ComfyUI %s ahead failed; its session will retry", version)

    if not versions:
        return None
    thread = threading.Thread(target=work, name="provision-ahead", daemon=True)
    thread.start()
    return thread


def main(pytest_args: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    began = time.monotonic()
    if selects(BROWSER_TEST, pytest_args):
        ensure_chromium()
    version = chosen_version(pytest_args)
    has_paths = any(not arg.startswith("-") and (REPO / arg.split("::")[0]).exists() for arg in pytest_args)
    # Given paths run once, on the named host or the first of the plan; otherwise the whole plan.
    plan = [(version or CI_PLAN[0][0], [])] if version or has_paths else CI_PLAN
    results = []
    provision_ahead([host_version for host_version, _ in plan[1:]])
    for host_version, extra in plan:
        log.info("=== ComfyUI %s: pytest %s", host_version, " ".join([*pytest_args, *extra]) or "(all tests)")
        code, seconds = run_session(host_version, [*pytest_args, *extra])
        results.append((host_version, code, seconds))
    for host_version, code, seconds in results:
        log.info("ComfyUI %s: pytest exit code %d after %.0f s (provisioning included)", host_version, code, seconds)
    log.info("Tests finished after %.0f s in all.", time.monotonic() - began)
    return next((code for _, code, _ in results if code != 0), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
