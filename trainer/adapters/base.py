"""What every adapter algorithm shares: one trained side branch beside one frozen host layer.

A branch never holds or changes the host's weight. It adds its contribution to the layer's output in a
forward hook (and DoRA also rescales the layer's input in a pre-hook), so it lives exactly as long as
the hooks of the clone that trains it. Its parameters are saved under the kohya/LyCORIS suffixes that
ComfyUI's LoraLoader and A1111/Forge read (`kohya_parameters`), with the scalar `.alpha` beside them.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle


class AdapterBranch(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"adapters support Linear and Conv2d layers, not {type(base).__name__}")
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise TypeError(f"adapters support ungrouped convolutions, not groups={base.groups}")
        self.rank, self.alpha = rank, float(alpha)
        self.layer = LayerGeometry.of(base)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def kohya_parameters(self) -> dict[str, nn.Parameter]:
        """Saved suffix (after the module's kohya name) -> trained parameter."""
        raise NotImplementedError

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The host layer's output plus this branch's contribution for the same input."""
        raise NotImplementedError

    def hook_onto(self, module: nn.Module) -> RemovableHandle:
        return module.register_forward_hook(lambda _module, args, output: self.add_to(output, args[0]))

    def kohya_tensors(self, name: str) -> dict[str, torch.Tensor]:
        tensors = {f"{name}.{suffix}": parameter.detach() for suffix, parameter in self.kohya_parameters().items()}
        tensors[f"{name}.alpha"] = torch.tensor(self.alpha)
        return tensors

    def load_kohya_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved values in (the network checked names and shapes); no `.alpha` means scale 1, as
        every loader reads it."""
        with torch.no_grad():
            for suffix, parameter in self.kohya_parameters().items():
                parameter.copy_(tensors[f"{name}.{suffix}"])
        alpha = tensors.get(f"{name}.alpha")
        self.alpha = float(alpha) if alpha is not None else float(self.rank)


class LayerGeometry:
    """The host layer's shape and convolution settings: all a full-size delta needs to be applied."""

    def __init__(self, weight_shape: tuple[int, ...], conv: dict | None):
        self.weight_shape, self.conv = weight_shape, conv

    @classmethod
    def of(cls, base: nn.Module) -> "LayerGeometry":
        if isinstance(base, nn.Conv2d):
            conv = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
            return cls((base.out_channels, base.in_channels, *base.kernel_size), conv)
        return cls((base.out_features, base.in_features), None)

    @property
    def out_dim(self) -> int:
        return self.weight_shape[0]

    @property
    def in_dim(self) -> int:
        return self.weight_shape[1]

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.weight_shape[2:]

    @property
    def flat_in(self) -> int:
        """Inputs per output unit: in_features, or in_channels * kernel height * kernel width."""
        return self.in_dim * (self.kernel[0] * self.kernel[1] if self.kernel else 1)

    def apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's operation with another weight (no bias): F.linear or F.conv2d."""
        weight = weight.reshape(self.weight_shape)
        return F.conv2d(x, weight, None, **self.conv) if self.conv else F.linear(x, weight)


class WeightDeltaBranch(AdapterBranch):
    """Branches that form the full-size weight delta each forward (LoHa, LoKr): one out x in temporary
    per layer and step (and its gradient in backward), then one more matmul / convolution over x."""

    def delta(self) -> torch.Tensor:
        """The scaled weight delta, [out, in * kernel] in fp32."""
        raise NotImplementedError

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        delta = self.delta()
        return output + self.layer.apply(x.to(delta.dtype), delta).to(output.dtype)
