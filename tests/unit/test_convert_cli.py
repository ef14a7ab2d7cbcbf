"""`python -m tunekit convert ...`: each subcommand end to end on tiny files, errors as messages with exit 2."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import torch

from tunekit.cli import main

from convert_fixtures import add_lora, kohya_sd1, mini_checkpoint, small_checkpoint

REPO = Path(__file__).resolve().parents[2]


def save(path, tensors, metadata=None):
    safetensors.torch.save_file(tensors, str(path), metadata)
    return path


def test_python_m_tunekit_converts_a_lora(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "tunekit").symlink_to(REPO)  # what `pip install -e .` maps
    source = save(tmp_path / "k.safetensors", kohya_sd1())
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "pkg")}
    run = subprocess.run([sys.executable, "-m", "tunekit", "convert", "lora", str(source), str(tmp_path / "d.safetensors"),
                          "--to", "diffusers"], check=False, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "SD 1.x LoRA, kohya -> diffusers" in run.stderr
    assert any(key.startswith("unet.") for key in safetensors.torch.load_file(str(tmp_path / "d.safetensors")))


def test_every_convert_subcommand(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    base = save(tmp_path / "base.safetensors", mini_checkpoint("sd1"))
    lora = save(tmp_path / "l.safetensors", add_lora({}, "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", 8, 8))
    torch.save({"state_dict": mini_checkpoint("sd1")}, tmp_path / "m.ckpt")
    commands = [
        ["checkpoint", str(tmp_path / "m.ckpt"), str(tmp_path / "m.safetensors"), "--precision", "fp16", "--ema", "drop"],
        ["merge", str(base), str(tmp_path / "merged.safetensors"), "--lora", f"{lora}:0.5:1", "--lora", str(lora)],
        ["extract", str(tmp_path / "merged.safetensors"), str(base), str(tmp_path / "x.safetensors"), "--rank", "4"],
        ["resize", str(tmp_path / "x.safetensors"), str(tmp_path / "r.safetensors"), "--rank", "1", "--to", "comfy"],
        ["lora", str(tmp_path / "r.safetensors"), str(tmp_path / "back.safetensors"), "--to", "kohya", "--base", str(base)],
    ]
    for command in commands:
        assert main(["convert", *command]) == 0, command
    assert safetensors.torch.load_file(str(tmp_path / "m.safetensors"))["first_stage_model.decoder.conv_out.weight"].dtype == torch.float16
    assert "Merged l.safetensors" in caplog.text and "Extracted 1 layers" in caplog.text and "Resized 1 layers" in caplog.text


def test_to_and_from_diffusers(tmp_path):
    source = save(tmp_path / "sd1.safetensors", small_checkpoint("sd1"))
    assert main(["convert", "to-diffusers", str(source), str(tmp_path / "folder"), "--prediction-type", "epsilon"]) == 0
    assert main(["convert", "from-diffusers", str(tmp_path / "folder"), str(tmp_path / "back.safetensors")]) == 0
    back = safetensors.torch.load_file(str(tmp_path / "back.safetensors"))
    assert all(torch.equal(back[key], value) for key, value in small_checkpoint("sd1").items())


def test_a_user_error_is_one_message_and_exit_code_2(tmp_path, caplog):
    assert main(["convert", "lora", str(tmp_path / "missing.safetensors"), str(tmp_path / "o.safetensors"), "--to", "comfy"]) == 2
    assert "does not exist" in caplog.text
