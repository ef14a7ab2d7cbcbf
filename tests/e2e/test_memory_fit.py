"""Fits, or says so before it starts (trainer/memory.py, nodes/memory_fit.py) in a real ComfyUI: a run that fits
reports its estimate; one far beyond the machine's free RAM stops before encoding an image, with 'fit-check'
naming the estimate, the free memory and the settings to lower, and with 'auto' saying what it tried."""

import time

import pytest
from PIL import Image

from .test_dreambooth_finetune import finetune_node
from .test_train_lora import harness, red_dataset, sd15, train_graph  # noqa: F401  (session fixtures)
from .test_training_options import option_defaults

HUGE = 4096  # px: the tiny UNet's activations at this size and batch 4 need ~100x a test machine's RAM


def with_memory_mode(comfy, graph, mode):
    graph["options"] = {"class_type": "TuneKitTrainingOptions", "inputs": {**option_defaults(comfy), "memory_mode": mode}}
    graph["train"]["inputs"]["options"] = ["options", 0]
    return graph


def huge_folder(comfy) -> str:
    folder = comfy.input_dir / "e2e_huge"
    folder.mkdir(exist_ok=True)
    for index in range(4):
        Image.new("RGB", (HUGE, HUGE), (200, 30 + index, 40)).save(folder / f"huge_{index}.png")
        (folder / f"huge_{index}.txt").write_text("tkred")
    return folder.name


def test_a_run_that_fits_reports_its_estimate(comfy, sd15, red_dataset):
    history = comfy.run(train_graph(sd15, red_dataset, "e2e_memory_fits", steps=2, lora_file="e2e_memory_fits"), timeout=900)
    report = " ".join(history["outputs"]["train"]["text"])
    assert "Memory: " in report and "added at batch_size 1, 64x64 px" in report and "free" in report, report


@pytest.mark.parametrize("mode", ["fit-check", "auto"])
def test_a_run_that_cannot_fit_stops_before_any_work_and_says_what_to_lower(comfy, sd15, mode):
    graph = with_memory_mode(comfy, train_graph(sd15, huge_folder(comfy), f"e2e_memory_{mode}", steps=2,
                                                batch_size=4, resolution=HUGE, lora_file="e2e_memory_huge"), mode)
    mark, began = comfy.log_mark(), time.monotonic()
    with pytest.raises(harness.WorkflowFailed) as failed:
        comfy.run(graph, timeout=900)
    message = failed.value.message
    assert "on top of the loaded model" in message and "is free" in message, message
    for setting in ("resolution", "rank"):
        assert setting in message
    if mode == "fit-check":
        assert "turn gradient_checkpointing on" in message and "batch_size (now 4" in message
        assert "memory_mode" in message
    else:
        assert "even after auto chose gradient_checkpointing True, batch_size 1, gradient_accumulation_steps 4" in message
    log = comfy.log_text(mark)
    assert "Encoded" not in log  # no image went through the VAE
    print(f"{mode}: stopped in {time.monotonic() - began:.1f} s: {message[:400]}")


def test_fine_tune_reports_its_estimate_and_stops_before_any_work_when_it_cannot_fit(comfy, sd15, red_dataset):
    """Fine-tune's trained copy of the UNet exists before the check: the estimate counts it and the free memory
    gets it back, so it counts once."""
    fits = train_graph(sd15, red_dataset, "e2e_memory_ft_fits", steps=1)
    fits["train"] = finetune_node(["data", 0], "e2e_memory_ft_fits", steps=1)
    report = " ".join(comfy.run(fits, timeout=900)["outputs"]["train"]["text"])
    assert "Memory: " in report and "added at batch_size 1, 64x64 px" in report, report

    huge = train_graph(sd15, huge_folder(comfy), "e2e_memory_ft_huge", steps=2)
    huge["train"] = finetune_node(["data", 0], "e2e_memory_ft_huge", steps=2, batch_size=4, resolution=HUGE)
    mark = comfy.log_mark()
    with pytest.raises(harness.WorkflowFailed) as failed:
        comfy.run(with_memory_mode(comfy, huge, "fit-check"), timeout=900)
    message = failed.value.message
    assert "on top of the loaded model" in message and "memory_mode" in message, message
    assert "Encoded" not in comfy.log_text(mark)
