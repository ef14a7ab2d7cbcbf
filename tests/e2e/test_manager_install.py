"""TuneKit installed the way users install it: ComfyUI-Manager's own `cm-cli` (PyPI comfyui-manager, the
version the host pins in manager_requirements.txt) clones it from a git URL, runs `pip install -r
requirements.txt` and `install.py`. Then ComfyUI starts with `--enable-manager`, every TuneKit node is
registered and the example workflow runs; the host's packages are unchanged, and a second install changes
nothing.

The URL is a bare clone of the committed HEAD (`file://localhost/...`: the Manager refuses `file:///`).
The install goes into a copy of the ComfyUI source tree (45 MB) that shares the host's venv: the Manager
really installs into that venv, and no second 2 GB environment is built. Only hosts that ship a
manager_requirements.txt (0.30.0) run this; 0.3.75 has no `--enable-manager`.
"""
import dataclasses
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

import comfy_host as harness

from .guest import REPO, demo_prompt, place_demo_files, tunekit_node_ids

NAME = "ComfyUI-TuneKit"  # the Manager names the folder after the URL's last part


def _run(args: list, log: Path, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)
    with open(log, "a") as out:  # the Manager's clone progress bars are long: keep them out of the report
        out.write(f"$ {' '.join(map(str, args))}  -> {done.returncode}\n{done.stdout}\n{done.stderr}\n")
    return done


@dataclasses.dataclass
class Install:
    root: Path
    host: harness.Host  # the host with its ComfyUI tree replaced by the copy the Manager installs into
    url: str
    log: Path

    @property
    def folder(self) -> Path:
        return self.host.comfy_dir / "custom_nodes" / NAME

    def cm_cli(self) -> subprocess.CompletedProcess:
        cm_cli = self.host.python.parent / "cm-cli"
        env = self.host.env({"COMFYUI_PATH": str(self.host.comfy_dir)})
        return _run([cm_cli, "install", self.url], self.log, cwd=self.root, env=env, timeout=600)

    def packages(self) -> dict[str, list[str]]:
        python = str(self.host.python)
        freeze = _run([python, "-m", "pip", "freeze", "--all", "--disable-pip-version-check"], self.log)
        check = _run([python, "-m", "pip", "check", "--disable-pip-version-check"], self.log)
        torch = _run([python, "-c", "import torch; print(torch.__version__)"], self.log)
        return {"freeze": sorted(freeze.stdout.splitlines()), "check": sorted(check.stdout.splitlines()),
                "torch": [torch.stdout.strip()]}

    def tree_state(self) -> dict[str, int]:
        return {str(p.relative_to(self.folder)): p.stat().st_mtime_ns for p in self.folder.rglob("*")
                if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def install(comfy_host, tmp_path_factory) -> Install:
    if not (comfy_host.comfy_dir / harness.MANAGER_REQUIREMENTS).is_file():
        pytest.skip(f"ComfyUI {comfy_host.version} pins no ComfyUI-Manager (0.30.0 does)")
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the Manager installs from a git URL of the committed HEAD")
    root = tmp_path_factory.mktemp("manager")
    tree = root / "ComfyUI"
    shutil.copytree(comfy_host.comfy_dir, tree, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    origin = root / f"{NAME}.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(REPO), str(origin)], check=True, capture_output=True)
    return Install(root, dataclasses.replace(comfy_host, comfy_dir=tree), f"file://localhost{origin}",
                   root / "manager.log")


@pytest.fixture(scope="module")
def first_install(install) -> dict:
    before = install.packages()
    done = install.cm_cli()
    return {"before": before, "after": install.packages(), "result": done}


def test_cm_cli_clones_tunekit_and_runs_its_install_steps(install, first_install):
    done = first_install["result"]
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "[INSTALLED]" in output, f"see {install.log}:\n{output[-3000:]}"
    head = subprocess.run(["git", "-C", str(install.folder), "rev-parse", "HEAD"], capture_output=True, text=True)
    committed = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert head.stdout.strip() == committed.stdout.strip()
    assert "pip', \n'install', 'safetensors>=0.4.2'" in output or "'safetensors>=0.4.2'" in output
    assert "TuneKit: environment OK" in output, "install.py did not run (or found a problem)"


def test_the_install_keeps_torch_and_adds_no_package_or_conflict(first_install):
    before, after = first_install["before"], first_install["after"]
    assert after["torch"] == before["torch"]
    added = sorted(set(after["freeze"]) - set(before["freeze"]))
    removed = sorted(set(before["freeze"]) - set(after["freeze"]))
    assert (added, removed) == ([], []), "the install changed the host's packages"
    assert not [line for line in after["freeze"] if line.split("==")[0].lower() in ("torchvision", "xformers")]
    assert sorted(set(after["check"]) - set(before["check"])) == [], "pip check reports new problems"


def test_comfyui_with_the_manager_loads_every_node_and_runs_the_example(install, first_install, demo_files,
                                                                         tmp_path_factory):
    workdir = tmp_path_factory.mktemp("manager-server")
    server = harness.start_server(install.host, workdir, node_link_name=None, extra_args=["--enable-manager"])
    try:
        log = server.log_text()
        assert "ComfyUI-Manager" in log, "the server did not start the Manager"
        assert f"custom_nodes/{NAME}" in log and "IMPORT FAILED" not in log.split("Import times")[-1]
        expected = tunekit_node_ids(install.folder)
        assert len(expected) >= 4
        assert expected <= server.object_info().keys(), sorted(expected - server.object_info().keys())
        place_demo_files(server, demo_files)
        prefix = f"mgr{uuid.uuid4().hex[:6]}"
        history = server.run(demo_prompt(server, install.folder, steps=3, prefix=prefix), timeout=600)
        images = [path for path in server.output_files(history) if path.suffix == ".png"]
        assert len(images) == 1 and images[0].is_file()
        assert list((server.models_dir / "loras").glob(f"{prefix}_*.safetensors"))
    finally:
        server.stop()


def test_a_second_install_changes_nothing(install, first_install):
    files = install.tree_state()
    packages = install.packages()
    done = install.cm_cli()
    assert "Already exists" in done.stdout + done.stderr, (done.stdout + done.stderr)[-2000:]
    assert install.tree_state() == files
    assert install.packages() == packages
    assert not (install.folder.parent / f"{NAME}_2").exists()
    assert sorted(os.listdir(install.folder.parent)).count(NAME) == 1
