"""Data-parallel training (trainer/parallel.py) in real processes: torchrun starts two, as `accelerate launch`
does on two GPUs, on the gloo backend.

Two processes with one accumulation step train the same weights as one process with two (the same batches
and noise, their gradients averaged), both processes end with those weights, only the main one writes, and a
stop seen by one process stops both at the same step with a state that resumes.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from helpers import make_session
from tunekit.trainer.checkpoints import latest_state_folder
from tunekit.trainer.config import TrainConfig
from tunekit.trainer.host import NullHost
from tunekit.trainer.memory import common_settings

WORKER = Path(__file__).with_name("parallel_worker.py")
SETTINGS = {"steps": 6, "batch_size": 1, "save_every": 2, "learning_rate": 5e-3}


def run_two_processes(out: Path, **settings) -> list[dict]:
    """Both processes' results (steps, losses, run folder) and trained weights."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(out), json.dumps({**SETTINGS, **settings})]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads((out / f"result_{rank}.json").read_text()) for rank in range(2)]
    for rank, result in enumerate(results):
        result["weights"] = torch.load(out / f"weights_{rank}.pt")
    return results


def single_process(run_dir: Path | None = None, **settings):
    session = make_session(run_dir, **{**SETTINGS, **settings})
    session.run(NullHost())
    return session


def assert_same_weights(first: dict, second: dict, tolerance: float) -> None:
    assert first.keys() == second.keys()
    worst = max((first[key] - second[key]).abs().max().item() for key in first)
    print(f"weights differ by up to {worst:.2e}")
    assert worst <= tolerance, f"weights differ by up to {worst:.2e}"


def test_two_processes_train_what_one_trains_with_twice_the_accumulation_and_only_the_main_one_writes(tmp_path):
    main, other = run_two_processes(tmp_path)
    alone = single_process(gradient_accumulation_steps=2)
    print(f"\nlosses, 2 processes: {[round(v, 4) for v in main['losses']]}; "
          f"1 process with 2 accumulation steps: {[round(v, 4) for v in alone.losses]}")
    assert main["steps"] == other["steps"] == 6
    assert torch.allclose(torch.tensor(main["losses"]), torch.tensor(alone.losses), rtol=1e-4)
    assert main["losses"] == other["losses"], "the reported loss is the mean over both processes"
    assert_same_weights(main["weights"], other["weights"], tolerance=0.0)
    assert_same_weights(main["weights"], alone.network.state_dict(), tolerance=1e-6)  # measured: bit-equal
    half = single_process().network.state_dict()  # one process, one accumulation step: half the batches
    assert max((main["weights"][key] - half[key]).abs().max().item() for key in half) > 1e-3
    assert main["run_dir"] == str(tmp_path / "run") and other["run_dir"] == "None"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.toml", "step_000002", "step_000004"]


def test_a_stop_seen_by_one_process_stops_both_at_the_same_step_and_resumes(tmp_path):
    main, other = run_two_processes(tmp_path, stop_at=3)
    assert main["stopped_early"] and other["stopped_early"]
    assert main["steps"] == other["steps"] == 3
    assert latest_state_folder(tmp_path / "run").name == "step_000003"

    resumed = run_two_processes(tmp_path, resume=True)[0]
    assert resumed["steps"] == 6
    straight = single_process(gradient_accumulation_steps=2)  # = two processes uninterrupted (first test)
    assert_same_weights(resumed["weights"], straight.network.state_dict(), tolerance=1e-6)


def test_ctrl_c_in_the_launchers_terminal_keeps_the_last_completed_step(tmp_path):
    """SIGINT to the whole process group, as a terminal sends it: torchrun's agent forwards a second one."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(tmp_path), json.dumps({**SETTINGS, "steps": 1000})]
    launched = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "step_000004").is_dir() and launched.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(launched.pid, signal.SIGINT)
    output = launched.communicate(timeout=120)[0]
    kept = latest_state_folder(tmp_path / "run")
    print(f"\nexit code {launched.returncode}; kept {kept.name}")
    assert kept is not None and kept.name >= "step_000004", output[-3000:]
    target = int(kept.name.removeprefix("step_")) + 2
    resumed = make_session(tmp_path / "run", **{**SETTINGS, "steps": target})
    resumed.resume(kept)
    assert resumed.run(NullHost()).steps_done == target


def test_processes_whose_memory_fits_differ_all_take_the_most_careful_settings():
    """'auto' on GPUs with different free memory: the smallest batch with its accumulation, checkpointing if any."""
    roomy = TrainConfig(batch_size=4, gradient_accumulation_steps=1)
    checkpointed = TrainConfig(batch_size=4, gradient_accumulation_steps=1, gradient_checkpointing=True)
    halved = TrainConfig(batch_size=2, gradient_accumulation_steps=2)
    agreed = common_settings([roomy, checkpointed, halved])
    assert (agreed.batch_size, agreed.gradient_accumulation_steps, agreed.gradient_checkpointing) == (2, 2, True)
    assert common_settings([roomy, roomy]) == roomy
