"""The training slice end to end in a real ComfyUI: train on the graph's MODEL, sample, save, reload.

Learning is measured in latent space (HOST_NOTES: a random VAE makes pixel distances noisy).
"""

import re
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import comfy_host as harness  # noqa: E402
import tiny_models  # noqa: E402

RED = (220, 30, 40)


# ----- fixtures: models and datasets, built once per session -----

def tiny_checkpoint(comfy, family: str) -> str:
    path = comfy.workdir / "models" / "checkpoints" / f"tunekit_e2e_{family}.safetensors"
    if not path.exists():
        getattr(tiny_models, f"make_{family}")(path)
    return path.name


@pytest.fixture(scope="session")
def sd15(comfy):
    return tiny_checkpoint(comfy, "sd15")


def solid_folder(root: Path, name: str, count: int = 4, caption: str | None = "tkred") -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = np.clip(np.array(RED) + rng.normal(0, 4, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"red_{index}.png")
        if caption is not None:
            (folder / f"red_{index}.txt").write_text(caption)
    return folder


@pytest.fixture(scope="session")
def red_dataset(comfy):
    return solid_folder(comfy.input_dir, "e2e_red").name


# ----- graph building -----

def train_graph(ckpt, folder, run_name, steps=40, resume=False, save_every=0, lora_file=None, **train):
    settings = dict(learning_rate=2e-3, rank=8, alpha=8.0, batch_size=1, resolution=64, targets="transformer", seed=0)
    settings.update(train)
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "data": {"class_type": "TuneKitDatasetFromFolder", "inputs": {
            "folder": folder, "trigger_word": "tkred", "caption_extension": ".txt", "missing_captions": "error"}},
        "train": {"class_type": "TuneKitTrainLoRA", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "dataset": ["data", 0],
            "run_name": run_name, "steps": steps, "save_every": save_every, "resume": resume, **settings}},
    }
    if lora_file:
        graph["save"] = {"class_type": "TuneKitSaveLoRA", "inputs": {"lora": ["train", 2], "filename": lora_file}}
    return graph


def add_sampling(graph, model, clip, prefix, seed=7, steps=10):
    """KSampler with the trigger prompt; the latent is saved for exact comparison."""
    graph.update({
        f"{prefix}_pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "tkred"}},
        f"{prefix}_empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        f"{prefix}_sample": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [f"{prefix}_pos", 0], "negative": [f"{prefix}_pos", 0],
            "latent_image": [f"{prefix}_empty", 0], "seed": seed, "steps": steps, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        f"{prefix}_save": {"class_type": "SaveLatent", "inputs": {"samples": [f"{prefix}_sample", 0], "filename_prefix": f"e2e/{prefix}"}},
    })
    return graph


def saved_latents(comfy, history) -> dict[str, torch.Tensor]:
    """Latents written by SaveLatent nodes, by filename prefix."""
    found = {}
    for path in comfy.output_files(history):
        if path.suffix == ".latent":
            found[path.name.split("_0")[0]] = safetensors.torch.load_file(str(path))["latent_tensor"].float()
    return found


def encode_reference(graph, ckpt_node="ckpt"):
    graph.update({
        "ref_image": {"class_type": "LoadImage", "inputs": {"image": "e2e_red_reference.png"}},
        "ref_encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["ref_image", 0], "vae": [ckpt_node, 2]}},
        "ref_save": {"class_type": "SaveLatent", "inputs": {"samples": ["ref_encode", 0], "filename_prefix": "e2e/reference"}},
    })
    return graph


def no_unloaded_lora_keys(log: str) -> None:
    missing = re.findall(r"lora key not loaded: (\S+)", log)
    assert not missing, f"{len(missing)} LoRA keys were not loaded, e.g. {missing[:3]}"


# ----- the journey -----

