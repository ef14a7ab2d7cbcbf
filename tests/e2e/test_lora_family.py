"""The LoRA family in a real ComfyUI: each algorithm trains on the tiny SD1.5 model, and its saved file,
loaded back through ComfyUI's own LoraLoader, gives the trained MODEL's sample with every key loaded.
A MODEL that already carries a LoRA from LoraLoader trains with it frozen in, and the file holds only
the new adapter."""

import re

import numpy as np
import safetensors
import torch
from PIL import Image

from .test_train_lora import add_sampling, no_unloaded_lora_keys, red_dataset, saved_latents, sd15  # noqa: F401

ALGORITHMS = ("lora", "locon", "loha", "lokr", "dora")
TRAIN = dict(steps=2, learning_rate=2e-2, rank=4, alpha=4.0, batch_size=1, resolution=64, targets="transformer",
             seed=0, save_every=0, resume=False)


def add_training(graph, name, model, clip, dataset_node, network, settings_node=None):
    inputs = {"model": model, "clip": clip, "vae": ["ckpt", 2], "dataset": [dataset_node, 0],
              "run_name": f"e2e_family_{name}", **TRAIN, "network": network, "monitor": ["monitor", 0]}
    if settings_node:
        inputs["network_settings"] = [settings_node, 0]
    graph[f"{name}_train"] = {"class_type": "TuneKitTrainLoRA", "inputs": inputs}
    graph[f"{name}_file"] = {"class_type": "TuneKitSaveLoRA", "inputs": {
        "lora": [f"{name}_train", 2], "filename": f"e2e_family_{name}"}}
    add_sampling(graph, [f"{name}_train", 0], [f"{name}_train", 1], f"{name}_trained", steps=1)


def add_decode(graph, prefix):
    graph[f"{prefix}_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{prefix}_sample", 0], "vae": ["ckpt", 2]}}
    graph[f"{prefix}_image"] = {"class_type": "SaveImage", "inputs": {
        "images": [f"{prefix}_decode", 0], "filename_prefix": f"e2e/{prefix}_image"}}


def saved_images(comfy, history) -> dict[str, np.ndarray]:
    return {path.name.split("_image")[0]: np.asarray(Image.open(path), dtype=np.int16)
            for path in comfy.output_files(history) if path.suffix == ".png"}


def monitor_sample(comfy, name, step) -> np.ndarray:
    path = sorted(comfy.output_dir.glob(f"tunekit/e2e_family_{name}*/samples/step_{step:06d}_00.png"))[-1]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def lora_loader(graph, name, model, clip, lora_file):
    graph[name] = {"class_type": "LoraLoader", "inputs": {
        "model": model, "clip": clip, "lora_name": lora_file, "strength_model": 1.0, "strength_clip": 1.0}}
    return [name, 0], [name, 1]


def base_graph(sd15, red_dataset):
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15}},
        "data": {"class_type": "TuneKitDatasetFromFolder", "inputs": {
            "folder": red_dataset, "trigger_word": "tkred", "caption_extension": ".txt", "missing_captions": "error"}},
        "conv": {"class_type": "TuneKitLoRANetworkSettings", "inputs": {
            "conv_rank": 2, "conv_alpha": 1.0, "target_pattern": "", "lokr_factor": -1, "init_lora": "none"}},
        # Samples at step 0 and the end from the training clone itself (side branches, nothing exported), with
        # add_sampling's settings (cfg 1: the negative prompt is never evaluated).
        "monitor": {"class_type": "TuneKitSampleAndValidate", "inputs": {
            "every": 1000, "prompts": "tkred", "negative_prompt": "", "seed": 7, "steps": 1, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "normal", "width": 64, "height": 64, "validation_count": 0,
            "validation_seed": 0}},
    }


def newest_file(comfy, stem):
    return sorted((comfy.workdir / "models" / "loras").glob(f"{stem}*.safetensors"), key=lambda p: p.stat().st_mtime)[-1]


