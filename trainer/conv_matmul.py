"""Wide, low-resolution convolutions as one matrix product while training on a CPU.

On a CPU, torch runs most convolutions through oneDNN, which reorders the whole weight into its blocked
layout on every call, forward and backward. That is cheap beside the arithmetic at high resolution, but a
UNet's deep levels hold the largest weights (SD 1.5: 1280x2560x3x3, 118 MB) over a handful of positions
(8x8 at 256 px, 16x16 at 512 px), and there the reorder dominates: 7-30 GFLOP/s where a matrix product of
the same size reaches 60-90 (1 thread, fwd + input backward, torch 2.13). Unfolding the input and
multiplying by the weight viewed as a matrix (no copy of it) skips the reorder; backward is one matrix
product and a fold. SD 1.5's UNet at 256 px, forward + backward, 1 thread: 7.2 -> 5.5 CPU-s.

While `matmul_convolutions(root)` is open, each eligible Conv2d under `root` takes that path for calls where
its weight is large beside the output positions; other calls, and every other module, run as before.
The modules get an instance attribute that is removed on exit, so nothing outlives the context.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# Weight elements per output position from which the matrix product wins (measured: 1280->1280 at 16x16,
# 57k, 1.07-1.4x; 1920->640 at 16x16, 43k, 1.3x; 640->640 at 16x16, 14k, parity; 320->320 at 32x32, 0.75x).
WEIGHT_PER_POSITION = 32768


@contextmanager
def matmul_convolutions(root: nn.Module):
    convs = [module for module in root.modules() if _eligible(module)]
    for conv in convs:
        conv._conv_forward = _routed(conv)
    try:
        yield len(convs)
    finally:
        for conv in convs:
            del conv._conv_forward  # the instance attribute: the class's method shows through again


def conv_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
                   padding: tuple[int, int]) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding) for an ungrouped, undilated convolution, by unfold + matmul."""
    batch, _, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    columns = F.unfold(x, (kernel_h, kernel_w), padding=padding, stride=stride)  # [batch, C*kh*kw, positions]
    out = torch.matmul(weight.reshape(out_channels, -1), columns)
    if bias is not None:
        out = out + bias.unsqueeze(-1)
    out_h = (height + 2 * padding[0] - kernel_h) // stride[0] + 1
    out_w = (width + 2 * padding[1] - kernel_w) // stride[1] + 1
    return out.view(batch, out_channels, out_h, out_w)


def _eligible(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.dilation == (1, 1)
            and module.padding_mode == "zeros" and not isinstance(module.padding, str))


def _routed(conv: nn.Conv2d):
    def conv_forward(x, weight, bias):
        if _pays(x, weight, conv.stride):
            return conv_as_matmul(x, weight, bias, conv.stride, conv.padding)
        return type(conv)._conv_forward(conv, x, weight, bias)

    return conv_forward


def _pays(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int]) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.dim() != 4:
        return False
    positions = x.shape[0] * (x.shape[2] // stride[0]) * (x.shape[3] // stride[1])
    return weight.numel() >= WEIGHT_PER_POSITION * positions