@pytest.mark.every_host
def test_trained_model_learns_and_matches_the_saved_file_through_loraloader(comfy, sd15, red_dataset):
    Image.new("RGB", (64, 64), RED).save(comfy.input_dir / "e2e_red_reference.png")
    graph = train_graph(sd15, red_dataset, "e2e_learn", steps=60, lora_file="e2e_learn")
    add_sampling(graph, ["train", 0], ["train", 1], "trained")
    add_sampling(graph, ["ckpt", 0], ["ckpt", 1], "base")
    encode_reference(graph)
    mark = comfy.log_mark()
    with harness.RssSampler(comfy.pid) as training_rss:
        history = comfy.run(graph, timeout=600)
    latents = saved_latents(comfy, history)
    target = latents["reference"]
    trained = (latents["trained"] - target).pow(2).mean().item()
    base = (latents["base"] - target).pow(2).mean().item()
    print(f"\nlatent distance to the training image: untrained {base:.4f}, trained {trained:.4f}")
    print(comfy.log_text(mark).split("TuneKit: Trained")[-1].split("\n")[0])
    assert trained < 0.5 * base

    # The saved file, loaded back with ComfyUI's own LoraLoader, gives the same sample.
    lora_files = sorted((comfy.workdir / "models" / "loras").glob("e2e_learn*.safetensors"))
    assert lora_files, "Save LoRA wrote no file into models/loras"
    reload = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15}},
        "lora": {"class_type": "LoraLoader", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": lora_files[-1].name,
            "strength_model": 1.0, "strength_clip": 1.0}},
    }
    add_sampling(reload, ["lora", 0], ["lora", 1], "reloaded")
    mark = comfy.log_mark()
    with harness.RssSampler(comfy.pid) as sampling_rss:
        reloaded = saved_latents(comfy, comfy.run(reload))["reloaded"]
    no_unloaded_lora_keys(comfy.log_text(mark))
    print(f"max |trained - reloaded| = {(reloaded - latents['trained']).abs().max().item():.2e}")
    for name, rss in (("training", training_rss), ("sampling-only", sampling_rss)):
        print(f"server RSS during the {name} workflow: peak {rss.peak_bytes / 2**20:.0f} MiB "
              f"(+{rss.delta_bytes / 2**20:.0f} MiB over its start)")
    torch.testing.assert_close(reloaded, latents["trained"], rtol=1e-4, atol=1e-4)


def test_cancel_stops_within_a_second_and_a_new_run_resumes(comfy, sd15, red_dataset):
    run_dir = comfy.output_dir / "tunekit" / "e2e_cancel"
    prompt_id = comfy.queue(train_graph(sd15, red_dataset, "e2e_cancel", steps=100_000, lora_file="e2e_cancel"))
    mark = comfy.log_mark()
    deadline = time.monotonic() + 120
    while "TuneKit step 10/" not in comfy.log_text(mark):
        assert time.monotonic() < deadline, comfy.log_tail()
        time.sleep(0.05)
    began = time.monotonic()
    comfy.interrupt()
    entry = comfy.wait(prompt_id, timeout=30)
    stopped_after = time.monotonic() - began
    print(f"\ninterrupt -> prompt finished in {stopped_after:.2f} s")
    assert stopped_after < 2.0
    assert "execution_interrupted" in str(entry["status"])
    states = sorted(run_dir.glob("step_*"))
    assert len(states) == 1 and (states[0] / "lora.safetensors").is_file(), states
    assert str(states[0]) in comfy.log_text(mark), "the log does not say where the partial save is"
    cancelled_at = int(states[0].name.removeprefix("step_"))

    mark = comfy.log_mark()
    comfy.run(train_graph(sd15, red_dataset, "e2e_cancel", steps=cancelled_at + 5, resume=True, lora_file="e2e_cancel"))
    log = comfy.log_text(mark)
    assert f"resumes run 'e2e_cancel' at step {cancelled_at}" in log
    assert f"TuneKit step {cancelled_at + 5}/{cancelled_at + 5}" in log


def test_a_final_state_that_cannot_be_written_still_returns_the_trained_lora(comfy, sd15, red_dataset):
    """The run is done and in memory: a state file that cannot be written (here a user's file in the way of
    step_000004; on a full disk the same SaveError) costs only the resume point, never the LoRA or the file."""
    comfy.run(train_graph(sd15, red_dataset, "e2e_unsaved", steps=2, lora_file="e2e_first_of_unsaved"))
    run_dir = comfy.output_dir / "tunekit" / "e2e_unsaved"
    in_the_way = run_dir / "step_000004"
    in_the_way.write_text("the user's own file")

    mark = comfy.log_mark()
    history = comfy.run(train_graph(sd15, red_dataset, "e2e_unsaved", steps=4, resume=True, lora_file="e2e_unsaved"))
    report = " ".join(history["outputs"]["train"]["text"])
    assert "Trained 4 steps" in report
    assert "The final training state was not saved" in report and "state of step 4" in report, report
    assert f"the last complete state is kept: {run_dir / 'step_000002'}" in report, report
    assert "could not save the training state of step 4" in comfy.log_text(mark)
    assert in_the_way.read_text() == "the user's own file"
    saved = sorted((comfy.workdir / "models" / "loras").glob("e2e_unsaved*.safetensors"))
    assert len(saved) == 1, saved
    with safetensors.safe_open(str(saved[0]), "pt") as handle:
        assert handle.metadata()["ss_steps"] == "4"


