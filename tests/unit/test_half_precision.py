"""Frozen half-precision base weights (what `--bf16-unet` / `--fp16-unet` or a GPU's default give a host):
the LoRA branches and the optimizer stay fp32, the base weights keep their dtype and values, and the loss
still goes down. The bridge casts inputs to the weights' dtype and the prediction back to fp32, as
nodes/bridge.py does; each branch adds its fp32 output in the layer's dtype."""

import pytest
import torch

from tunekit.trainer.host import NullHost

from fakes import FakeBridge
from helpers import make_session


class HalfBridge(FakeBridge):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        with torch.inference_mode():  # as ComfyUI loads weights: inference tensors
            self.denoiser.to(dtype)

    def predict(self, noisy, timesteps, prompts, sizes):
        tokens = max(p.context.shape[0] for p in prompts)
        context = torch.stack([p.context.repeat(tokens, 1)[:tokens] for p in prompts])
        return self.denoiser(noisy.to(self.dtype), timesteps.float(), context.to(self.dtype)).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_frozen_half_weights_train_fp32_adapters(dtype):
    bridge = HalfBridge(dtype)
    base = {name: p.clone() for name, p in bridge.denoiser.named_parameters()}
    session = make_session(bridge=bridge, steps=40)
    session.prepare(NullHost())
    before = session.evaluate()
    result = session.run(NullHost())
    after = session.evaluate()
    print(f"{dtype}: fixed-noise loss before {before:.4f}, after {after:.4f}")
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert after < 0.9 * before
    assert {p.dtype for p in session.network.parameters()} == {torch.float32}
    states = [t for s in session.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim]
    assert states and {t.dtype for t in states} == {torch.float32}
    for name, parameter in bridge.denoiser.named_parameters():
        assert parameter.dtype == dtype and torch.equal(parameter, base[name]), name
