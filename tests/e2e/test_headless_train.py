"""A run started in the graph re-runs headless: `python -m tunekit train --config <its config.toml>` in the
host's Python (ComfyUI's code as a library, no server) trains the same LoRA, bit for bit on the CPU.

One Train LoRA run in the real ComfyUI, then its config.toml through the CLI: the [run] table names the
checkpoint and the exported dataset, the headless loss falls, its file has kohya keys and full metadata,
and its tensors equal those of the node's saved LoRA.
"""

import os
import re
import subprocess
import time
from pathlib import Path

import safetensors
import safetensors.torch
import tomllib
import torch

from .test_train_lora import solid_folder, tiny_checkpoint, train_graph

REPO = Path(__file__).resolve().parents[2]
RUN = "e2e_headless"


def test_the_graph_runs_config_retrains_the_same_lora_headless(comfy, comfy_host, tmp_path):
    ckpt = tiny_checkpoint(comfy, "sd15")
    folder = solid_folder(comfy.input_dir, "e2e_headless_red").name
    comfy.run(train_graph(ckpt, folder, RUN, steps=8, lora_file=RUN, learning_rate=5e-3, rank=4, alpha=4.0,
                          batch_size=2, seed=5), timeout=600)
    graph_lora = max((comfy.models_dir / "loras").glob(f"{RUN}*.safetensors"))
    config = comfy.output_dir / "tunekit" / RUN / "config.toml"
    text = config.read_text()
    assert f'checkpoint = "{comfy.models_dir / "checkpoints" / ckpt}"' in text, text
    assert re.search(r'dataset = ".*dataset\.toml"', text), text

    began = time.monotonic()
    report = headless(comfy_host, tmp_path, config)
    print(f"\nheadless run {time.monotonic() - began:.0f} s: {report}")

    first, last = map(float, re.search(r"first \d+ steps (\d+\.\d+), last \d+ steps (\d+\.\d+)", report).groups())
    assert last < first
    headless_lora = tmp_path / "runs" / RUN / f"{RUN}.safetensors"
    with safetensors.safe_open(str(headless_lora), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(key.startswith("lora_unet_") for key in keys)
    assert metadata["ss_steps"] == "8" and metadata["ss_seed"] == "5" and metadata["ss_network_dim"] == "4"
    assert (tmp_path / "runs" / RUN / "step_000008" / "state.pt").is_file()
    assert "[run]" in (tmp_path / "runs" / RUN / "config.toml").read_text()

    graph, retrained = safetensors.torch.load_file(str(graph_lora)), safetensors.torch.load_file(str(headless_lora))
    assert graph.keys() == retrained.keys()
    differ = [key for key in graph if not torch.equal(graph[key], retrained[key])]
    assert not differ, f"{len(differ)} of {len(graph)} tensors differ, e.g. {differ[:3]}"


def test_a_fine_tunes_config_retrains_the_same_checkpoint_headless(comfy, comfy_host, tmp_path):
    ckpt, run = tiny_checkpoint(comfy, "sd15"), "e2e_headless_ft"
    folder = solid_folder(comfy.input_dir, "e2e_headless_red").name
    comfy.run({
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "data": {"class_type": "TuneKitDatasetFromFolder", "inputs": {
            "folder": folder, "trigger_word": "tkred", "caption_extension": ".txt", "missing_captions": "error"}},
        "tune": {"class_type": "TuneKitFineTune", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "dataset": ["data", 0], "run_name": run,
            "steps": 3, "learning_rate": 1e-4, "batch_size": 2, "resolution": 64, "seed": 2, "save_every": 0,
            "resume": False}},
    }, timeout=600)
    config = comfy.output_dir / "tunekit" / run / "config.toml"
    assert 'method = "finetune"' in config.read_text()
    report = headless(comfy_host, tmp_path, config)
    print(f"\nheadless fine-tune: {report}")

    graph = unet_of(max((comfy.models_dir / "checkpoints").glob(f"{run}*.safetensors")))
    tuned = unet_of(tmp_path / "runs" / run / f"{run}.safetensors")
    base = unet_of(comfy.models_dir / "checkpoints" / ckpt)
    assert graph.keys() == tuned.keys() == base.keys()
    assert any(not torch.equal(tuned[key], base[key]) for key in base), "the headless fine-tune changed nothing"
    differ = [key for key in graph if not torch.equal(graph[key], tuned[key])]
    assert not differ, f"{len(differ)} of {len(graph)} UNet tensors differ, e.g. {differ[:3]}"


