"""End-to-end fixtures: ONE real ComfyUI server per test session, driven over HTTP.

Run inside the host's venv (provisioned by `python3 tools/comfy_host.py provision --test-deps`):

    .cache/hosts/comfyui-0.3.75/venv/bin/python -m pytest tests/e2e -q

The host version comes from `--comfy-version` or TUNEKIT_COMFY_VERSION (default 0.3.75). The server
is shared by every test, so tests must not depend on each other's leftovers: use unique filename
prefixes. Tests marked `every_host` are the ones tools/run_tests.py also runs on the second host.
"""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import comfy_host as harness

E2E_DIR = Path(__file__).resolve().parent
# A test-only custom node reporting global torch state (tests/e2e/probe_node): never shipped.
PROBE_NODE = {"tunekit_test_probe": E2E_DIR / "probe_node"}
_LOG_MARK = pytest.StashKey[int]()
DATASET_ROOT = "dataset_root"  # in the shared server's workdir, listed in its TUNEKIT_DATASET_ROOTS


def host_version() -> str:
    return os.environ.get("TUNEKIT_COMFY_VERSION") or harness.DEFAULT_VERSION


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test against a real ComfyUI server (tools/comfy_host.py)")
    config.addinivalue_line("markers", "every_host: runs on every ComfyUI host in .ci/run, not only the main one")


def pytest_collection_modifyitems(config, items):
    # Everything under tests/e2e needs the server: mark it here so no test can forget.
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def comfy_host() -> "harness.Host":
    """The provisioned host; provision() only checks its stamps when the host is already built."""
    return harness.provision(host_version())


@pytest.fixture(scope="session")
def comfy(comfy_host, tmp_path_factory) -> "harness.ComfyServer":
    """A running ComfyUI with TuneKit linked in as ComfyUI-TuneKit (and the test-only torch-state probe);
    its folders live in a temp workdir, with `dataset_root/` there configured as an extra dataset root."""
    workdir = tmp_path_factory.mktemp("comfy")
    (workdir / DATASET_ROOT).mkdir()
    server = harness.start_server(comfy_host, workdir, extra_nodes=PROBE_NODE,
                                  env={"TUNEKIT_DATASET_ROOTS": str(workdir / DATASET_ROOT)})
    yield server
    server.stop()


@pytest.fixture(scope="session")
def demo_files(comfy) -> dict:
    """The files example_workflows/ name, placed once: a tiny random SD1.5 checkpoint in models/checkpoints
    and the bundled demo dataset (assets/demo_dataset, trigger word tkdemo) in input/tunekit_dataset."""
    import shutil

    import tiny_models  # torch: only sessions that need the checkpoint pay for the import

    checkpoint = comfy.models_dir / "checkpoints" / "tunekit_tiny_sd15.safetensors"
    dataset = comfy.input_dir / "tunekit_dataset"
    if not checkpoint.exists():
        tiny_models.make_sd15(checkpoint)
    if not dataset.exists():
        shutil.copytree(REPO / "assets" / "demo_dataset", dataset)
    return {"checkpoint": checkpoint, "dataset": dataset}


def pytest_runtest_call(item):
    server = getattr(item, "funcargs", {}).get("comfy")
    if server is not None:
        item.stash[_LOG_MARK] = server.log_mark()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # A failed e2e test shows what the server logged while it ran: tracebacks live there.
    outcome = yield
    report = outcome.get_result()
    server = getattr(item, "funcargs", {}).get("comfy")
    if report.when == "call" and report.failed and server is not None and _LOG_MARK in item.stash:
        report.sections.append(("ComfyUI server log during this test", server.log_text(item.stash[_LOG_MARK])))
