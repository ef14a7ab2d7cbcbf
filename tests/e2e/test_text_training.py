"""The text side end to end in a real ComfyUI: a LoRA on CLIP that reloads through LoraLoader's clip
strength, a textual-inversion embedding that the next prompt uses as `embedding:<name>`, and pivotal tuning
(embedding + UNet LoRA) whose two files reload as the node's MODEL/CLIP sample."""

import re
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from PIL import Image

from .test_monitor import monitor_node
from .test_train_lora import (
    RED,
    add_sampling,
    encode_reference,
    no_unloaded_lora_keys,
    saved_latents,
    solid_folder,
    tiny_checkpoint,
    train_graph,
)
from .test_training_options import option_defaults


@pytest.fixture(scope="module")
def sd15(comfy):
    return tiny_checkpoint(comfy, "sd15")


@pytest.fixture(scope="module")
def red_dataset(comfy):
    return solid_folder(comfy.input_dir, "e2e_red").name


def logged_losses(log: str) -> tuple[float, float]:
    first, last = re.search(r"mean loss first \d+ steps (\d+\.\d+), last \d+ steps (\d+\.\d+)", log).groups()
    return float(first), float(last)


def distance(latent: torch.Tensor, target: torch.Tensor) -> float:
    return (latent - target).pow(2).mean().item()


def test_text_encoder_lora_learns_and_its_file_reloads_through_loraloader_clip_strength(comfy, sd15, red_dataset):
    Image.new("RGB", (64, 64), RED).save(comfy.input_dir / "e2e_red_reference.png")
    graph = train_graph(sd15, red_dataset, "e2e_te", steps=12, lora_file="e2e_te", text_encoders="all", learning_rate=4e-3,
                        text_encoder_lr=1e-3)
    add_sampling(graph, ["train", 0], ["train", 1], "te_trained", steps=4)
    add_sampling(graph, ["ckpt", 0], ["train", 1], "te_clip_only", steps=4)  # the CLIP output alone
    add_sampling(graph, ["ckpt", 0], ["ckpt", 1], "te_base", steps=4)
    encode_reference(graph)
    mark = comfy.log_mark()
    latents = saved_latents(comfy, comfy.run(graph, timeout=2400))
    first, last = logged_losses(comfy.log_text(mark))
    target = latents["reference"]
    print(f"\nTE LoRA: loss of the first -> last logged window {first:.4f} -> {last:.4f}; latent distance to the training "
          f"image: base {distance(latents['te_base'], target):.4f}, trained CLIP only "
          f"{distance(latents['te_clip_only'], target):.4f}, trained MODEL+CLIP {distance(latents['te_trained'], target):.4f}")
    assert distance(latents["te_trained"], target) < distance(latents["te_base"], target)
    assert (latents["te_clip_only"] - latents["te_base"]).abs().max() > 1e-3, "the CLIP output carries no trained encoder"

    path = max((comfy.workdir / "models" / "loras").glob("e2e_te*.safetensors"))
    with safetensors.safe_open(str(path), "pt") as handle:
        keys = handle.keys()
        te_keys = [key for key in keys if key.startswith("lora_te_text_model_encoder_layers_")]
        metadata = handle.metadata()
    assert (metadata["ss_network_train_unet_only"], metadata["ss_text_encoder_lr"]) == ("False", "0.001")
    assert len(te_keys) == 12 * 6 * 3, len(te_keys)  # 12 layers x q/k/v/out/fc1/fc2 x down/up/alpha
    reloaded = sampled_through_loraloader(comfy, sd15, path.name, "te_reloaded", steps=4)
    print(f"max |in-graph - LoraLoader| = {(reloaded - latents['te_trained']).abs().max().item():.2e}")
    torch.testing.assert_close(reloaded, latents["te_trained"], rtol=1e-4, atol=1e-4)


def loraloader_graph(checkpoint: str, lora_name: str) -> dict:
    """CheckpointLoaderSimple + LoraLoader at model and clip strength 1: how a user loads the saved file."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "lora": {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": lora_name,
                                                        "strength_model": 1.0, "strength_clip": 1.0}},
    }


def sampled_through_loraloader(comfy, checkpoint: str, lora_name: str, name: str, steps: int) -> torch.Tensor:
    """The latent the saved file samples through ComfyUI's own loaders, checking that every key of it loaded."""
    graph = loraloader_graph(checkpoint, lora_name)
    add_sampling(graph, ["lora", 0], ["lora", 1], name, steps=steps)
    mark = comfy.log_mark()
    latent = saved_latents(comfy, comfy.run(graph, timeout=900))[name]
    no_unloaded_lora_keys(comfy.log_text(mark))
    return latent