def test_a_dreambooths_configs_retrain_the_same_lora_and_checkpoint_headless(comfy, comfy_host, tmp_path):
    """Train LoRA and Fine-tune fed by DreamBooth (instance images x2 repeats, 3 sampled class images, prior
    preservation at weight 0.5): each config.toml names a kohya dataset TOML with the instance subset, an is_reg
    class subset and that prior_loss_weight, and its headless re-run gives the node's LoRA / UNet bit for bit."""
    ckpt, run = tiny_checkpoint(comfy, "sd15"), "e2e_headless_db"
    folder = solid_folder(comfy.input_dir, "e2e_headless_db_subject", count=2, caption="a red dog").name
    graph = train_graph(ckpt, folder, run, steps=6, lora_file=run, learning_rate=5e-3, rank=4, alpha=4.0,
                        batch_size=2, seed=9)
    graph["data"]["inputs"]["repeats"] = 2
    graph["class"] = {"class_type": "TuneKitClassImages", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "class_prompt": "a photo of a dog",
        "negative_prompt": "", "count": 3, "seed": 11, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
        "scheduler": "normal", "width": 64, "height": 64}}
    graph["db"] = {"class_type": "TuneKitDreamBooth", "inputs": {
        "instance_images": ["data", 0], "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog",
        "prior_preservation": True, "prior_loss_weight": 0.5, "class_images": ["class", 0]}}
    graph["train"]["inputs"]["dataset"] = ["db", 0]
    graph["tune"] = {"class_type": "TuneKitFineTune", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "dataset": ["db", 0], "run_name": f"{run}_ft",
        "steps": 3, "learning_rate": 1e-4, "batch_size": 2, "resolution": 64, "seed": 9, "save_every": 0,
        "resume": False}}
    comfy.run(graph, timeout=900)
    runs = {"lora": comfy.output_dir / "tunekit" / run, "finetune": comfy.output_dir / "tunekit" / f"{run}_ft"}
    for method, folder in runs.items():
        exported = tomllib.loads(Path(tomllib.loads((folder / "config.toml").read_text())["run"]["dataset"]).read_text())
        subsets = [(s["is_reg"], s["num_repeats"], len(list(Path(s["image_dir"]).glob("*.png"))), s.get("class_tokens"))
                   for block in exported["datasets"] for s in block["subsets"]]
        print(f"\n{method}: exported dataset subsets (is_reg, repeats, images, class_tokens) {subsets}")
        assert subsets == [(False, 2, 2, "a photo of sks dog"), (True, 1, 3, "a photo of a dog")], subsets
        assert [block.get("prior_loss_weight") for block in exported["datasets"]] == [0.5]

    (tmp_path / "lora").mkdir()
    print(f"headless DreamBooth LoRA: {headless(comfy_host, tmp_path / 'lora', runs['lora'] / 'config.toml')}")
    node = safetensors.torch.load_file(str(max((comfy.models_dir / "loras").glob(f"{run}*.safetensors"))))
    retrained = safetensors.torch.load_file(str(tmp_path / "lora" / "runs" / run / f"{run}.safetensors"))
    assert node.keys() == retrained.keys()
    differ = [key for key in node if not torch.equal(node[key], retrained[key])]
    assert not differ, f"{len(differ)} of {len(node)} LoRA tensors differ, e.g. {differ[:3]}"

    (tmp_path / "ft").mkdir()
    print(f"headless DreamBooth fine-tune: {headless(comfy_host, tmp_path / 'ft', runs['finetune'] / 'config.toml')}")
    node = unet_of(max((comfy.models_dir / "checkpoints").glob(f"{run}_ft*.safetensors")))
    retrained = unet_of(tmp_path / "ft" / "runs" / f"{run}_ft" / f"{run}_ft.safetensors")
    assert node.keys() == retrained.keys()
    differ = [key for key in node if not torch.equal(node[key], retrained[key])]
    assert not differ, f"{len(differ)} of {len(node)} UNet tensors differ, e.g. {differ[:3]}"


