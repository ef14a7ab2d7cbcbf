"""Resumable training state: the artefact (a loadable kohya LoRA) plus everything a run needs to continue
exactly: raw weights, optimizer, LR schedule, loss scaler, EMA, step, RNG and data order.

Layout: <run_dir>/step_000120/{lora.safetensors, state.pt, config.toml}. `state.pt` holds only tensors and
plain containers so it loads with `torch.load(weights_only=True)`. Format 1 (before the training options)
had no scheduler/scaler/EMA/raw weights: it loads as a constant-LR AdamW run, which it was.
"""

import glob
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from .errors import SaveError, TuneKitError
from .files import atomic_write, free_bytes, readable_size, write_failure

log = logging.getLogger(__name__)
KEEP_LAST = 2
STATE_FORMAT = 2
CONFIG_FILE = "config.toml"


@dataclass
class TrainState:
    step: int
    network: dict[str, torch.Tensor]  # the artefact: kohya keys, fp32 (EMA / averaged weights when saved so)
    optimizer: dict
    generator: torch.Tensor
    order: list[int]
    position: int
    config: dict
    dataset: str = ""  # fingerprint of the planned dataset the order indexes
    raw_network: dict[str, torch.Tensor] | None = None  # the trained weights where they differ from `network`
    scheduler: dict | None = None
    scaler: dict | None = None
    ema: dict | None = None
    config_toml: str = ""


def save_state(run_dir: Path, state: TrainState) -> Path:
    """Write a new checkpoint folder, then prune old ones: the last good one is never lost. A write that
    fails (a full disk...) leaves no half-written folder and raises SaveError naming the state kept."""
    folder = run_dir / f"step_{state.step:06d}"
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_state(folder, state)
    except Exception as error:  # safetensors and torch.save report a full disk as their own error types
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise SaveError(_save_failure(folder, state.step, error, latest_state_folder(run_dir))) from error
    _prune(run_dir, keep=folder)
    return folder


def _write_state(folder: Path, state: TrainState) -> None:
    atomic_write(folder / "lora.safetensors", lambda temp: safetensors.torch.save_file(state.network, str(temp)))
    extras = {
        "format": STATE_FORMAT,
        "step": state.step,
        "optimizer": state.optimizer,
        "generator": state.generator,
        "order": state.order,
        "position": state.position,
        "config": json.dumps(state.config),
        "dataset": state.dataset,
        "raw_network": state.raw_network,
        "scheduler": state.scheduler,
        "scaler": state.scaler,
        "ema": state.ema,
    }
    atomic_write(folder / "state.pt", lambda temp: torch.save(extras, temp))
    if state.config_toml:
        write_config(folder, state.config_toml)


def _save_failure(folder: Path, step: int, error: Exception, kept: Path | None) -> str:
    return (f"TuneKit could not save the training state of step {step} in {folder.parent} "
            f"{write_failure(folder.parent, error)}. Free some space there or choose another output folder, then "
            "train again or resume; "
            + (f"the last complete state is kept: {kept}." if kept else "no earlier state of this run was saved."))


def check_room_for_states(run_dir: Path, state_bytes: int, steps: int, save_every: int) -> None:
    """Before any work: raise SaveError when the states this run holds at once cannot fit on the disk of
    `run_dir`: the last KEEP_LAST plus the one being written (old ones go only once it is complete)."""
    written = (steps - 1) // save_every + 1 if save_every else 1  # every save_every steps, and the final one
    at_once = min(written, KEEP_LAST + 1)
    found = sum(path.stat().st_size for folder in _checkpoint_folders(run_dir) for path in folder.iterdir()
                if path.is_file())  # a resumed run's states: replaced as new ones come
    needed, free = at_once * state_bytes - found, free_bytes(run_dir)
    if free is None or needed <= free:
        return
    fewer = ", or set save_every to 0 (one final state)" if at_once > 1 else ""
    raise SaveError(f"This run holds up to {at_once} training state{'s' if at_once > 1 else ''} of "
                    f"~{readable_size(state_bytes)} at once in {run_dir} (the last {KEEP_LAST} are kept, and one more "
                    f"while it is written): {readable_size(needed)} more, and {readable_size(free)} are free there. "
                    f"Free some space, choose another output folder{fewer}.")


def write_config(folder: Path, config_toml: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_write(folder / CONFIG_FILE, lambda temp: Path(temp).write_text(config_toml, encoding="utf-8"))


def latest_state_folder(run_dir: Path) -> Path | None:
    folders = [folder for folder in _checkpoint_folders(run_dir) if (folder / "state.pt").is_file()]
    return folders[-1] if folders else None


def latest_run_state(base_dir: Path) -> Path | None:
    """The newest resumable state of the run named like `base_dir`, also in its `<name>_N` folders."""
    pattern = re.compile(re.escape(base_dir.name) + r"(_\d+)?$")
    folders = [d for d in base_dir.parent.glob(f"{glob.escape(base_dir.name)}*") if pattern.match(d.name)] \
        if base_dir.parent.is_dir() else []
    states = [state for state in map(latest_state_folder, folders) if state]
    return max(states, key=lambda state: state.stat().st_mtime, default=None)


def load_state(folder: Path) -> TrainState:
    try:
        extras = torch.load(folder / "state.pt", weights_only=True)
        network = safetensors.torch.load_file(str(folder / "lora.safetensors"))
    except Exception as error:  # a truncated or foreign file: say which and what to do
        raise TuneKitError(
            f"cannot read the training state in {folder} ({type(error).__name__}: {error}). Resume from another "
            f"step_* folder of the run, or start a new run."
        ) from error
    if extras.get("format", 1) > STATE_FORMAT:
        raise TuneKitError(f"{folder} was saved by a newer TuneKit (state format {extras['format']}): update TuneKit "
                           f"to resume it.")
    return TrainState(
        step=extras["step"],
        network=network,
        optimizer=extras["optimizer"],
        generator=extras["generator"],
        order=list(extras["order"]),
        position=extras["position"],
        config=json.loads(extras["config"]),
        dataset=extras.get("dataset", ""),
        raw_network=extras.get("raw_network"),
        scheduler=extras.get("scheduler"),
        scaler=extras.get("scaler"),
        ema=extras.get("ema"),
    )


def _checkpoint_folders(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    return sorted(folder for folder in run_dir.glob("step_*") if folder.is_dir())


def _prune(run_dir: Path, keep: Path) -> None:
    folders = [folder for folder in _checkpoint_folders(run_dir) if folder != keep]
    for folder in folders[: max(0, len(folders) - (KEEP_LAST - 1))]:
        log.debug("TuneKit removes old checkpoint %s", folder)
        shutil.rmtree(folder, ignore_errors=True)
