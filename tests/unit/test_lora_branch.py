"""LoRABranch.add_to (the hook's fused form) equals `output + scale * up(down(x))` in values and in every
gradient, for linear, conv and strided conv layers, and keeps fp32 branches on half-precision layers."""

import pytest
import torch
from torch import nn

from tunekit.trainer.adapters.lora import LoRABranch

LAYERS = {
    "linear": (lambda: nn.Linear(24, 40), (2, 7, 24)),
    "conv3x3": (lambda: nn.Conv2d(6, 10, 3, padding=1), (2, 6, 5, 5)),
    "conv_stride2": (lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1), (2, 6, 8, 8)),
    "conv1x1": (lambda: nn.Conv2d(6, 10, 1), (1, 6, 4, 4)),
}


def _grads(branch, x, output_fn):
    branch.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = output_fn(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), [p.grad for p in branch.parameters()] + [x.grad]


@pytest.mark.parametrize("kind", LAYERS)
def test_fused_side_branch_matches_the_plain_sum(kind):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    base = make().requires_grad_(False)
    branch = LoRABranch(base, rank=4, alpha=2.0)
    nn.init.normal_(branch.up.weight)  # a trained branch: up is no longer zero
    x = torch.randn(shape)
    plain_y, plain = _grads(branch, x, lambda x: base(x) + branch(x))
    fused_y, fused = _grads(branch, x, lambda x: branch.add_to(base(x), x))
    assert torch.allclose(plain_y, fused_y, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(plain, fused))


def test_half_precision_layers_keep_an_fp32_branch():
    torch.manual_seed(0)
    base = nn.Linear(8, 8).to(torch.bfloat16).requires_grad_(False)
    branch = LoRABranch(base, rank=2, alpha=2.0)
    nn.init.normal_(branch.up.weight)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    y = branch.add_to(base(x), x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert branch.up.weight.grad.dtype == torch.float32
