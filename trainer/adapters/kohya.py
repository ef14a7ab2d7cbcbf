"""kohya-format LoRA files: the keys, `ss_*` metadata and hashes other UIs read (FORMATS.md)."""

import hashlib
import io
import json
from datetime import datetime, timezone
from pathlib import Path

import safetensors.torch
import torch

from ..config import TrainConfig
from ..errors import ConfigError
from .algorithms import ALGORITHMS
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
    optimizer: str = "torch.optim.adamw.AdamW",
    zero_terminal_snr: bool = False,
    processes: int = 1,
) -> dict[str, str]:
    """kohya's `ss_*` keys (the minimum set, what UIs display, and every training option under kohya's name
    where it has one) plus the SAI model spec."""
    metadata = {
        "ss_v2": "False",
        "ss_base_model_version": family.base_model_version,
        **network_metadata(config),
        "ss_output_name": output_name,
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_num_train_images": str(num_images),
        "ss_tag_frequency": json.dumps({output_name: tag_frequency}),
        "ss_steps": str(steps_done),
        "ss_max_train_steps": str(config.steps),
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.effective_unet_lr),
        "ss_text_encoder_lr": str(config.effective_text_encoder_lr) if config.text_encoders != "none" else "0",
        "ss_network_train_unet_only": str(config.text_encoders == "none"),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_total_batch_size": str(config.batch_size * config.gradient_accumulation_steps * processes),
        "ss_seed": str(config.seed),
        **training_option_metadata(config, optimizer, prediction_type, zero_terminal_snr),
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


def training_option_metadata(config: TrainConfig, optimizer: str, prediction_type: str,
                             zero_terminal_snr: bool) -> dict[str, str]:
    """The training options: kohya's `ss_*` names where sd-scripts has the option, `ss_tunekit_*` otherwise."""
    optimizer_args = {"weight_decay": config.weight_decay}
    if config.optimizer == "sgd":
        optimizer_args["momentum"] = 0.9
    return {
        "ss_optimizer": f"{optimizer}({', '.join(f'{k}={v}' for k, v in optimizer_args.items())})",
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_lr_scheduler_num_cycles": str(config.lr_scheduler_num_cycles),
        "ss_lr_scheduler_power": str(config.lr_scheduler_power),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_min_snr_gamma": str(config.min_snr_gamma) if config.min_snr_gamma else "None",
        "ss_noise_offset": str(config.noise_offset) if config.noise_offset else "None",
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_zero_terminal_snr": str(zero_terminal_snr),
        "ss_timestep_bias": json.dumps({
            "strategy": config.timestep_bias_strategy, "multiplier": config.timestep_bias_multiplier,
            "portion": config.timestep_bias_portion, "begin": config.timestep_bias_begin, "end": config.timestep_bias_end,
        }),
        "ss_caption_dropout_rate": str(config.caption_dropout_rate),
        "ss_ema_decay": str(config.ema_decay) if config.ema_decay else "None",
        "ss_ema_saved": str(bool(config.ema_decay) and config.save_ema),
        "ss_mixed_precision": {"fp32": "no"}.get(config.mixed_precision, config.mixed_precision),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_clip_skip": str(config.clip_skip) if config.clip_skip > 1 else "None",
        "ss_full_fp16": "False",
        "ss_deterministic": str(config.deterministic),
    }


def network_metadata(config: TrainConfig) -> dict[str, str]:
    """`ss_network_*` as the trainer that reloads the file writes them: kohya `networks.lora` (LoCon's
    conv_dim / conv_alpha) or LyCORIS `lycoris.kohya` (algo, factor, dora_wd); values are strings, as theirs."""
    spec = ALGORITHMS[config.network]
    args = {**spec.network_args, "targets": config.targets}
    if config.target_pattern:
        args["target_pattern"] = config.target_pattern
    if spec.conv_layers or spec.network_module == "lycoris.kohya":
        args |= {"conv_dim": str(config.conv_rank or config.rank), "conv_alpha": str(config.conv_alpha or config.alpha)}
    if "factor" in spec.options:
        args["factor"] = str(config.lokr_factor)
    return {
        "ss_network_module": spec.network_module,
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(float(config.alpha)),
        "ss_network_args": json.dumps(args),
    }


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


def init_tensors(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A LoRA file to continue training from, as fp32 tensors, and how errors name it."""
    if not path.is_file():
        raise ConfigError([f"init_lora '{path}' is not a file: pick a .safetensors LoRA (e.g. from models/loras)."])
    if path.suffix != ".safetensors":
        raise ConfigError([f"init_lora '{path.name}' is not a .safetensors file: TuneKit continues only safetensors LoRAs."])
    tensors, _ = load_lora(path)
    return {key: value.float() for key, value in tensors.items()}, f"init_lora '{path.name}'"


def load_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safetensors.safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    return safetensors.torch.load_file(str(path)), metadata
