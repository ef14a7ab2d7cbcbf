"""The workflows in example_workflows/ as users get them: listed in the templates browser, made only of
node types the server has, and the training demo runs end to end on the tiny SD1.5 checkpoint.

UI-format JSON becomes an API prompt through tools/workflow_api.py, which copies the frontend's
graphToPrompt (widget order, control_after_generate slots, links)."""
import json
import struct
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import workflow_api  # noqa: E402

WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
DEMO = REPO / "example_workflows" / "train_lora_then_sample.json"
pytestmark = [pytest.mark.e2e, pytest.mark.every_host]


def _get_json(comfy, path: str):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    with opener.open(comfy.url + path, timeout=30) as response:
        return json.loads(response.read())


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(size))


def test_there_are_example_workflows():
    assert DEMO in WORKFLOWS


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_example_workflow_has_no_missing_node_types(comfy, path):
    workflow = json.loads(path.read_text(encoding="utf-8"))
    prompt = workflow_api.ui_to_api(workflow, comfy.object_info())  # raises UnknownNodeTypes
    assert prompt, f"{path.name} has no node the server would run"
    for node_id, node in prompt.items():
        links = [value for value in node["inputs"].values() if isinstance(value, list)]
        assert all(origin in prompt for origin, _ in links), f"node {node_id} is linked to a node that is not sent"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_example_workflow_is_listed_in_the_templates_browser_with_a_thumbnail(comfy, path):
    templates = _get_json(comfy, "/workflow_templates")
    assert path.stem in templates.get("ComfyUI-TuneKit", []), templates
    served = _get_json(comfy, f"/api/workflow_templates/ComfyUI-TuneKit/{path.name}")
    assert served == json.loads(path.read_text(encoding="utf-8"))
    # The browser asks for <name>.jpg beside each template and shows a broken card without it.
    assert path.with_suffix(".jpg").is_file(), f"{path.with_suffix('.jpg').name} (thumbnail) is missing"


def test_unknown_node_types_are_named_in_the_error(comfy):
    workflow = json.loads(DEMO.read_text(encoding="utf-8"))
    workflow["nodes"][0]["type"] = "NoSuchNodeFromAMissingPack"
    with pytest.raises(workflow_api.UnknownNodeTypes, match="NoSuchNodeFromAMissingPack"):
        workflow_api.ui_to_api(workflow, comfy.object_info())


def _node(workflow: dict, node_id: int) -> dict:
    return next(node for node in workflow["nodes"] if node["id"] == node_id)


