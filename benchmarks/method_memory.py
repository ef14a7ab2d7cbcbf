"""Peak memory each training method adds, on the tiny SD1.5 checkpoint.

    python3 benchmarks/method_memory.py [--steps 10] [--resolution 64] [--batch 2] [--methods lora,dora,...]
                                        [--json out.json]

Every method trains in its own fresh process, in the ComfyUI test host's Python (tools/comfy_host.py provisions
it): the tiny random-weight SD1.5 checkpoint of tools/tiny_models.py (~20 M UNet, CLIP-L, TAESD) is loaded by
ComfyUI's own loader and trained through the same ComfyModelBridge and TrainSession as the nodes.

  added RSS   peak RSS while the session is built and runs (latent and caption caches, trained weights,
              optimizer state, activations) minus the RSS with the model loaded just before; the peak is
              reset to the current RSS there (/proc/self/clear_refs), so loading does not count
  estimate    trainer/memory.py's estimate of the same run (what Train LoRA's fit-check compares with free RAM)

The absolute numbers are for a 20 M-parameter UNet: what scales with the model (a full fine-tune's copy,
gradients and AdamW state of every UNet weight; a text-encoder LoRA's CLIP activations) shows in the ratios.
Results: a table on stdout and every number as JSON (--json).
"""

import argparse
import json
import logging
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("tunekit.bench")

# What each method changes from the LoRA run (TrainConfig fields), and what it trains instead of a LoRA.
METHODS = {
    "lora": {},
    "locon": {"config": {"network": "locon", "targets": "all"}},
    "loha": {"config": {"network": "loha"}},
    "lokr": {"config": {"network": "lokr"}},
    "dora": {"config": {"network": "dora"}},
    "lora+te": {"config": {"text_encoders": "all"}},
    "finetune": {"trainable": "finetune", "config": {"learning_rate": 1e-5}},
    "textual_inversion": {"trainable": "embedding", "config": {"learning_rate": 5e-3}},
    "dreambooth": {"class_images": True},
}
INSTANCE_IMAGES = 4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (a shared machine: 1)")
    parser.add_argument("--comfy-version", default=None, help="the test host's ComfyUI (tools/comfy_host.py default)")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one method's JSON spec
    return parser.parse_args(argv)


# ----- the driver: one fresh process per method -----

def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))), flush=True)
        return 0
    unknown = [name for name in args.methods.split(",") if name not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
    sys.path.insert(0, str(REPO / "tools"))
    import comfy_host

    host = comfy_host.provision(args.comfy_version or comfy_host.DEFAULT_VERSION)
    checkpoint = tiny_checkpoint(host.python, host.env())
    rows = []
    for name in args.methods.split(","):
        spec = {"method": name, "checkpoint": str(checkpoint), "comfy_dir": str(host.comfy_dir), "steps": args.steps,
                "resolution": args.resolution, "batch": args.batch, "rank": args.rank, "threads": args.threads}
        rows.append(run_worker(host.python, host.env(), spec))
        log.info("%s", one_line(rows[-1]))
    summary = {"host": host.version, "settings": {key: value for key, value in vars(args).items() if key != "json"},
               "rows": rows}
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    return 0 if all(row.get("status") == "ok" for row in rows) else 1


def tiny_checkpoint(python: Path, env: dict) -> Path:
    """The tiny SD1.5 (made once into .cache/bench; the host's torch writes it)."""
    path = REPO / ".cache" / "bench" / "tiny_sd15.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        make = f"import sys; sys.path.insert(0, {str(REPO / 'tools')!r}); import tiny_models; tiny_models.make_sd15({str(path)!r})"
        subprocess.run([str(python), "-c", make], check=True, env=env)
    return path


def run_worker(python: Path, env: dict, spec: dict) -> dict:
    began = time.monotonic()
    done = subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=1800, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"method": spec["method"], "status": "error", "error": (done.stderr or done.stdout)[-2000:]}
    return {**json.loads(lines[-1]), "status": "ok", "process_seconds": time.monotonic() - began}


# ----- reporting (pure) -----

def one_line(row: dict) -> str:
    if row.get("status") != "ok":
        return f"{row['method']}: {row.get('status')} {row.get('error', '')[-300:]}"
    return (f"{row['method']}: +{row['added_mb']:.0f} MiB over {row['loaded_mb']:.0f} MiB loaded, "
            f"{row['trained_params'] / 1e6:.2f} M trained, {row['seconds_per_step']:.2f} s/step")


def table(rows: list[dict]) -> str:
    """Methods as rows: trained parameters, added peak RSS (and relative to LoRA), estimate, loss, time."""
    lora = next((row["added_mb"] for row in rows if row["method"] == "lora" and row.get("status") == "ok"), None)
    header = (f"{'method':<18} {'trained':>9} {'added RSS':>10} {'x LoRA':>7} {'estimate':>9} "
              f"{'loss first->last':>17} {'s/step':>7}")
    lines = [header]
    for row in rows:
        if row.get("status") != "ok":
            lines.append(f"{row['method']:<18} {row.get('status', 'error')}")
            continue
        ratio = f"{row['added_mb'] / lora:.2f}" if lora else "-"
        estimate = f"{row['estimate_mb']:.0f} MiB" if row.get("estimate_mb") is not None else "-"
        losses = f"{row['losses'][0]:.3f}->{row['losses'][-1]:.3f}" if row.get("losses") else "-"
        lines.append(f"{row['method']:<18} {row['trained_params'] / 1e6:>7.2f} M {row['added_mb']:>6.0f} MiB "
                     f"{ratio:>7} {estimate:>9} {losses:>17} {row['seconds_per_step']:>7.2f}")
    return "\n".join(lines)


