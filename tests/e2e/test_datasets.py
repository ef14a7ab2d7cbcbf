"""Datasets end to end in a real ComfyUI: a kohya TOML with two subsets trains, the report shows it, the
latent cache spares the VAE on the next run, and bad input stops with the file and line."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import comfy_host as harness  # noqa: E402

from .test_train_lora import sd15  # noqa: F401  (session fixture: the tiny SD1.5 checkpoint)


def image_folder(folder: Path, count: int, size: tuple[int, int], colour, caption: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for index in range(count):
        pixels = np.clip(np.array(colour) + rng.normal(0, 4, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{index}.png")
        if caption is not None:
            (folder / f"img_{index}.txt").write_text(caption)
    return folder


TOML = """\
[general]
caption_extension = ".txt"
color_aug = true

[[datasets]]
resolution = 64
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 256

  [[datasets.subsets]]
  image_dir = "train"
  num_repeats = 2
  shuffle_caption = true
  keep_tokens = 1
  flip_aug = true

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  class_tokens = "square"
"""


@pytest.fixture(scope="session")
def two_subsets(comfy) -> str:
    root = comfy.input_dir / "e2e_toml"
    image_folder(root / "train", 4, (64, 64), (220, 30, 40), "tkred, red, square")
    image_folder(root / "reg", 2, (128, 64), (40, 40, 220), None)
    (root / "dataset.toml").write_text(TOML)
    return "e2e_toml/dataset.toml"


def toml_graph(ckpt, toml_file, run_name, steps):
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "data": {"class_type": "TuneKitDatasetFromTOML", "inputs": {"toml_file": toml_file}},
        "report": {"class_type": "TuneKitDatasetReport", "inputs": {
            "dataset": ["data", 0], "resolution": 64, "batch_size": 2, "preview_count": 6}},
        "preview": {"class_type": "PreviewImage", "inputs": {"images": ["report", 0]}},
        "train": {"class_type": "TuneKitTrainLoRA", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "dataset": ["data", 0],
            "run_name": run_name, "steps": steps, "learning_rate": 1e-3, "rank": 4, "alpha": 4.0, "batch_size": 2,
            "resolution": 64, "targets": "transformer", "seed": 0, "save_every": 0, "resume": False}},
        "save": {"class_type": "TuneKitSaveLoRA", "inputs": {"lora": ["train", 2], "filename": run_name}},
    }


def test_a_two_subset_toml_trains_with_a_report_and_the_second_run_encodes_nothing(comfy, sd15, two_subsets):
    mark = comfy.log_mark()
    history = comfy.run(toml_graph(sd15, two_subsets, "e2e_toml", steps=4), timeout=600)
    log = comfy.log_text(mark)
    report = log.split("TuneKit dataset report:")[1]
    print(report[:1500])
    assert "6 images in 2 subsets" in report
    assert "train (training" in report and "4 images x 2 repeats = 8 per epoch" in report
    assert "reg (reg) (regularization" in report and "2 images x 1 repeats = 8 per epoch" in report  # kohya balancing
    # At resolution 64 (buckets 64..256, step 64) kohya makes only the 64x64 bucket: the 2:1 reg images crop into it.
    assert "64x64: 6 images, 16 with repeats, 8 batches" in report and "Steps per epoch at batch size 2: 8" in report
    assert "'color_aug = true' is not supported by TuneKit" in report
    assert "captions vary per step (text cache off)" in report
    assert "Trained 4 steps on 6 images" in log
    assert "Encoded 10 images (0 latents from the cache)" in log  # 4 train images and their flips, 2 reg images
    previews = [p for p in comfy.output_files(history) if p.suffix == ".png"]
    assert previews, "the report's preview grid was not shown"

    mark = comfy.log_mark()
    comfy.run(toml_graph(sd15, two_subsets, "e2e_toml_again", steps=2), timeout=600)
    assert "Encoded 0 images (" in comfy.log_text(mark)


def failure_of(comfy, graph) -> str:
    with pytest.raises(harness.WorkflowFailed) as failed:
        comfy.run(graph)
    return failed.value.message


def test_a_typo_and_a_missing_image_dir_stop_with_file_and_line(comfy, sd15):
    root = comfy.input_dir / "e2e_bad_toml"
    image_folder(root / "imgs", 1, (64, 64), (0, 0, 0), "x")
    (root / "bad.toml").write_text("[general]\nnum_repeat = 2\n[[datasets]]\n[[datasets.subsets]]\nclass_tokens = 'x'\n")
    message = failure_of(comfy, toml_graph(sd15, "e2e_bad_toml/bad.toml", "e2e_bad", steps=1))
    assert "bad.toml:2: unknown key 'num_repeat' in [general] (did you mean 'num_repeats'?)" in message
    assert "bad.toml:4: [[datasets.subsets]] #1 of dataset #1 has no image_dir" in message


def test_an_image_dir_outside_the_allowed_roots_says_how_to_add_one(comfy, sd15):
    root = comfy.input_dir / "e2e_escape_toml"
    root.mkdir(exist_ok=True)
    (root / "escape.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '/etc'\n")
    message = failure_of(comfy, toml_graph(sd15, "e2e_escape_toml/escape.toml", "e2e_bad", steps=1))
    assert "escape.toml:3: image_dir '/etc' is outside the folders TuneKit may read" in message
    assert "TUNEKIT_DATASET_ROOTS" in message