def test_conversion_handles_graph_edits_like_the_frontend(comfy):
    """Expected values are what comfyui-frontend-package 1.32.9's graphToPrompt produced for the same
    edits of the demo, loaded in Chromium (ids: 1 checkpoint, 3 Train LoRA, 4 Save LoRA, 6 negative, 8 KSampler)."""
    info = comfy.object_info()
    demo = json.loads(DEMO.read_text(encoding="utf-8"))
    train = workflow_api.ui_to_api(demo, info)["3"]["inputs"]  # seed's "fixed" control slot is skipped
    assert (train["seed"], train["save_every"], train["resume"]) == (0, 0, False)

    bypassed = json.loads(DEMO.read_text(encoding="utf-8"))
    _node(bypassed, 3)["mode"] = 4  # MODEL and CLIP pass through; LORA_MODEL has no matching input
    api = workflow_api.ui_to_api(bypassed, info)
    assert "3" not in api and api["8"]["inputs"]["model"] == ["1", 0] and api["6"]["inputs"]["clip"] == ["1", 1]
    assert "lora" not in api["4"]["inputs"]

    muted = json.loads(DEMO.read_text(encoding="utf-8"))
    _node(muted, 6)["mode"] = 2
    api = workflow_api.ui_to_api(muted, info)
    assert "6" not in api and "negative" not in api["8"]["inputs"]

    short = json.loads(DEMO.read_text(encoding="utf-8"))
    _node(short, 8)["widgets_values"] = [5]  # missing values take the definition's defaults
    inputs = workflow_api.ui_to_api(short, info)["8"]["inputs"]
    widgets = {name: inputs[name] for name in ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")}
    assert widgets == {"seed": 5, "steps": 20, "cfg": 8.0, "sampler_name": "euler", "scheduler": "simple",
                       "denoise": 1.0}

    wired = json.loads(DEMO.read_text(encoding="utf-8"))  # seed from a PrimitiveNode, MODEL through a Reroute
    wired["nodes"] += [
        {"id": 20, "type": "PrimitiveNode", "mode": 0, "widgets_values": [1234, "fixed"],
         "outputs": [{"name": "INT", "type": "INT", "links": [20], "widget": {"name": "seed"}}]},
        {"id": 21, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 21}],
         "outputs": [{"name": "", "type": "MODEL", "links": [22]}]},
    ]
    _node(wired, 8)["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 20})
    _node(wired, 8)["inputs"][0]["link"] = 22
    wired["links"] += [[20, 20, 0, 8, 4, "INT"], [21, 3, 0, 21, 0, "MODEL"], [22, 21, 0, 8, 0, "MODEL"]]
    api = workflow_api.ui_to_api(wired, info)
    assert api["8"]["inputs"]["seed"] == 1234 and api["8"]["inputs"]["model"] == ["3", 0]
    assert not {"20", "21"} & api.keys()


def test_train_lora_then_sample_runs_end_to_end(comfy, demo_files):
    workflow = json.loads(DEMO.read_text(encoding="utf-8"))
    prompt = workflow_api.ui_to_api(workflow, comfy.object_info())
    loras = comfy.models_dir / "loras"
    before = set(loras.glob("*.safetensors"))

    history = comfy.run(prompt, timeout=600)

    assert history["status"]["status_str"] == "success"
    images = [path for path in comfy.output_files(history) if path.suffix == ".png"]
    assert len(images) == 1 and images[0].name.startswith("tunekit_sample"), images
    assert _png_size(images[0]) == (64, 64)
    new = sorted(set(loras.glob("*.safetensors")) - before)
    assert len(new) == 1 and new[0].name.startswith("tunekit_demo_lora"), new
    header = _safetensors_header(new[0])
    assert any(key.startswith("lora_unet_") for key in header), "the saved file holds no UNet LoRA weights"
    assert header["__metadata__"]["ss_output_name"] == new[0].stem
    train_id = next(i for i, node in prompt.items() if node["class_type"] == "TuneKitTrainLoRA")
    report = " ".join(history["outputs"][train_id]["text"])
    assert f"Trained {prompt[train_id]['inputs']['steps']} steps" in report, report


SHORTER = {  # class_type -> inputs that keep the training examples quick on the tiny model
    "KSampler": {"steps": 2},
    "TuneKitClassImages": {"count": 2, "steps": 2},
    "TuneKitFineTune": {"steps": 4},
    "TuneKitTrainLoRA": {"steps": 4},
    "TuneKitTrainEmbedding": {"steps": 4},
}


@pytest.mark.parametrize("name, saved", [("finetune_then_sample", "checkpoints/tunekit_demo_finetune"),
                                         ("dreambooth_prior_preservation", "loras/tunekit_dreambooth_lora"),
                                         ("textual_inversion", "embeddings/tkdemo")])
def test_training_examples_run_end_to_end_shortened(comfy, demo_files, name, saved):
    workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text(encoding="utf-8"))
    prompt = workflow_api.ui_to_api(workflow, comfy.object_info())
    for node in prompt.values():
        node["inputs"].update(SHORTER.get(node["class_type"], {}))
    folder, stem = saved.split("/")
    before = set((comfy.models_dir / folder).glob("*.safetensors"))

    history = comfy.run(prompt, timeout=600)

    images = [path for path in comfy.output_files(history) if path.suffix == ".png"]
    assert len(images) == 1 and images[0].name.startswith(f"tunekit_{name.split('_')[0]}"), images
    assert _png_size(images[0]) == (64, 64)
    new = sorted(set((comfy.models_dir / folder).glob("*.safetensors")) - before)
    assert len(new) == 1 and new[0].name.startswith(stem), new
    texts = " ".join(" ".join(output.get("text", [])) for output in history["outputs"].values())
    assert "Trained 4 steps" in texts, texts