# ----- the worker: one method in this process -----

def measure(spec: dict) -> dict:
    """Load the checkpoint, reset the peak RSS, train `spec`'s method; the numbers of that one run."""
    import torch

    import_tunekit()
    from tunekit.nodes import headless
    from tunekit.trainer import memory
    from tunekit.trainer.host import NullHost

    headless.import_comfy(Path(spec["comfy_dir"]), cpu=True)
    import comfy.model_management
    from tunekit.nodes.bridge import ComfyModelBridge

    torch.set_num_threads(spec["threads"])
    model, clip, vae = headless.load_checkpoint(Path(spec["checkpoint"]))
    comfy.model_management.load_models_gpu([model, clip.patcher, vae.patcher])
    bridge = ComfyModelBridge(model, clip, vae)
    dataset, config = method_dataset(spec), method_config(spec)
    memory.trace_step(lambda: torch.ones(2, requires_grad=True).sum(), lambda loss: loss.backward())  # its imports
    loaded, reset = worker_common().rss_mb(), worker_common().reset_peak_rss()
    session = method_session(spec, bridge, model, dataset, config)
    estimate = estimated_mb(memory, session)
    began = time.perf_counter()
    session.run(NullHost())
    seconds = (time.perf_counter() - began) / max(1, session.step)
    trained = sum(p.numel() for group in session.optimizer.param_groups for p in group["params"])
    return {"method": spec["method"], "loaded_mb": loaded, "added_mb": worker_common().peak_rss_mb() - loaded,
            "peak_reset": reset, "estimate_mb": estimate, "trained_params": trained, "losses": session.losses,
            "seconds_per_step": seconds, "images": len(dataset), "steps": session.step}


def method_config(spec: dict):
    from tunekit.trainer.config import TrainConfig

    settings = {"steps": spec["steps"], "learning_rate": 1e-3, "rank": spec["rank"], "alpha": float(spec["rank"]),
                "batch_size": spec["batch"], "resolution": spec["resolution"], "seed": 0, "loss_every": 1}
    return TrainConfig(**{**settings, **METHODS[spec["method"]].get("config", {})})


def method_dataset(spec: dict):
    """Instance images of a red subject; DreamBooth adds as many grey class images as regularization."""
    import numpy as np
    from tunekit.trainer.data import Dataset, TrainImage
    from tunekit.trainer.dreambooth import dreambooth_dataset

    side, rng = spec["resolution"], np.random.default_rng(0)

    def images(colour, caption, name):
        return [TrainImage(f"{name} {i}", caption, np.clip(np.array(colour) + rng.normal(0, 8, (side, side, 3)), 0, 255)
                           .astype(np.uint8)) for i in range(INSTANCE_IMAGES)]

    instance = Dataset.from_images(images((220, 30, 40), "a photo of sks dog", "instance"), name="instance")
    if not METHODS[spec["method"]].get("class_images"):
        return instance
    classes = Dataset.from_images(images((120, 120, 120), "a photo of a dog", "class"), name="class images", is_reg=True)
    return dreambooth_dataset(instance, "a photo of sks dog", classes, "a photo of a dog", True, 1.0)


def method_session(spec: dict, bridge, model, dataset, config):
    from tunekit.nodes.headless import full_finetune
    from tunekit.trainer.embeddings import TokenEmbedding
    from tunekit.trainer.session import TrainSession

    kind = METHODS[spec["method"]].get("trainable")
    trainable = None
    if kind == "finetune":
        trainable = full_finetune(model, bridge)
    elif kind == "embedding":
        trainable = TokenEmbedding.from_init_word(bridge, "sksdog", "dog", 2)
    return TrainSession(bridge, dataset, config, trainable=trainable)


def estimated_mb(memory, session) -> float | None:
    try:
        return memory.estimate_memory(session).added / 2**20
    except Exception as error:  # noqa: BLE001 - a method the estimate does not cover yet: say so, measure anyway
        log.warning("no estimate for this method: %s: %s", type(error).__name__, error)
        return None


def import_tunekit() -> None:
    """The checkout as the package `tunekit` (as tests/conftest.py), without ComfyUI's node registration."""
    if "tunekit" not in sys.modules:
        package = types.ModuleType("tunekit")
        package.__path__ = [str(REPO)]
        sys.modules["tunekit"] = package


def worker_common():
    sys.path.insert(0, str(REPO / "benchmarks" / "trainbench"))
    import worker_common as common

    return common


if __name__ == "__main__":
    sys.exit(main())
