"""Optimizers by name, built over the trainable's parameter groups (each group may carry its own lr).

Optional ones come through `require`: bitsandbytes (8-bit AdamW) and pytorch-optimizer (Lion, Prodigy,
schedule-free AdamW) are one extra each; Adafactor is transformers' implementation (a ComfyUI dependency).
"""

from collections.abc import Callable

import torch

from .config import TrainConfig
from .optional import require

PYTORCH_OPTIMIZER = ("pytorch_optimizer", "pytorch-optimizer")


def _one_kernel_per_step(device: torch.device) -> dict:
    """torch's fused update on CUDA, and on the CPU where this torch has it (since 2.4); foreach (a few large
    kernels instead of one per tensor) elsewhere, e.g. on MPS, where fused kernels came per optimizer and
    version. CPU, SD1.5 LoRA on every layer (17M parameters, 564 tensors), 1 thread: AdamW's update takes
    14 ms fused against ~76 ms foreach."""
    if device.type == "cuda" or (device.type == "cpu" and "cpu" in _fused_devices()):
        return {"fused": True}
    return {"foreach": True}


def _fused_devices() -> list[str]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # older torch: fused on CUDA only
        return ["cuda"]
    return _get_fused_kernels_supported_devices()


def _adamw(groups, config: TrainConfig, device: torch.device):
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay,
                             **_one_kernel_per_step(device))


def _adamw8bit(groups, config: TrainConfig, device: torch.device):
    bnb = require("bitsandbytes", "The 'adamw8bit' optimizer")
    return bnb.optim.AdamW8bit(groups, lr=config.learning_rate, weight_decay=config.weight_decay)


def _adafactor(groups, config: TrainConfig, device: torch.device):
    optimization = require("transformers.optimization", "The 'adafactor' optimizer", "transformers")
    # A fixed learning rate (the schedule drives it), as kohya's and diffusers' LoRA recipes use Adafactor.
    return optimization.Adafactor(groups, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  scale_parameter=False, relative_step=False, warmup_init=False)


def _pytorch_optimizer(class_name: str, option: str, **fixed):
    def build(groups, config: TrainConfig, device: torch.device):
        module = require(PYTORCH_OPTIMIZER[0], f"The '{option}' optimizer", PYTORCH_OPTIMIZER[1])
        extra = {key: value(config) for key, value in fixed.items()}
        return getattr(module, class_name)(groups, lr=config.learning_rate, weight_decay=config.weight_decay, **extra)

    return build


def _sgd(groups, config: TrainConfig, device: torch.device):
    return torch.optim.SGD(groups, lr=config.learning_rate, momentum=0.9, weight_decay=config.weight_decay,
                           **_one_kernel_per_step(device))


OPTIMIZER_BUILDERS: dict[str, Callable] = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
    "adafactor": _adafactor,
    "lion": _pytorch_optimizer("Lion", "lion"),
    "prodigy": _pytorch_optimizer("Prodigy", "prodigy"),
    "schedule_free_adamw": _pytorch_optimizer("ScheduleFreeAdamW", "schedule_free_adamw",
                                              warmup_steps=lambda config: config.lr_warmup_steps),
    "sgd": _sgd,
}


def build_optimizer(param_groups: list[dict], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """`param_groups`: torch's list of {"params": [...], "lr": ...}; a group without "lr" gets learning_rate."""
    return OPTIMIZER_BUILDERS[config.optimizer](param_groups, config, device)


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """kohya's `ss_optimizer`: the class's module and name, e.g. 'bitsandbytes.optim.adamw.AdamW8bit'."""
    kind = type(optimizer)
    return f"{kind.__module__}.{kind.__name__}"


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Schedule-free optimizers train one sequence of weights and evaluate (and save) another."""
    return hasattr(optimizer, "eval") and any("train_mode" in group for group in optimizer.param_groups)