def test_every_algorithm_reloads_through_loraloader_and_trains_on_a_model_carrying_a_lora(comfy, sd15, red_dataset):
    graph = base_graph(sd15, red_dataset)
    for network in ALGORITHMS:
        add_training(graph, network, ["ckpt", 0], ["ckpt", 1], "data", network, "conv" if network == "locon" else None)
    add_sampling(graph, ["ckpt", 0], ["ckpt", 1], "base", steps=1)
    add_decode(graph, "base")
    mark = comfy.log_mark()
    history = comfy.run(graph, timeout=2400)
    trained, base_image = saved_latents(comfy, history), saved_images(comfy, history)["base"]
    log = comfy.log_text(mark)
    files = {network: newest_file(comfy, f"e2e_family_{network}") for network in ALGORITHMS}

    # Each file back through LoraLoader; and DoRA trained on the MODEL that carries the LoRA file.
    reload = base_graph(sd15, red_dataset)
    for network, path in files.items():
        add_sampling(reload, *lora_loader(reload, f"{network}_loader", ["ckpt", 0], ["ckpt", 1], path.name),
                     f"{network}_reloaded", steps=1)
        add_decode(reload, f"{network}_reloaded")
    carried = lora_loader(reload, "carried", ["ckpt", 0], ["ckpt", 1], files["lora"].name)
    add_training(reload, "stacked", *carried, "data", "dora")
    mark = comfy.log_mark()
    history = comfy.run(reload, timeout=2400)
    reloaded, reloaded_images = saved_latents(comfy, history), saved_images(comfy, history)
    reload_log = comfy.log_text(mark)
    no_unloaded_lora_keys(reload_log)

    first_losses = set()
    for network in ALGORITHMS:
        with safetensors.safe_open(str(files[network]), "pt") as handle:
            metadata = handle.metadata()
        loss = re.search(rf"mean loss first 1 steps ([\d.]+), last 1 steps ([\d.]+)\. Run folder: \S+e2e_family_{network}\b", log)
        difference = (reloaded[f"{network}_reloaded"] - trained[f"{network}_trained"]).abs().max().item()
        effect = (trained[f"{network}_trained"] - trained["base"]).abs().max().item()
        print(f"\n{network}: {metadata['ss_network_module']} {metadata['ss_network_args']}; loss {loss[1]} -> {loss[2]}; "
              f"max |LoraLoader - trained MODEL| {difference:.2e}; max |trained - base| {effect:.3f}")
        assert effect > 1e-3, f"{network}: the trained MODEL samples like the base"
        first_losses.add(loss[1])
        # The forward that trained (the monitor's last sample) against the file through LoraLoader, in pixels;
        # and the fresh branches (its step-0 sample) against the bare model.
        in_training = monitor_sample(comfy, network, TRAIN["steps"])
        through_loader = np.abs(reloaded_images[f"{network}_reloaded"] - in_training)
        at_start = np.abs(monitor_sample(comfy, network, 0) - base_image).max()
        print(f"   sample of the training clone vs LoraLoader: max {through_loader.max()} mean {through_loader.mean():.3f} "
              f"(of 255; vs the base image: {np.abs(in_training - base_image).max()}); step-0 sample vs base {at_start}")
        assert through_loader.max() <= 3 and at_start <= 1
        torch.testing.assert_close(reloaded[f"{network}_reloaded"], trained[f"{network}_trained"], rtol=1e-4, atol=1e-4)

    assert len(first_losses) == 1, f"a fresh branch changed the model's first loss: {first_losses}"

    stacked = newest_file(comfy, "e2e_family_stacked")
    with safetensors.safe_open(str(stacked), "pt") as handle, safetensors.safe_open(str(files["dora"]), "pt") as fresh:
        assert set(handle.keys()) == set(fresh.keys()), "the file trained on a LoRA-carrying MODEL holds other keys"
    chained = base_graph(sd15, red_dataset)
    both = lora_loader(chained, "first", ["ckpt", 0], ["ckpt", 1], files["lora"].name)
    add_sampling(chained, *lora_loader(chained, "second", *both, stacked.name), "chained", steps=1)
    add_decode(chained, "chained")
    add_sampling(chained, *lora_loader(chained, "alone", ["ckpt", 0], ["ckpt", 1], stacked.name), "alone", steps=1)
    mark = comfy.log_mark()
    history = comfy.run(chained, timeout=1200)
    chained_latents, chained_image = saved_latents(comfy, history), saved_images(comfy, history)["chained"]
    no_unloaded_lora_keys(comfy.log_text(mark))
    difference = (chained_latents["chained"] - reloaded["stacked_trained"]).abs().max().item()
    without_first = (chained_latents["alone"] - reloaded["stacked_trained"]).abs().max().item()
    print(f"DoRA on a LoRA-carrying MODEL: max |LoraLoader(first)+LoraLoader(new) - trained| {difference:.2e}; "
          f"without the first LoRA {without_first:.3f}")
    torch.testing.assert_close(chained_latents["chained"], reloaded["stacked_trained"], rtol=1e-4, atol=1e-4)
    # DoRA normalised the weight with the carried LoRA in it: the training clone's own sample matches too.
    in_training = np.abs(chained_image - monitor_sample(comfy, "stacked", TRAIN["steps"])).max()
    print(f"   its training clone's sample vs LoraLoader(first)+LoraLoader(new): max {in_training} (of 255)")
    assert in_training <= 3
    assert without_first > 1e-3, "the new file seems to contain the LoRA the MODEL carried"
