"""Batch text conditioning the way ComfyUI batches it."""

import math

import torch


def stack_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    """Stack [tokens, dim] contexts; unequal lengths (long prompts) are tiled to their LCM,
    as ComfyUI's CONDCrossAttn does when it batches conds."""
    length = math.lcm(*(context.shape[0] for context in contexts))
    return torch.stack([context.repeat(length // context.shape[0], 1) for context in contexts])
