"""Full fine-tune through the one session loop: learns, leaves the host's weights alone, resumes exactly."""

import pytest
import torch

from tunekit.trainer.config import TrainConfig
from tunekit.trainer.errors import ConfigError
from tunekit.trainer.finetune import FullFineTune
from tunekit.trainer.host import NullHost
from tunekit.trainer.session import TrainSession

from fakes import FakeBridge
from helpers import solid_dataset


def finetune_session(bridge: FakeBridge, run_dir=None, **overrides) -> TrainSession:
    settings = dict(steps=30, learning_rate=1e-3, resolution=64, seed=3)
    settings.update(overrides)
    trainable = FullFineTune(bridge.denoiser_modules()[""], bridge.device)
    return TrainSession(bridge, solid_dataset(), TrainConfig(**settings), run_dir, trainable=trainable)


def test_full_finetune_lowers_the_loss_and_changes_every_weight_of_the_copy_only():
    bridge = FakeBridge()
    host_weights = {name: p.clone() for name, p in bridge.denoiser.named_parameters()}
    session = finetune_session(bridge)
    session.prepare(NullHost())
    before = session.evaluate()
    session.run(NullHost())
    after = session.evaluate()
    print(f"full fine-tune fixed-noise loss before {before:.4f}, after {after:.4f}")
    assert after < 0.8 * before
    trained = session.network.trained_weights()
    assert trained.keys() == host_weights.keys()
    changed = [name for name in trained if not torch.equal(trained[name], host_weights[name])]
    assert len(changed) > 0.9 * len(trained)
    for name, parameter in bridge.denoiser.named_parameters():
        assert parameter.is_inference(), f"{name} was not restored to the host's own tensor"
        assert torch.equal(parameter, host_weights[name]), f"the host's {name} changed"


def test_the_trained_weights_in_the_denoiser_give_the_evaluated_loss():
    """What the node hands back (the trained weights set into the model) is what was trained."""
    bridge = FakeBridge()
    session = finetune_session(bridge, steps=5)
    session.run(NullHost())
    trained_loss = session.evaluate()
    other = FakeBridge()
    with torch.inference_mode():
        for name, parameter in other.denoiser.named_parameters():
            parameter.copy_(session.network.trained_weights()[name])
    plain = finetune_session(other, steps=5)
    plain.prepare(NullHost())
    assert plain.evaluate() == pytest.approx(trained_loss, abs=1e-6)


def test_full_finetune_resume_is_exact(tmp_path):
    straight = finetune_session(FakeBridge(), tmp_path / "a", steps=8)
    straight.run(NullHost())
    first = finetune_session(FakeBridge(), tmp_path / "b", steps=8, save_every=4)

    class StopAtFour(NullHost):
        def should_stop(self):
            return first.step >= 4

    assert first.run(StopAtFour()).stopped_early
    resumed = finetune_session(FakeBridge(), tmp_path / "b", steps=8)
    resumed.resume(first.last_checkpoint)
    resumed.run(NullHost())
    a, b = straight.network.trained_weights(), resumed.network.trained_weights()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_fp16_weights_are_refused_with_the_flag_to_use():
    bridge = FakeBridge()
    with torch.inference_mode():
        bridge.denoiser.half()
    with pytest.raises(ConfigError, match="--fp32-unet"):
        FullFineTune(bridge.denoiser, bridge.device)
