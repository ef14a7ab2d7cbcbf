"""LoRA on the text encoder, on a tiny CLIP-shaped encoder: kohya names, learning rates, grads through
captions encoded every step, a frozen and untouched base."""

import pytest
import torch
from fakes import FakeTextBridge
from helpers import make_session
from tunekit.trainer.config import TrainConfig
from tunekit.trainer.errors import ConfigError
from tunekit.trainer.host import NullHost
from tunekit.trainer.text_encoders import kohya_prefixes, text_encoder_targets

TE_LAYERS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def test_kohya_prefixes_follow_comfyui_one_encoder_te_two_encoders_te1_te2():
    assert kohya_prefixes(["clip_l"]) == {"clip_l": "lora_te"}
    assert kohya_prefixes(["clip_l", "clip_g"]) == {"clip_l": "lora_te1", "clip_g": "lora_te2"}


def test_text_encoder_branches_get_kohya_names_and_their_own_learning_rate():
    session = make_session(bridge=FakeTextBridge(), steps=1, text_encoders="all", learning_rate=1e-3, text_encoder_lr=5e-5)
    names = set(session.network.branches)
    assert {f"lora_te_text_model_encoder_layers_0_{layer}" for layer in TE_LAYERS} <= names
    rates = {group["name"]: group["lr"] for group in session.optimizer.param_groups}
    assert rates == {"unet": 1e-3, "text_encoder": 5e-5}


def test_sdxl_second_encoder_trains_at_its_own_rate_and_can_train_alone():
    encoders = {"clip_l": FakeTextBridge().text_encoder_modules()["clip_l"],
                "clip_g": FakeTextBridge(seed=1).text_encoder_modules()["clip_l"]}
    only_g = text_encoder_targets(encoders, TrainConfig(text_encoders="te2"))
    assert only_g and all(name.startswith("lora_te2_text_model_encoder_layers_0_") for name in only_g)
    both = text_encoder_targets(encoders, TrainConfig(text_encoders="all"))
    assert {name.split("_text_model")[0] for name in both} == {"lora_te1", "lora_te2"}


def test_a_second_encoder_on_a_one_encoder_model_is_a_clear_error():
    with pytest.raises(ConfigError, match="text_encoders is 'te2'.*only SDXL"):
        make_session(bridge=FakeTextBridge(), text_encoders="te2")
    with pytest.raises(ConfigError, match="text_encoders is 'clip'"):
        TrainConfig(text_encoders="clip").validate()


def test_text_encoder_lora_learns_through_captions_encoded_every_step():
    bridge = FakeTextBridge()
    base = {name: p.clone() for name, p in bridge.text_encoder.named_parameters()}
    session = make_session(bridge=bridge, steps=40, text_encoders="all", text_encoder_lr=5e-3)
    session.prepare(NullHost())
    assert not session.feed.prompts, "the text-embedding cache must be off while the text encoder trains"
    before = session.evaluate()
    session.run(NullHost())
    after = session.evaluate()
    print(f"fixed-noise loss with the text encoder LoRA: before {before:.4f}, after {after:.4f}")
    assert after < before
    te_ups = [b.up.weight for name, b in session.network.branches.items() if name.startswith("lora_te")]
    assert all(up.abs().sum() > 0 for up in te_ups), "a text-encoder branch got no gradient"
    assert bridge.text_trainings >= 2  # training and evaluation ran with the text side training
    for name, parameter in bridge.text_encoder.named_parameters():
        assert parameter.is_inference(), f"{name} was not restored to the host's own tensor"
        assert torch.equal(parameter, base[name]), f"{name} changed"


def test_frozen_text_encoder_keeps_the_cache_and_has_no_branches():
    session = make_session(bridge=FakeTextBridge(), steps=1)
    session.prepare(NullHost())
    assert session.feed.prompts
    assert not any(name.startswith("lora_te") for name in session.network.branches)