def unet_of(path: Path) -> dict:
    return {key: value for key, value in safetensors.torch.load_file(str(path)).items()
            if key.startswith("model.diffusion_model.")}


def headless(comfy_host, tmp_path: Path, config: Path) -> str:
    """`python -m tunekit train` in the host's Python, ComfyUI imported from its folder; returns the report."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "tunekit").symlink_to(REPO)  # what `pip install -e .` maps
    env = comfy_host.env({"PYTHONPATH": os.pathsep.join([str(tmp_path / "pkg"), str(comfy_host.stubs_dir)])})
    done = subprocess.run([str(comfy_host.python), "-m", "tunekit", "train", "--config", str(config), "--output",
                           str(tmp_path / "runs"), "--comfyui", str(comfy_host.comfy_dir), "--cpu"],
                          check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


def test_a_pivotal_embeddings_config_retrains_the_same_embedding_and_lora_headless(comfy, comfy_host, tmp_path):
    """Train Embedding with lora_rank 4 (pivotal tuning) writes a config.toml with method "embedding", its
    init word, vector count and LoRA; headless, it gives the node's embedding and LoRA bit for bit."""
    ckpt, run = tiny_checkpoint(comfy, "sd15"), "e2e_headless_ti"
    folder = solid_folder(comfy.input_dir, "e2e_headless_red").name
    comfy.run({
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "data": {"class_type": "TuneKitDatasetFromFolder", "inputs": {
            "folder": folder, "trigger_word": run, "caption_extension": ".txt", "missing_captions": "error"}},
        "train": {"class_type": "TuneKitTrainEmbedding", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "dataset": ["data", 0], "name": run,
            "init_word": "red", "num_vectors": 2, "steps": 4, "learning_rate": 5e-2, "batch_size": 2, "resolution": 64,
            "seed": 4, "save_every": 0, "resume": False, "lora_rank": 4, "lora_learning_rate": 5e-3}},
    }, timeout=600)
    config = comfy.output_dir / "tunekit" / run / "config.toml"
    settings = tomllib.loads(config.read_text())
    assert settings["run"]["method"] == "embedding" and settings["run"]["name"] == run
    assert (settings["init_word"], settings["num_vectors"], settings["pivotal"], settings["rank"]) == ("red", 2, True, 4)

    report = headless(comfy_host, tmp_path, config)
    print(f"\nheadless pivotal tuning: {report}")
    folder = tmp_path / "runs" / run
    for graph_file, headless_file in ((max((comfy.models_dir / "embeddings").glob(f"{run}*.safetensors")), folder / f"{run}.safetensors"),
                                      (max((comfy.models_dir / "loras").glob(f"{run}*.safetensors")), folder / f"{run}_lora.safetensors")):
        graph, retrained = safetensors.torch.load_file(str(graph_file)), safetensors.torch.load_file(str(headless_file))
        assert graph.keys() == retrained.keys() and graph, headless_file.name
        differ = [key for key in graph if not torch.equal(graph[key], retrained[key])]
        assert not differ, f"{headless_file.name}: {len(differ)} of {len(graph)} tensors differ, e.g. {differ[:3]}"
