"""Helpers for the tests that treat TuneKit as a guest in someone's ComfyUI (Manager install, hidden
packages, global state): which nodes TuneKit ships, and the example workflow as an API prompt."""
import json
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import workflow_api  # noqa: E402

DEMO = "example_workflows/train_lora_then_sample.json"
NODE_ID = re.compile(r'node_id="(TuneKit\w+)"')


def tunekit_node_ids(checkout: Path = REPO) -> set[str]:
    """Every node type a TuneKit checkout defines (read from its source, not from a server)."""
    found = set()
    for path in (checkout / "nodes").rglob("*.py"):
        found.update(NODE_ID.findall(path.read_text(encoding="utf-8")))
    return found


def demo_prompt(server, checkout: Path = REPO, steps: int | None = None, prefix: str | None = None,
                sample_steps: int | None = 2) -> dict:
    """The example workflow as the frontend would queue it, optionally shorter (training `steps`, sampler
    `sample_steps`: these tests check where it runs, test_example_workflows.py runs it as shipped) or with
    other file names."""
    workflow = json.loads((checkout / DEMO).read_text(encoding="utf-8"))
    prompt = workflow_api.ui_to_api(workflow, server.object_info())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "KSampler" and sample_steps is not None:
            inputs["steps"] = sample_steps
        if node["class_type"] == "TuneKitTrainLoRA":
            if steps is not None:
                inputs["steps"] = steps
            if prefix:
                inputs["run_name"] = f"{prefix}_{inputs['run_name']}"
        if prefix and "filename_prefix" in inputs:
            inputs["filename_prefix"] = f"{prefix}_{inputs['filename_prefix']}"
        if prefix and node["class_type"] == "TuneKitSaveLoRA":
            inputs["filename"] = f"{prefix}_{inputs['filename']}"
    return prompt


def place_demo_files(server, demo_files: dict) -> None:
    """Give another server the demo's checkpoint (a link: no second 200 MB file) and dataset."""
    checkpoint = server.models_dir / "checkpoints" / demo_files["checkpoint"].name
    if not checkpoint.exists():
        checkpoint.symlink_to(demo_files["checkpoint"])
    dataset = server.input_dir / demo_files["dataset"].name
    if not dataset.exists():
        shutil.copytree(demo_files["dataset"], dataset)
