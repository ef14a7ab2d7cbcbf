"""kohya-format LoRA files: the keys, `ss_*` metadata and hashes other UIs read (FORMATS.md)."""

import hashlib
import io
import json
from datetime import datetime, timezone
from pathlib import Path

import safetensors.torch
import torch

from ..config import TrainConfig
from ..families import Family
from ..files import atomic_write


def lora_metadata(
    family: Family,
    config: TrainConfig,
    *,
    output_name: str,
    steps_done: int,
    num_images: int,
    tag_frequency: dict[str, int],
    started_at: float,
    prediction_type: str,
) -> dict[str, str]:
    """kohya's `ss_*` keys (the minimum set and what UIs display) plus the SAI model spec."""
    metadata = {
        "ss_v2": "False",
        "ss_base_model_version": family.base_model_version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(float(config.alpha)),
        "ss_network_args": json.dumps({"targets": config.targets}),
        "ss_output_name": output_name,
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_num_train_images": str(num_images),
        "ss_tag_frequency": json.dumps({output_name: tag_frequency}),
        "ss_steps": str(steps_done),
        "ss_max_train_steps": str(config.steps),
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.learning_rate),
        "ss_text_encoder_lr": "0",
        "ss_optimizer": "torch.optim.AdamW",
        "ss_lr_scheduler": "constant",
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_seed": str(config.seed),
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(datetime.now(timezone.utc).timestamp()),
        "ss_training_comment": "trained with TuneKit",
        "tunekit_config": json.dumps(config.to_dict()),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.modelspec_architecture}/lora",
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "modelspec.prediction_type": prediction_type,
    }
    return metadata


def tag_frequency(captions: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in filter(None, (part.strip() for part in caption.split(","))):
            counts[tag] = counts.get(tag, 0) + 1
    return counts


def model_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` / `sshs_legacy_hash` as sd-scripts computes them (over `ss_*` metadata only)."""
    ss_only = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    data = io.BytesIO(safetensors.torch.save(tensors, ss_only))
    header_length = int.from_bytes(data.read(8), "little")
    data.seek(8 + header_length)
    model_hash = hashlib.sha256(data.read()).hexdigest()
    data.seek(0x100000)
    legacy_hash = hashlib.sha256(data.read(0x10000)).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write atomically; the caller picks an unused path (we never overwrite unasked)."""
    metadata = {**metadata, **model_hashes(tensors, metadata)}
    contiguous = {key: value.contiguous() for key, value in tensors.items()}
    return atomic_write(path, lambda temp: safetensors.torch.save_file(contiguous, str(temp), metadata))


def load_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safetensors.safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    return safetensors.torch.load_file(str(path)), metadata
