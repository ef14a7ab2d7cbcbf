"""`tunekit train --config run.toml`: the run file is read and checked before any model work (every problem
at once, each naming its key, exit 2); the config Train LoRA writes reads back as the same TrainConfig;
Ctrl-C asks the session to stop. The real training run is tests/e2e/test_headless_train.py."""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import torch
from fakes import FakeBridge
from helpers import solid_dataset
from tunekit.nodes import headless
from tunekit.nodes.headless import ConsoleHost
from tunekit.cli import main
from tunekit.trainer.config import TrainConfig
from tunekit.trainer.errors import ConfigError
from tunekit.trainer.monitor import MonitorSettings
from tunekit.trainer.runfile import read_run_file, run_table

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "images").mkdir()
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


VALID_RUN = '[run]\nname = "demo"\ncheckpoint = "model.safetensors"\ndataset = "images"\n'


def test_bad_values_exit_2_with_every_problem_naming_its_key(run_dir, caplog):
    config = write(run_dir, 'steps = 0\nlearnig_rate = 1e-4\nrank = "four"\noptimizer = "adam"\n'
                            '[run]\nname = "demo"\ncheckpoint = "missing.safetensors"\ndataset = "images"\n')
    assert main(["train", "--config", str(config)]) == 2
    # Type and name problems first (values of the wrong type cannot be range-checked).
    assert "unknown key 'learnig_rate'" in caplog.text and "did you mean 'learning_rate'?" in caplog.text
    assert "rank is 'four'" in caplog.text and "whole number" in caplog.text

    caplog.clear()
    config = write(run_dir, 'steps = 0\noptimizer = "adam"\n[run]\nmethod = "dreambooth"\n'
                            'checkpoint = "missing.safetensors"\ndataset = "images"\n')
    assert main(["train", "--config", str(config)]) == 2
    for expected in ("steps is 0", "optimizer is 'adam'", "run.method is 'dreambooth': choose one of lora, finetune",
                     "run.checkpoint is '", "missing.safetensors', which is not a file"):
        assert expected in caplog.text, expected


def test_a_validation_table_reads_as_sample_and_validates_settings_and_writes_back_the_same(run_dir):
    (run_dir / "held_out").mkdir()
    text = VALID_RUN + '[validation]\nevery = 4\ndataset = "held_out"\npatience = 2\nkeep_best = true\n'
    run = read_run_file(write(run_dir, text))
    assert run.validation == MonitorSettings(every=4, patience=2, keep_best=True)
    assert run.validation_dataset == run_dir / "held_out"
    assert read_run_file(write(run_dir, TrainConfig().to_toml() + run.run_table())) == run


@pytest.mark.parametrize("table, expected", [
    ('every = 4\npatience = "2"', "validation.patience is '2' in "),
    ('every = 0\nvalidation_count = 1', "validation.every is 0"),
    ('patience = 2', "validates nothing: set validation_count"),
    ('validation_count = 1\ndataset = "images"', "validation_count is 1 and dataset is set: use one"),
    ('dataset = "nowhere"', "validation.dataset is '"),
    ('every = 4\npatince = 2', "did you mean 'validation.patience'?"),
])
def test_a_bad_validation_table_says_which_key_and_what_to_do(run_dir, table, expected):
    with pytest.raises(ConfigError) as raised:
        read_run_file(write(run_dir, f"{VALID_RUN}[validation]\n{table}\n"))
    assert expected in str(raised.value)


def test_missing_checkpoint_names_the_flag_and_the_flag_fills_it(run_dir):
    config = write(run_dir, '[run]\ndataset = "images"\n')
    with pytest.raises(ConfigError, match=r"run\.checkpoint is not set .* --checkpoint PATH"):
        read_run_file(config)
    run = read_run_file(config, {"checkpoint": str(run_dir / "model.safetensors")})
    assert run.checkpoint == run_dir / "model.safetensors" and run.dataset == run_dir / "images"
    assert run.output_dir == run_dir and (run.name, run.method) == ("tunekit_lora", "lora")


def test_the_config_train_lora_writes_reads_back_as_the_same_run(run_dir):
    config = TrainConfig(steps=7, learning_rate=3e-4, rank=4, alpha=2.0, seed=11, optimizer="lion", ema_decay=0.99,
                         lr_scheduler="cosine", lr_warmup_steps=2, text_encoders="all", target_pattern=r"attn2\.to_k$")
    text = config.to_toml() + run_table("graph run", run_dir / "model.safetensors", run_dir / "images",
                                        output_dir=run_dir / "out", method="finetune")
    run = read_run_file(write(run_dir, text))
    assert run.config == config
    assert (run.method, run.name, run.checkpoint, run.dataset, run.output_dir) == (
        "finetune", "graph run", run_dir / "model.safetensors", run_dir / "images", run_dir / "out")
    # What the headless run writes into its own config.toml reads back the same too.
    assert read_run_file(write(run_dir, config.to_toml() + run.run_table())) == run


def test_a_python_without_comfy_is_told_how_to_run_it(run_dir, tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "tunekit").symlink_to(REPO)
    config = write(run_dir, VALID_RUN)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "pkg")}
    done = subprocess.run([sys.executable, "-m", "tunekit", "train", "--config", str(config)], check=False, capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "cannot import ComfyUI's 'comfy' package" in done.stderr and "--comfyui PATH" in done.stderr

    done = subprocess.run([sys.executable, "-m", "tunekit", "train", "--config", str(config), "--comfyui", str(run_dir)],
                          check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and f"--comfyui '{run_dir}' is not a ComfyUI folder" in done.stderr, done.stderr


def test_ctrl_c_asks_to_stop_and_a_second_one_interrupts(caplog):
    caplog.set_level(logging.WARNING)
    host = ConsoleHost()
    before = signal.getsignal(signal.SIGINT)
    with host.ctrl_c_cancels():
        assert not host.should_stop()
        os.kill(os.getpid(), signal.SIGINT)
        assert host.should_stop() and "stopping after this step" in caplog.text
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


class StopAfter(ConsoleHost):
    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def emit(self, event):
        super().emit(event)
        self.stop_requested = self.stop_requested or getattr(event, "step", 0) >= self.steps


def test_a_stopped_headless_run_resumes_exactly_and_saves_its_lora_with_metadata(run_dir):
    text = TrainConfig(steps=6, learning_rate=5e-3, rank=4, alpha=4.0, resolution=64, seed=3).to_toml() + VALID_RUN
    run = read_run_file(write(run_dir, text))
    straight = headless._start_session(FakeBridge(), solid_dataset(), run, resume=False)
    straight.run(ConsoleHost())

    stopped = headless._start_session(FakeBridge(), solid_dataset(), run, resume=False)
    assert stopped.run(StopAfter(2)).stopped_early and stopped.run_dir == run_dir / "demo"
    resumed = headless._start_session(FakeBridge(), solid_dataset(), run, resume=True)
    assert resumed.step == 2 and resumed.run_dir == run_dir / "demo"
    resumed.run(ConsoleHost())
    expected, actual = straight.network.kohya_state_dict(), resumed.network.kohya_state_dict()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)

    path = headless.save_run_lora(resumed, run.name)
    assert path == run_dir / "demo" / "demo.safetensors"
    with safetensors.safe_open(str(path), "pt") as handle:
        assert handle.metadata()["ss_output_name"] == "demo" and handle.metadata()["ss_steps"] == "6"