def sample_prompt(graph, clip, text, prefix):
    add_sampling(graph, ["ckpt", 0], clip, prefix, steps=4)
    graph[f"{prefix}_pos"]["inputs"]["text"] = text
    return graph


@pytest.mark.every_host  # the tokenizer's embedding lookup differs between hosts (0.3.75: no parsed name)
def test_embedding_learns_and_embedding_name_in_the_next_prompt_equals_the_trained_clip(comfy, sd15, red_dataset):
    Image.new("RGB", (64, 64), RED).save(comfy.input_dir / "e2e_red_reference.png")
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15}},
        "data": {"class_type": "TuneKitDatasetFromFolder", "inputs": {
            "folder": red_dataset, "trigger_word": "tkred", "caption_extension": ".txt", "missing_captions": "error"}},
        "train": {"class_type": "TuneKitTrainEmbedding", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "dataset": ["data", 0], "name": "tkred",
            "init_word": "red", "num_vectors": 2, "steps": 10, "learning_rate": 5e-2, "batch_size": 1,
            "resolution": 64, "seed": 0, "save_every": 0, "resume": False}},
    }
    sample_prompt(graph, ["train", 0], "embedding:tkred", "ti_graph")
    sample_prompt(graph, ["ckpt", 1], "red red", "ti_init")  # the init word's vectors, 2 tokens
    encode_reference(graph)
    mark = comfy.log_mark()
    latents = saved_latents(comfy, comfy.run(graph, timeout=2400))
    log = comfy.log_text(mark)
    first, last = logged_losses(log)
    saved = re.search(r"Saved (\S+)\.safetensors: use embedding:(\S+) in a prompt", log).group(2)
    target = latents["reference"]
    print(f"\nTI: loss of the first -> last logged window {first:.4f} -> {last:.4f}; latent distance to the training image: "
          f"init word {distance(latents['ti_init'], target):.4f}, embedding {distance(latents['ti_graph'], target):.4f}")
    assert (comfy.workdir / "models" / "embeddings" / f"{saved}.safetensors").is_file()
    assert (latents["ti_graph"] - latents["ti_init"]).abs().max() > 1e-3, "the embedding did not move"

    reload = sample_prompt({"ckpt": graph["ckpt"]}, ["ckpt", 1], f"embedding:{saved}", "ti_file")
    mark = comfy.log_mark()
    from_file = saved_latents(comfy, comfy.run(reload, timeout=900))["ti_file"]
    assert "does not exist" not in comfy.log_text(mark)
    print(f"max |trained CLIP - embedding:{saved} from the file| = {(from_file - latents['ti_graph']).abs().max().item():.2e}")
    torch.testing.assert_close(from_file, latents["ti_graph"], rtol=1e-5, atol=1e-5)


def decode_image(graph, samples, prefix):
    graph[f"{prefix}_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": samples, "vae": ["ckpt", 2]}}
    graph[f"{prefix}_image"] = {"class_type": "SaveImage", "inputs": {"images": [f"{prefix}_decode", 0],
                                                                      "filename_prefix": f"e2e/{prefix}"}}
    return graph


def saved_images(comfy, history) -> dict[str, np.ndarray]:
    return {path.name.split("_0")[0]: np.asarray(Image.open(path), dtype=np.int16)
            for path in comfy.output_files(history) if path.suffix == ".png"}


def train_embedding(name, lora_rank=0, **extra):
    return {"class_type": "TuneKitTrainEmbedding", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "dataset": ["data", 0], "name": name,
        "init_word": "red", "num_vectors": 2, "steps": 12, "learning_rate": 5e-2, "batch_size": 1, "resolution": 64,
        "seed": 0, "save_every": 0, "resume": False, "lora_rank": lora_rank, "lora_learning_rate": 4e-3,
        "options": ["options", 0], **extra}}


