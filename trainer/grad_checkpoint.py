"""Gradient checkpointing on a host's modules without changing them for anyone else: each block's forward
runs under torch.utils.checkpoint (activations dropped, recomputed in backward) while the context is open,
and the block's own forward is back afterwards. The same approach as ComfyUI's TrainLoraNode
(comfy_extras/nodes_train.py `patch`), but undone when training ends, since the host's model is shared."""

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextmanager
def checkpointed(blocks: list[nn.Module]):
    for block in blocks:
        block.forward = _checkpointed_forward(block.forward)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the instance attribute: the class's forward shows through again


def _checkpointed_forward(forward):
    def run(args, kwargs):
        return forward(*args, **kwargs)

    def checkpointed_forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(run, args, kwargs, use_reentrant=False)

    return checkpointed_forward
