"""Training Options in a real ComfyUI: Train LoRA with a non-default optimizer, schedule, Min-SNR, EMA and
accumulation learns on the tiny model; the saved file's metadata and the run's config.toml carry the
options; a setting that contradicts the model is a node error naming the input."""

import math
import re

import pytest
import safetensors
import tomllib
from PIL import Image

from .test_train_lora import (  # noqa: F401  (sd15, red_dataset: session fixtures)
    RED,
    add_sampling,
    encode_reference,
    harness,
    red_dataset,
    saved_latents,
    sd15,
    train_graph,
)

OPTIONS = {"optimizer": "lion", "weight_decay": 0.0, "lr_scheduler": "cosine", "lr_warmup_steps": 3,
           "gradient_accumulation_steps": 2, "max_grad_norm": 1.0, "min_snr_gamma": 5.0, "noise_offset": 0.05,
           "timestep_bias_strategy": "later", "timestep_bias_multiplier": 1.5, "ema_decay": 0.8, "deterministic": True,
           "loss_every": 4}


def option_defaults(comfy) -> dict:
    """Every input of the Training Options node at its default, as the server describes the node."""
    spec = comfy.object_info("TuneKitTrainingOptions")["TuneKitTrainingOptions"]["input"]
    return {name: entry[1]["default"] for section in ("required", "optional") for name, entry in spec.get(section, {}).items()}


def with_options(comfy, graph, **changes):
    graph["options"] = {"class_type": "TuneKitTrainingOptions", "inputs": {**option_defaults(comfy), **OPTIONS, **changes}}
    graph["train"]["inputs"]["options"] = ["options", 0]
    return graph


def test_train_lora_with_training_options_learns_and_records_them(comfy, sd15, red_dataset):
    Image.new("RGB", (64, 64), RED).save(comfy.input_dir / "e2e_red_reference.png")
    graph = with_options(comfy, train_graph(sd15, red_dataset, "e2e_options", steps=12, learning_rate=5e-3,
                                            lora_file="e2e_options"))
    add_sampling(graph, ["train", 0], ["train", 1], "options_trained", steps=4)
    add_sampling(graph, ["ckpt", 0], ["ckpt", 1], "options_base", steps=4)
    encode_reference(graph)
    mark = comfy.log_mark()
    latents = saved_latents(comfy, comfy.run(graph, timeout=1800))
    target = latents["reference"]
    trained = (latents["options_trained"] - target).pow(2).mean().item()
    base = (latents["options_base"] - target).pow(2).mean().item()
    print(f"\nlion + cosine + Min-SNR + EMA + accumulation 2: latent distance to the training "
          f"image: untrained {base:.4f}, trained {trained:.4f}")
    print(comfy.log_text(mark).split("TuneKit: Trained")[-1].split("\n")[0])
    assert trained < 0.9 * base

    path = max((comfy.workdir / "models" / "loras").glob("e2e_options*.safetensors"))
    with safetensors.safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    expected = {"ss_lr_scheduler": "cosine", "ss_lr_warmup_steps": "3", "ss_min_snr_gamma": "5.0",
                "ss_ema_decay": "0.8", "ss_ema_saved": "True", "ss_gradient_accumulation_steps": "2",
                "ss_max_grad_norm": "1.0", "ss_noise_offset": "0.05", "ss_gradient_checkpointing": "False",
                "ss_mixed_precision": "no", "ss_deterministic": "True"}
    assert {key: metadata.get(key) for key in expected} == expected
    assert metadata["ss_optimizer"].startswith("pytorch_optimizer.") and "Lion" in metadata["ss_optimizer"]
    assert '"strategy": "later"' in metadata["ss_timestep_bias"]

    run_config = tomllib.loads((comfy.output_dir / "tunekit" / "e2e_options" / "config.toml").read_text())
    assert run_config["optimizer"] == "lion" and run_config["ema_decay"] == 0.8 and run_config["seed"] == 0


def test_a_setting_that_contradicts_the_model_is_a_node_error(comfy, sd15, red_dataset):
    graph = with_options(comfy, train_graph(sd15, red_dataset, "e2e_options_bad", steps=2, lora_file="e2e_options_bad"),
                         prediction_type="v_prediction", optimizer="schedule_free_adamw")
    with pytest.raises(harness.WorkflowFailed) as failed:
        comfy.run(graph, timeout=300)
    message = str(failed.value)
    print(f"\n{message[:600]}")
    assert "lr_scheduler is 'cosine' with optimizer 'schedule_free_adamw'" in message
    assert "ema_decay is 0.8 with optimizer 'schedule_free_adamw'" in message
    assert "prediction_type is 'v_prediction' but the model predicts 'epsilon'" in message


def test_checkpointing_clip_skip_and_bf16_train_comfyuis_unet_and_clip(comfy, sd15, red_dataset):
    graph = with_options(comfy, train_graph(sd15, red_dataset, "e2e_options_memory", steps=4, lora_file="e2e_options_memory"),
                         gradient_checkpointing=True, clip_skip=2, mixed_precision="bf16", ema_decay=0.0,
                         lr_warmup_steps=0, loss_every=1)
    mark = comfy.log_mark()
    comfy.run(graph, timeout=900)
    log = comfy.log_text(mark)
    blocks = int(log.split("gradient checkpointing on ")[1].split(" UNet blocks")[0])
    losses = [float(value) for value in re.findall(r"mean loss first 1 steps (\S+), last 1 steps (\S+)\.", log)[0]]
    print(f"\ncheckpointed UNet blocks: {blocks}; bf16 + clip skip 2 losses first/last {losses}")
    # The tiny SD1.5: 2 input blocks, the middle one, 2 output blocks (a real SD1.5: 12 + 1 + 12).
    assert blocks == 5 and all(math.isfinite(value) and value < 10 for value in losses)
    path = max((comfy.workdir / "models" / "loras").glob("e2e_options_memory*.safetensors"))
    with safetensors.safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_gradient_checkpointing"], metadata["ss_clip_skip"], metadata["ss_mixed_precision"]) == ("True", "2", "bf16")
