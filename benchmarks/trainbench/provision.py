"""What benchmarks/train_step.py needs beside the test host: diffusers + PEFT in their own folder.

They go into `.cache/bench-site` with `pip install --target`, never into the host's venv, and are put
on PYTHONPATH for the diffusers worker only. Packages are installed `--no-deps`; each requirement the
host's venv does not already satisfy is then added the same way, so the venv's torch (the CPU build)
is what diffusers runs on and no CUDA torch is ever downloaded (torch is also pinned as a constraint).
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / ".cache" / "bench-site"
# What the reference figures were measured with.
PINNED = ("diffusers==0.42.1", "peft==0.21.2")
TORCH_SPEC = "torch==2.13.0"
NEVER = ("torch", "torchvision", "torchaudio", "triton")

log = logging.getLogger("tunekit.bench")

# Run by the host's python with SITE first on sys.path: prints the requirements nothing satisfies.
_MISSING = r"""
import importlib.metadata as md, json, sys
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
site = sys.argv[1]
missing = set()
for dist in md.distributions(path=[site]):
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            missing.add(str(req)); continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.add(str(req))
print(json.dumps(sorted(missing)))
"""


def site_env(host_env: dict) -> dict:
    env = dict(host_env)
    env["PYTHONPATH"] = os.pathsep.join([str(SITE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _pip(python: Path, args: list[str], log_path: Path) -> None:
    constraints = SITE.parent / "bench-constraints.txt"
    constraints.write_text(TORCH_SPEC + "\n")
    command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
               "--target", str(SITE), "--upgrade", "-c", str(constraints), *args]
    with open(log_path, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        if subprocess.call(command, stdout=out, stderr=subprocess.STDOUT) != 0:
            raise SystemExit(f"pip could not install {' '.join(args)} into {SITE}; see {log_path}")


def ensure_site(python: Path, host_env: dict) -> Path:
    """diffusers + PEFT (and whatever they need that the venv lacks) in SITE; cheap when already there."""
    stamp = SITE / ".tunekit-bench.json"
    wanted = {"packages": list(PINNED), "python": str(python)}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return SITE
    SITE.mkdir(parents=True, exist_ok=True)
    log_path = SITE.parent / "bench-site.log"
    log.info("Installing %s into %s (log: %s)", ", ".join(PINNED), SITE, log_path)
    _pip(python, list(PINNED), log_path)
    for _ in range(6):  # requirements of requirements: a few rounds at most
        found = subprocess.run([str(python), "-c", _MISSING, str(SITE)], env=site_env(host_env),
                               capture_output=True, text=True, check=True)
        missing = json.loads(found.stdout)
        if not missing:
            break
        refused = [req for req in missing if req.split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()
                   in NEVER]
        if refused:
            raise SystemExit(f"diffusers/PEFT want {refused}, which the host's torch does not satisfy: not installed")
        log.info("  adding %s", ", ".join(missing))
        _pip(python, missing, log_path)
    else:
        raise SystemExit(f"the requirements of {PINNED} did not settle; see {log_path}")
    stamp.write_text(json.dumps(wanted))
    return SITE


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.path.insert(0, str(REPO / "tools"))
    import comfy_host

    host = comfy_host.provision()
    print(ensure_site(host.python, host.env()))
