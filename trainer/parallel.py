"""Data-parallel training over several processes (`accelerate launch`, `torchrun`).

Every process holds the whole model and the trained weights and trains on its own share of each step's
batches; the gradients are averaged before the optimizer steps, so every process keeps the same weights.
The shares follow the order one process would train: with N processes and A accumulation steps, a step
trains exactly the N*A batches (images, crops, captions and noise) that one process trains with N*A
accumulation steps, so a run gives the same weights on 1 or N processes up to float rounding. Only the
main process writes files.

The core needs only torch.distributed; starting the processes and giving each its device is the host's
part (nodes/headless.py uses accelerate).
"""

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

BUCKET_ELEMENTS = 2**24  # gradients averaged per all-reduce: 64 MB in fp32 (few calls for a LoRA, bounded copies for a full fine-tune)


class DataParallel:
    """This process's place among the training processes. One process (the default): rank 0 of 1, and every
    collective is a no-op."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        # Stop requests are Python flags: they go through gloo on the CPU, never through a device sync.
        self._control = dist.new_group(backend="gloo") if world_size > 1 else None

    @classmethod
    def from_process_group(cls) -> "DataParallel":
        """This process's place in torch.distributed's default group, once the launcher's code initialized it."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"process {self.rank + 1} of {self.world_size}"

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Every process's gradients become their mean over the processes."""
        if self.world_size == 1:
            return
        for bucket in _buckets([p.grad for p in parameters if p.grad is not None]):
            flat = torch.cat([gradient.reshape(-1) for gradient in bucket])
            dist.all_reduce(flat)
            flat /= self.world_size
            pieces = flat.split([gradient.numel() for gradient in bucket])
            torch._foreach_copy_(bucket, [piece.view_as(gradient) for piece, gradient in zip(pieces, bucket, strict=True)])

    def average(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of `values` over the processes (e.g. the step losses, each process's own batches)."""
        if self.world_size == 1:
            return values
        total = values.clone()
        dist.all_reduce(total)
        return total / self.world_size

    def gather(self, value) -> list:
        """Every process's `value` (any picklable object), in process order."""
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value, group=self._control)
        return values

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on one (a Ctrl-C seen by one process stops them all at the
        same step)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._control)
        return bool(value.item())


def _buckets(gradients: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive gradients of one dtype and device, up to BUCKET_ELEMENTS each (one larger gradient alone)."""
    bucket, size = [], 0
    for gradient in gradients:
        if bucket and (size + gradient.numel() > BUCKET_ELEMENTS or (gradient.dtype, gradient.device) !=
                       (bucket[0].dtype, bucket[0].device)):
            yield bucket
            bucket, size = [], 0
        bucket.append(gradient)
        size += gradient.numel()
    if bucket:
        yield bucket