def test_pivotal_tuning_learns_more_than_the_embedding_and_its_files_reload_as_the_node_samples(comfy, sd15, red_dataset):
    """Train Embedding with lora_rank 8 (pivotal tuning) beside the embedding alone, both with Training Options
    (EMA 0.5, grad clipping) and Sample & Validate (the training images as validation set, fixed noise)."""
    Image.new("RGB", (64, 64), RED).save(comfy.input_dir / "e2e_red_reference.png")
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15}},
        "data": {"class_type": "TuneKitDatasetFromFolder", "inputs": {
            "folder": red_dataset, "trigger_word": "tkpiv", "caption_extension": ".txt", "missing_captions": "error"}},
        "options": {"class_type": "TuneKitTrainingOptions", "inputs": {
            **option_defaults(comfy), "ema_decay": 0.5, "max_grad_norm": 1.0}},
        "piv_monitor": monitor_node(validation=["data", 0], every=12, prompts="embedding:tkpiv"),
        "emb_monitor": monitor_node(validation=["data", 0], every=12, prompts=""),
        "pivot": train_embedding("tkpiv", lora_rank=8, monitor=["piv_monitor", 0]),
        "emb": train_embedding("tkemb", monitor=["emb_monitor", 0]),
    }
    graph["emb"]["inputs"]["dataset"] = ["emb_data", 0]  # its own trigger word, same images
    graph["emb_data"] = {**graph["data"], "inputs": {**graph["data"]["inputs"], "trigger_word": "tkemb"}}
    sample_prompt(graph, ["emb", 0], "embedding:tkemb", "emb_graph")
    sample_prompt(graph, ["ckpt", 1], "red red", "piv_init")  # the init word's vectors, 2 tokens
    add_sampling(graph, ["pivot", 3], ["pivot", 0], "piv_graph", steps=4)
    graph["piv_graph_pos"]["inputs"]["text"] = "embedding:tkpiv"
    decode_image(graph, ["piv_graph_sample", 0], "piv_graph")
    encode_reference(graph)
    mark = comfy.log_mark()
    history = comfy.run(graph, timeout=2400)
    latents, log = saved_latents(comfy, history), comfy.log_text(mark)

    reports = {name: re.search(rf"TuneKit: (Trained .*Saved {name}\S*\.safetensors.*)", log).group(1)
               for name in ("tkpiv", "tkemb")}
    validation = {name: tuple(map(float, re.search(r"fixed noise\): step 0 (\d+\.\d+) -> step 12 (\d+\.\d+)",
                                                    report).groups())) for name, report in reports.items()}
    target = latents["reference"]
    distances = {name: distance(latents[name], target) for name in ("piv_init", "emb_graph", "piv_graph")}
    print(f"\npivotal: training loss first -> last logged window {logged_losses(reports['tkpiv'])}; fixed-noise "
          f"validation loss step 0 -> 12: pivotal {validation['tkpiv'][0]:.4f} -> {validation['tkpiv'][1]:.4f}, "
          f"embedding alone {validation['tkemb'][0]:.4f} -> {validation['tkemb'][1]:.4f}; latent distance of the "
          f"trigger-prompt sample to the training image: init word {distances['piv_init']:.4f}, embedding alone "
          f"{distances['emb_graph']:.4f}, pivotal {distances['piv_graph']:.4f}")
    assert validation["tkpiv"][1] < validation["tkpiv"][0]
    assert validation["tkpiv"][0] - validation["tkpiv"][1] > validation["tkemb"][0] - validation["tkemb"][1]
    assert distances["piv_graph"] < min(distances["piv_init"], distances["emb_graph"])
    run_dir = Path(re.search(r"Run folder: (\S+)\. Saved", reports["tkpiv"]).group(1))
    assert len(list((run_dir / "samples").glob("step_*.png"))) == 2, "Sample & Validate sampled step 0 and 12"
    assert 'method = "embedding"' in (run_dir / "config.toml").read_text()

    saved, lora_name = re.search(r"use embedding:(\S+) in a prompt\. Its LoRA: (\S+) in models/loras",
                                 reports["tkpiv"]).groups()
    with safetensors.safe_open(str(comfy.models_dir / "loras" / lora_name), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(key.startswith("lora_unet_") for key in keys)
    assert metadata["modelspec.trigger_phrase"] == f"embedding:{saved}" and metadata["ss_network_dim"] == "8"
    reload = loraloader_graph(sd15, lora_name)
    add_sampling(reload, ["lora", 0], ["lora", 1], "piv_file", steps=4)
    reload["piv_file_pos"]["inputs"]["text"] = f"embedding:{saved}"
    decode_image(reload, ["piv_file_sample", 0], "piv_file")
    mark = comfy.log_mark()
    reloaded = comfy.run(reload, timeout=900)
    reload_log = comfy.log_text(mark)
    no_unloaded_lora_keys(reload_log)
    assert "does not exist" not in reload_log
    from_files = saved_latents(comfy, reloaded)["piv_file"]
    images = {**saved_images(comfy, history), **saved_images(comfy, reloaded)}
    pixels = np.abs(images["piv_file"] - images["piv_graph"]).max()
    print(f"LoraLoader + embedding:{saved} vs the node's MODEL/CLIP: max latent difference "
          f"{(from_files - latents['piv_graph']).abs().max().item():.2e}, max pixel difference {pixels}/255")
    assert pixels <= 1


def mean_up(path, prefix: str) -> float:
    """Mean |lora_up| over the file's branches named `prefix`*."""
    with safetensors.safe_open(str(path), "pt") as handle:
        ups = [handle.get_tensor(key).float().abs().mean().item() for key in handle.keys()  # noqa: SIM118 (not a dict)
               if key.startswith(prefix) and key.endswith(".lora_up.weight")]
    assert ups, f"no {prefix}* branches in {path.name}"
    return sum(ups) / len(ups)


def test_sdxl_text_encoder_lora_trains_both_encoders_at_their_own_rates_and_reloads_through_loraloader(comfy, red_dataset):
    """SDXL (tiny UNet, full-size CLIP-L and CLIP-G), text_encoders 'all': lora_te1 at text_encoder_lr, lora_te2 at
    text_encoder_2_lr (10x lower: Adam moves a fresh branch's up weights by about its rate a step). Learning is the
    fixed-noise loss on the training images (Sample & Validate) at step 0 and at the end."""
    sdxl = tiny_checkpoint(comfy, "sdxl")
    Image.new("RGB", (64, 64), RED).save(comfy.input_dir / "e2e_red_reference.png")
    graph = train_graph(sdxl, red_dataset, "e2e_sdxl_te", steps=8, lora_file="e2e_sdxl_te", text_encoders="all",
                        learning_rate=4e-3, text_encoder_lr=1e-3, text_encoder_2_lr=1e-4, monitor=["monitor", 0])
    graph["monitor"] = monitor_node(validation=["data", 0], every=8, prompts="")
    add_sampling(graph, ["train", 0], ["train", 1], "sdxl_te_trained", steps=2)
    add_sampling(graph, ["ckpt", 0], ["train", 1], "sdxl_te_clip_only", steps=2)  # the CLIP output alone
    add_sampling(graph, ["ckpt", 0], ["ckpt", 1], "sdxl_te_base", steps=2)
    encode_reference(graph)
    mark = comfy.log_mark()
    latents = saved_latents(comfy, comfy.run(graph, timeout=2400))
    first, last = map(float, re.search(r"fixed noise\): step 0 (\d+\.\d+) -> step 8 (\d+\.\d+)",
                                       comfy.log_text(mark)).groups())
    target = latents["reference"]
    clip_effect = (latents["sdxl_te_clip_only"] - latents["sdxl_te_base"]).abs().max().item()
    print(f"\nSDXL TE LoRA: fixed-noise loss on the training images step 0 -> 8: {first:.4f} -> {last:.4f}; latent distance to the "
          f"training image: base {distance(latents['sdxl_te_base'], target):.4f}, trained "
          f"{distance(latents['sdxl_te_trained'], target):.4f}; max |base MODEL with trained CLIP - base| {clip_effect:.4f}")
    assert last < first
    assert distance(latents["sdxl_te_trained"], target) < distance(latents["sdxl_te_base"], target)
    assert clip_effect > 1e-3, "the CLIP output carries no trained encoder"

    path = max((comfy.workdir / "models" / "loras").glob("e2e_sdxl_te*.safetensors"))
    te1, te2 = mean_up(path, "lora_te1_text_model_encoder_layers_"), mean_up(path, "lora_te2_text_model_encoder_layers_")
    print(f"mean |lora_up| after 8 steps: lora_te1 (lr 1e-3) {te1:.2e}, lora_te2 (lr 1e-4) {te2:.2e}")
    assert te1 > 3 * te2
    reloaded = sampled_through_loraloader(comfy, sdxl, path.name, "sdxl_te_reloaded", steps=2)
    difference = (reloaded - latents["sdxl_te_trained"]).abs().max().item()
    print(f"max |in-graph MODEL/CLIP - LoraLoader| latent = {difference:.2e}")
    assert difference <= 1 / 255
    comfy.free()