def test_sdxl_trains_and_its_file_loads_with_every_key(comfy, red_dataset):
    sdxl = tiny_checkpoint(comfy, "sdxl")
    graph = train_graph(sdxl, red_dataset, "e2e_sdxl", steps=4, lora_file="e2e_sdxl")
    add_sampling(graph, ["train", 0], ["train", 1], "sdxl", steps=2)
    comfy.run(graph, timeout=600)
    path = sorted((comfy.workdir / "models" / "loras").glob("e2e_sdxl*.safetensors"))[-1]
    with safetensors.safe_open(str(path), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(key.startswith("lora_unet_input_blocks_") for key in keys)
    reload = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sdxl}},
        "lora": {"class_type": "LoraLoader", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": path.name, "strength_model": 1.0, "strength_clip": 1.0}},
    }
    add_sampling(reload, ["lora", 0], ["lora", 1], "sdxl_reloaded", steps=1)
    mark = comfy.log_mark()
    comfy.run(reload, timeout=600)
    no_unloaded_lora_keys(comfy.log_text(mark))
    comfy.free()


# ----- bad input: a node error that says what and how to fix -----

def failure_of(comfy, graph) -> str:
    with pytest.raises(harness.WorkflowFailed) as failed:
        comfy.run(graph)
    return failed.value.message


def test_empty_folder(comfy, sd15):
    (comfy.input_dir / "e2e_empty").mkdir(exist_ok=True)
    message = failure_of(comfy, train_graph(sd15, "e2e_empty", "e2e_bad", steps=1, lora_file="e2e_bad"))
    assert "No images in" in message and "Put your training images there" in message


def test_corrupt_image_is_skipped_and_the_run_continues(comfy, sd15):
    folder = solid_folder(comfy.input_dir, "e2e_corrupt", count=2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    (folder / "broken.txt").write_text("tkred")
    mark = comfy.log_mark()
    comfy.run(train_graph(sd15, folder.name, "e2e_corrupt", steps=2, lora_file="e2e_corrupt"))
    log = comfy.log_text(mark)
    assert "TuneKit skips" in log and "broken.png" in log
    assert "2 training images" in log


def test_image_without_caption(comfy, sd15):
    folder = solid_folder(comfy.input_dir, "e2e_nocaption", count=2)
    (folder / "red_1.txt").unlink()
    message = failure_of(comfy, train_graph(sd15, folder.name, "e2e_bad", steps=1, lora_file="e2e_bad"))
    assert "have no caption file (.txt): red_1.png" in message and "use trigger word" in message


def test_zero_steps_is_rejected_before_anything_runs(comfy, sd15, red_dataset):
    with pytest.raises(harness.PromptRejected, match="steps"):
        comfy.queue(train_graph(sd15, red_dataset, "e2e_bad", steps=0, lora_file="e2e_bad"))


def test_unsupported_model_family(comfy, red_dataset):
    sd2 = tiny_checkpoint(comfy, "sd2")
    message = failure_of(comfy, train_graph(sd2, red_dataset, "e2e_bad", steps=1, lora_file="e2e_bad"))
    assert "cannot train a LoRA on this model yet" in message and "Supported families" in message
    comfy.free()


def test_folder_outside_the_allowed_roots(comfy, sd15):
    message = failure_of(comfy, train_graph(sd15, "../../../../etc", "e2e_bad", steps=1, lora_file="e2e_bad"))
    assert "outside the folders TuneKit may read" in message and "TUNEKIT_DATASET_ROOTS" in message


def test_the_progress_display_is_served_to_the_frontend(comfy):
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    extensions = direct.open(f"{comfy.url}/extensions").read().decode()
    assert "/extensions/ComfyUI-TuneKit/tunekit.js" in extensions
    script = direct.open(f"{comfy.url}/extensions/ComfyUI-TuneKit/tunekit.js").read().decode()
    assert "tunekit.progress" in script


def test_images_from_the_graph_train_too(comfy, sd15):
    graph = train_graph(sd15, "unused", "e2e_graph_images", steps=2, lora_file="e2e_graph_images")
    graph["image"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 3, "color": 0xDC1E28}}
    graph["data"] = {"class_type": "TuneKitDatasetFromImages", "inputs": {
        "images": ["image", 0], "captions": "a red square", "trigger_word": "tkred"}}
    mark = comfy.log_mark()
    comfy.run(graph)
    assert "Trained 2 steps on 3 images" in comfy.log_text(mark)


def test_caption_lines_must_match_the_images(comfy, sd15):
    graph = train_graph(sd15, "unused", "e2e_bad", steps=1, lora_file="e2e_bad")
    graph["image"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 3, "color": 0}}
    graph["data"] = {"class_type": "TuneKitDatasetFromImages", "inputs": {
        "images": ["image", 0], "captions": "one\ntwo", "trigger_word": ""}}
    assert "2 caption lines for 3 images" in failure_of(comfy, graph)
