"""What the Comfy registry and ComfyUI-Manager read from this repository: pyproject.toml through
comfy-cli's own registry parser, the shipped icon, requirements that never touch torch, and the
README's install lines in the order users meet them.

comfy-cli (PyPI) is installed once into .cache/tools/ with only the packages its config parser
imports: its full dependency set is ~300 MB and none of it belongs in the host's venv.
"""
import json
import os
import re
import struct
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = REPO / "pyproject.toml"
COMFY_CLI = "comfy-cli==1.23.0"
# What comfy_cli.registry.config_parser imports (measured with -X importtime), with comfy-cli's bounds.
PARSER_DEPS = ("tomlkit>=0.13,<0.16", "typer>=0.12.5", "rich", "pyyaml", "certifi>=2024.7.4", "semver~=3.0.2")
CLI_DIR = REPO / ".cache" / "tools" / COMFY_CLI.replace("==", "-")
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
# Runs in a subprocess with only CLI_DIR added: the registry's own view of pyproject.toml.
PARSE = """
import dataclasses, json, sys
from comfy_cli.registry.config_parser import extract_node_configuration
from comfy_cli.registry.api import serialize_license

def plain(value):  # dataclasses holding tomlkit items -> JSON
    if dataclasses.is_dataclass(value):
        return {field.name: plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value.unwrap() if hasattr(value, "unwrap") else value

config = extract_node_configuration(sys.argv[1])
if config is None:
    sys.exit("comfy-cli could not read the file")
print("CONFIG=" + json.dumps({**plain(config), "license_json": serialize_license(config.project.license)}))
"""


def _pip_target(args: list[str]) -> None:
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--target",
               str(CLI_DIR), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, f"could not install comfy-cli's parser: {done.stderr[-2000:]}"


@pytest.fixture(scope="module")
def comfy_cli_dir() -> Path:
    stamp = CLI_DIR / ".installed"
    wanted = json.dumps([COMFY_CLI, *PARSER_DEPS])
    if not (stamp.is_file() and stamp.read_text() == wanted):
        _pip_target(["--no-deps", COMFY_CLI])
        _pip_target(list(PARSER_DEPS))
        stamp.write_text(wanted)
    return CLI_DIR


@pytest.fixture(scope="module")
def registry_view(comfy_cli_dir) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(comfy_cli_dir), "PYTHONNOUSERSITE": "1"}
    done = subprocess.run([sys.executable, "-c", PARSE, str(PYPROJECT)], capture_output=True, text=True,
                          env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("CONFIG="))
    chatter = "\n".join(line for line in done.stdout.splitlines() if not line.startswith("CONFIG="))
    return json.loads(line.removeprefix("CONFIG=")), chatter + done.stderr


def test_comfy_cli_parses_pyproject_without_a_warning(registry_view):
    config, chatter = registry_view
    assert "Warning" not in chatter and "Error" not in chatter, chatter
    project, comfy = config["project"], config["tool_comfy"]
    assert project["name"] == "tunekit"  # registry id: no "ComfyUI" in it
    assert SEMVER.match(project["version"]), project["version"]
    assert config["license_json"] and "GPL-3.0" in config["license_json"], config["license_json"]
    assert project["urls"]["repository"].startswith("https://github.com/")
    assert comfy["publisher_id"] and comfy["display_name"]
    assert project["supported_comfyui_version"] == ">=0.3.75"
    assert not any(re.match(r"(torch|torchvision|torchaudio|xformers)\b", dep) for dep in project["dependencies"])


def test_icon_is_a_url_to_the_shipped_square_png(registry_view):
    config, _ = registry_view
    icon = urlsplit(config["tool_comfy"]["icon"])
    repository = urlsplit(config["project"]["urls"]["repository"]).path.strip("/")
    assert icon.scheme == "https" and icon.netloc == "raw.githubusercontent.com", icon.geturl()
    parts = icon.path.strip("/").split("/")  # owner/repo/branch/path...
    assert "/".join(parts[:2]) == repository, "the icon URL points into another repository"
    relative = "/".join(parts[3:])
    shipped = REPO / relative
    assert shipped.is_file(), f"the icon URL names {relative}, which this repository does not ship"
    header = shipped.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert width == height >= 128, (width, height)


def test_requirements_mirror_pyproject_and_leave_torch_to_the_host():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line]
    assert sorted(requirements) == sorted(project["dependencies"])
    assert not [line for line in requirements if re.match(r"(torch|torchvision|torchaudio|xformers)\b", line)]


def test_requirements_resolve_without_torch_torchvision_or_xformers(tmp_path):
    """What pip would install for requirements.txt into an empty environment (the Manager runs it with no
    constraint): the host's torch must never be swapped, so no requirement may drag one in."""
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--disable-pip-version-check", "--report", str(report), "-r", str(REPO / "requirements.txt")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert names and not names & {"torch", "torchvision", "torchaudio", "xformers"}, sorted(names)


def test_readme_gives_the_manager_install_first_then_git_clone_and_pip():
    text = (REPO / "README.md").read_text()
    install = text.split("## Install", 1)[1].split("\n## ", 1)[0]
    manager = install.find("ComfyUI-Manager")
    clone = install.find("git clone")
    pip = install.find("pip install -r ")
    assert 0 <= manager < clone < pip, install
