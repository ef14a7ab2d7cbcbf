"""Resumable training state: the adapter (a loadable kohya LoRA) plus optimizer, step and RNG.

Layout: <run_dir>/step_000120/{lora.safetensors, state.pt}. `state.pt` holds only tensors and
plain containers so it loads with `torch.load(weights_only=True)`.
"""

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from .files import atomic_write

log = logging.getLogger(__name__)
KEEP_LAST = 2


@dataclass
class TrainState:
    step: int
    network: dict[str, torch.Tensor]  # kohya keys, fp32
    optimizer: dict
    generator: torch.Tensor
    order: list[int]
    position: int
    config: dict
    dataset: str = ""  # fingerprint of the planned dataset the order indexes


def save_state(run_dir: Path, state: TrainState) -> Path:
    """Write a new checkpoint folder, then prune old ones: the last good one is never lost."""
    folder = run_dir / f"step_{state.step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "lora.safetensors", lambda temp: safetensors.torch.save_file(state.network, str(temp)))
    extras = {
        "step": state.step,
        "optimizer": state.optimizer,
        "generator": state.generator,
        "order": state.order,
        "position": state.position,
        "config": json.dumps(state.config),
        "dataset": state.dataset,
    }
    atomic_write(folder / "state.pt", lambda temp: torch.save(extras, temp))
    _prune(run_dir, keep=folder)
    return folder


def latest_state_folder(run_dir: Path) -> Path | None:
    folders = [folder for folder in _checkpoint_folders(run_dir) if (folder / "state.pt").is_file()]
    return folders[-1] if folders else None


def load_state(folder: Path) -> TrainState:
    extras = torch.load(folder / "state.pt", weights_only=True)
    return TrainState(
        step=extras["step"],
        network=safetensors.torch.load_file(str(folder / "lora.safetensors")),
        optimizer=extras["optimizer"],
        generator=extras["generator"],
        order=list(extras["order"]),
        position=extras["position"],
        config=json.loads(extras["config"]),
        dataset=extras.get("dataset", ""),
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
