"""Learning-rate schedules: diffusers' `get_scheduler` (constant, constant_with_warmup, cosine,
cosine_with_restarts, linear, polynomial), stepped once per optimizer step."""

import torch

from .config import TrainConfig
from .optional import require


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    name = config.lr_scheduler
    warmup = 0 if config.optimizer == "schedule_free_adamw" else config.lr_warmup_steps
    if name == "constant":
        # What diffusers' get_constant_schedule builds (the same class and state), without importing diffusers:
        # the default run needs only ComfyUI's own packages.
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1)
    get_scheduler = require("diffusers.optimization", f"the '{name}' learning-rate schedule").get_scheduler
    extra = {}
    if name == "cosine_with_restarts":
        extra["num_cycles"] = config.lr_scheduler_num_cycles
    elif name == "polynomial":
        extra["power"] = config.lr_scheduler_power
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=config.steps, **extra)
