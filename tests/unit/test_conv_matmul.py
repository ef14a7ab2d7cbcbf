"""Wide, low-resolution convolutions as unfold + matmul while training on a CPU (trainer/conv_matmul.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tunekit.trainer.conv_matmul import conv_as_matmul, matmul_convolutions


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
def test_conv_as_matmul_gives_conv2ds_output_and_input_gradient(stride, with_bias, batch):
    torch.manual_seed(0)
    weight, bias = torch.randn(24, 16, 3, 3), torch.randn(24) if with_bias else None
    x = torch.randn(batch, 16, 7, 6, requires_grad=True)
    reference = F.conv2d(x, weight, bias, stride=stride, padding=1)
    (reference_grad,) = torch.autograd.grad(reference.square().sum(), x)
    out = conv_as_matmul(x, weight, bias, (stride, stride), (1, 1))
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-4)  # sums in another order


def _routed_through_matmul(output: torch.Tensor) -> bool:
    return type(output.grad_fn).__name__ != "ConvolutionBackward0"


def test_only_wide_convs_over_few_positions_take_the_matmul_while_the_context_is_open():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1))
    conv = model[0]
    hook_calls = []
    conv.register_forward_hook(lambda module, args, output: hook_calls.append(output.shape))
    small = torch.randn(1, 128, 2, 2, requires_grad=True)  # 147k weights over 4 positions: matmul pays
    large = torch.randn(1, 128, 8, 8, requires_grad=True)  # over 64 positions: oneDNN's convolution stays
    expected = conv(small)
    with matmul_convolutions(model) as routed:
        assert routed == 1
        got = conv(small)
        assert _routed_through_matmul(got)
        assert not _routed_through_matmul(conv(large))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(hook_calls) == 3  # the adapters' forward hooks still see every call
    assert "_conv_forward" not in vars(conv)
    assert not _routed_through_matmul(conv(small))


def test_grouped_dilated_and_half_precision_convs_are_left_alone():
    grouped, dilated = nn.Conv2d(128, 128, 3, padding=1, groups=2), nn.Conv2d(128, 128, 3, padding=2, dilation=2)
    half = nn.Conv2d(128, 128, 3, padding=1).to(torch.bfloat16)
    with matmul_convolutions(nn.Sequential(grouped, dilated, half)) as routed:
        assert routed == 1
        x = torch.randn(1, 128, 2, 2, requires_grad=True)
        assert not _routed_through_matmul(half(x.to(torch.bfloat16)))
