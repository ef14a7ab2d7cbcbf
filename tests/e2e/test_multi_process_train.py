"""`accelerate launch --multi_gpu --num_processes 2 -m tunekit train --config run.toml`: the headless run on two
processes, as on two GPUs, here on the CPU (`--cpu`: gloo between the processes), with ComfyUI's own loading
code in each.

Two processes with batch 2 train, bit for bit, the LoRA one process trains with batch 2 and two accumulation
steps (the same images and noise, the gradients averaged), and only the first process writes: one run folder, one LoRA, whose
metadata gives the total batch.
"""

import os
import subprocess
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from .test_train_lora import solid_folder, tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
RUN = "e2e_two_processes"


def run_file(folder: Path, checkpoint: Path, dataset: Path, accumulation: int) -> Path:
    folder.mkdir()
    path = folder / "run.toml"
    path.write_text(f'steps = 6\nlearning_rate = 5e-3\nrank = 4\nalpha = 4.0\nbatch_size = 2\nresolution = 64\n'
                    f'seed = 7\nsave_every = 3\ngradient_accumulation_steps = {accumulation}\n'
                    f'[run]\nname = "{RUN}"\ncheckpoint = "{checkpoint}"\ndataset = "{dataset}"\noutput_dir = "runs"\n')
    return path


def tunekit_train(comfy_host, folder: Path, config: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    package = folder / "pkg"
    package.mkdir()
    (package / "tunekit").symlink_to(REPO)  # what `pip install -e .` maps
    # One thread in every process (accelerate's default for each): thread counts change float summation order.
    env = comfy_host.env({"PYTHONPATH": os.pathsep.join([str(package), str(comfy_host.stubs_dir)]), "OMP_NUM_THREADS": "1"})
    command = [*launcher, "-m", "tunekit", "train", "--config", str(config), "--comfyui", str(comfy_host.comfy_dir), "--cpu"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=folder, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_two_processes_under_accelerate_launch_train_what_one_trains_with_twice_the_accumulation(comfy, comfy_host, tmp_path):
    checkpoint = comfy.models_dir / "checkpoints" / tiny_checkpoint(comfy, "sd15")
    dataset = solid_folder(tmp_path / "data", "red")
    accelerate = [str(Path(comfy_host.python).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = tunekit_train(comfy_host, tmp_path / "two", run_file(tmp_path / "two", checkpoint, dataset, 1), accelerate)
    one = tunekit_train(comfy_host, tmp_path / "one", run_file(tmp_path / "one", checkpoint, dataset, 2),
                        [str(comfy_host.python)])
    print(f"\ntwo processes: {two.stderr.strip().splitlines()[-1]}\none process: {one.stderr.strip().splitlines()[-1]}")
    assert "training on 2 processes: each step trains 2 batches of 2" in two.stderr
    assert two.stderr.count("step 6/6 loss") == 1, "the second process logs only warnings"

    runs = tmp_path / "two" / "runs"
    assert [p.name for p in runs.iterdir()] == [RUN], "the second process wrote a run folder of its own"
    assert {p.name for p in (runs / RUN).iterdir()} == {"config.toml", "step_000003", "step_000006", f"{RUN}.safetensors"}
    lora = runs / RUN / f"{RUN}.safetensors"
    with safetensors.safe_open(str(lora), "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_batch_size_per_device"], metadata["ss_total_batch_size"], metadata["ss_steps"]) == ("2", "4", "6")

    two_processes = safetensors.torch.load_file(str(lora))
    one_process = safetensors.torch.load_file(str(tmp_path / "one" / "runs" / RUN / f"{RUN}.safetensors"))
    assert two_processes.keys() == one_process.keys() and two_processes
    differ = [key for key in one_process if not torch.equal(two_processes[key], one_process[key])]
    assert not differ, f"{len(differ)} of {len(one_process)} tensors differ, e.g. {differ[:3]}"
