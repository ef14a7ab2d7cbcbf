"""Full fine-tune through the one session loop: learns, leaves the host's weights alone, resumes exactly; with
the text encoder too (every CLIP weight, its own learning rate)."""

import pytest
import torch
from fakes import FakeBridge, FakeTextBridge
from helpers import solid_dataset
from tunekit.trainer.config import TrainConfig
from tunekit.trainer.errors import ConfigError
from tunekit.trainer.finetune import FullFineTune
from tunekit.trainer.host import NullHost
from tunekit.trainer.session import TrainSession
from tunekit.trainer.text_encoders import chosen_encoders


def finetune_session(bridge: FakeBridge, run_dir=None, **overrides) -> TrainSession:
    settings = {"steps": 30, "learning_rate": 1e-3, "resolution": 64, "seed": 3}
    settings.update(overrides)
    config = TrainConfig(**settings)
    encoders = chosen_encoders(bridge.text_encoder_modules(), config) if config.text_encoders != "none" else None
    trainable = FullFineTune(bridge.denoiser_modules()[""], bridge.device, encoders)
    return TrainSession(bridge, solid_dataset(), config, run_dir, trainable=trainable)


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


def test_full_finetune_with_the_text_encoder_trains_every_clip_weight_at_its_own_rate():
    bridge = FakeTextBridge()
    host_text = {name: p.clone() for name, p in bridge.text_encoder.named_parameters()}
    session = finetune_session(bridge, steps=30, text_encoders="all", text_encoder_lr=5e-3)
    rates = {group["name"]: group["lr"] for group in session.optimizer.param_groups}
    assert rates == {"unet": 1e-3, "text_encoder": 5e-3}
    session.prepare(NullHost())
    assert not session.feed.prompts, "the text-embedding cache must be off while the text encoder trains"
    before = session.evaluate()
    session.run(NullHost())
    after = session.evaluate()
    print(f"full fine-tune with the text encoder: fixed-noise loss before {before:.4f}, after {after:.4f}")
    assert after < 0.8 * before
    trained = session.network.text_encoder_weights()["clip_l"]
    assert trained.keys() == host_text.keys()
    changed = [name for name in trained if not torch.equal(trained[name], host_text[name])]
    # the token table changes only in the rows the captions use; every layer weight moves
    assert all(name in changed for name in trained if ".encoder.layers." in name), changed
    assert "text_model.embeddings.token_embedding.weight" in changed
    for name, parameter in bridge.text_encoder.named_parameters():
        assert parameter.is_inference(), f"{name} was not restored to the host's own tensor"
        assert torch.equal(parameter, host_text[name]), f"the host's {name} changed"


def test_full_finetune_with_the_text_encoder_resumes_bit_identically(tmp_path):
    """20 steps straight == 10 steps, a resumable state, and 10 more in a new session."""
    settings = {"steps": 20, "text_encoders": "all", "text_encoder_lr": 2e-3}
    straight = finetune_session(FakeTextBridge(), tmp_path / "a", **settings)
    straight.run(NullHost())
    first = finetune_session(FakeTextBridge(), tmp_path / "b", save_every=10, **settings)

    class StopAtTen(NullHost):
        def should_stop(self):
            return first.step >= 10

    assert first.run(StopAtTen()).stopped_early
    resumed = finetune_session(FakeTextBridge(), tmp_path / "b", **settings)
    resumed.resume(first.last_checkpoint)
    assert resumed.step == 10
    resumed.run(NullHost())
    a, b = straight.network.kohya_state_dict(), resumed.network.kohya_state_dict()
    assert any(key.startswith("clip_l.") for key in a)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_sdxl_encoders_train_at_their_own_rates_and_a_resume_must_keep_text_encoders(tmp_path):
    bridge = FakeTextBridge()
    encoders = {"clip_l": bridge.text_encoder_modules()["clip_l"], "clip_g": FakeTextBridge(seed=1).text_encoder_modules()["clip_l"]}
    config = TrainConfig(learning_rate=1e-5, text_encoder_lr=2e-6, text_encoder_2_lr=3e-6, text_encoders="all")
    trainable = FullFineTune(bridge.denoiser_modules()[""], bridge.device, chosen_encoders(encoders, config))
    assert {g["name"]: g["lr"] for g in trainable.param_groups(config)} == {"unet": 1e-5, "text_encoder": 2e-6,
                                                                            "text_encoder_2": 3e-6}
    assert set(trainable.text_encoder_weights()) == {"clip_l", "clip_g"}
    only_g = FullFineTune(bridge.denoiser_modules()[""], bridge.device,
                          chosen_encoders(encoders, TrainConfig(text_encoders="te2")))
    assert set(only_g.text_encoder_weights()) == {"clip_g"}

    saved = finetune_session(FakeTextBridge(), tmp_path / "run", steps=2)
    saved.run(NullHost())
    saved.save_final(NullHost())
    with pytest.raises(ConfigError, match="text_encoders 'none'"):
        finetune_session(FakeTextBridge(), tmp_path / "run", steps=4, text_encoders="all").resume(saved.last_checkpoint)
