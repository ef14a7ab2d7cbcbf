"""Learning-rate schedules: diffusers' `get_scheduler` (constant, constant_with_warmup, cosine,
cosine_with_restarts, linear, polynomial), stepped once per optimizer step."""

import torch

from .config import TrainConfig


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    from diffusers.optimization import get_scheduler

    name = config.lr_scheduler
    extra = {}
    if name == "cosine_with_restarts":
        extra["num_cycles"] = config.lr_scheduler_num_cycles
    elif name == "polynomial":
        extra["power"] = config.lr_scheduler_power
    warmup = 0 if config.optimizer == "schedule_free_adamw" else config.lr_warmup_steps
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=config.steps, **extra)
