"""Textual inversion on a tiny CLIP-shaped encoder: vectors from an init word, trained through the one
session loop with denoiser and text encoder frozen, saved in the files ComfyUI and A1111 load; pivotal
tuning (the embedding and a UNet LoRA in one session); exact resume of both."""

import pytest
import safetensors.torch
import torch
from fakes import FakeTextBridge, RecordingHost
from helpers import solid_dataset
from tunekit.trainer.adapters.kohya import load_lora
from tunekit.trainer.checkpoints import latest_state_folder
from tunekit.trainer.config import TrainConfig
from tunekit.trainer.embeddings import (
    PivotalTuning,
    TokenEmbedding,
    cycle_rows,
    mark_embeddings,
    save_embedding,
    save_pivotal_lora,
    save_trained_embedding,
)
from tunekit.trainer.errors import ConfigError
from tunekit.trainer.host import NullHost
from tunekit.trainer.runfile import read_run_file
from tunekit.trainer.session import TrainSession

PIVOTAL = {"pivotal": True, "rank": 4, "alpha": 4.0, "unet_lr": 5e-3}


def ti_session(bridge, steps=60, run_dir=None, **settings):
    config = TrainConfig(steps=steps, learning_rate=settings.pop("learning_rate", 5e-2), resolution=64, seed=3,
                         init_word="red", num_vectors=2, **settings)
    embedding = TokenEmbedding.from_init_word(bridge, "tkred", config.init_word, config.num_vectors)
    return TrainSession(bridge, solid_dataset(), config, run_dir, trainable=embedding), embedding


@pytest.mark.parametrize("caption, expected", [
    ("a tkred square", "a embedding:tkred square"),
    ("tkred, red", "embedding:tkred, red"),
    ("a square", "embedding:tkred, a square"),
    ("", "embedding:tkred"),
    ("embedding:tkred square", "embedding:tkred square"),
    ("tkreds and xtkred", "embedding:tkred, tkreds and xtkred"),
])
def test_captions_use_the_embedding_where_its_name_stands_or_in_front(caption, expected):
    assert mark_embeddings(caption, ["tkred"]) == expected


def test_vectors_start_from_the_init_word_cycled_to_the_vector_count():
    rows = torch.arange(6.0).view(3, 2)
    assert cycle_rows(rows, 5).tolist() == [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3]]
    bridge = FakeTextBridge()
    embedding = TokenEmbedding.from_init_word(bridge, "tkred", "red", num_vectors=3)
    red = bridge.token_vectors("red")["clip_l"]
    assert torch.equal(embedding.vectors["clip_l"].detach(), red.repeat(3, 1))


def test_bad_embedding_settings_are_one_clear_error():
    with pytest.raises(ConfigError) as error:
        TokenEmbedding.from_init_word(FakeTextBridge(), "my token", " ", num_vectors=0)
    message = str(error.value)
    assert "name is 'my token'" in message and "init_word is empty" in message and "num_vectors is 0" in message


def test_embedding_learns_with_denoiser_and_text_encoder_frozen(tmp_path):
    bridge = FakeTextBridge()
    text_base = {name: p.clone() for name, p in bridge.text_encoder.named_parameters()}
    unet_base = {name: p.clone() for name, p in bridge.denoiser.named_parameters()}
    session, embedding = ti_session(bridge)
    initial = embedding.vectors["clip_l"].detach().clone()
    session.prepare(NullHost())
    before = session.evaluate()
    session.run(NullHost())
    after = session.evaluate()
    print(f"fixed-noise loss with a trained 2-vector embedding: before {before:.4f}, after {after:.4f}")
    assert after < before
    assert not torch.equal(embedding.vectors["clip_l"].detach(), initial)
    for model, base in ((bridge.text_encoder, text_base), (bridge.denoiser, unet_base)):
        for name, parameter in model.named_parameters():
            assert parameter.is_inference() and torch.equal(parameter, base[name]), name

    path = save_embedding(tmp_path / "tkred.safetensors", embedding, session.config, session.step)
    saved = safetensors.torch.load_file(str(path))
    assert list(saved) == ["emb_params"] and saved["emb_params"].shape == (2, 8)
    torch.testing.assert_close(saved["emb_params"], embedding.vectors["clip_l"].detach())


def test_an_sdxl_embedding_file_keys_each_encoder():
    embedding = TokenEmbedding("tk", {"clip_l": torch.zeros(2, 768), "clip_g": torch.ones(2, 1280)})
    tensors = embedding.file_tensors()
    assert {key: tuple(value.shape) for key, value in tensors.items()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}


def test_embedding_state_resumes(tmp_path):
    first, embedding = ti_session(FakeTextBridge(), steps=4)
    first.run(NullHost())
    state = embedding.kohya_state_dict(torch.float32)
    again = TokenEmbedding("tkred", {"clip_l": torch.zeros(2, 8)})
    again.load_kohya_state_dict(state)
    torch.testing.assert_close(again.vectors["clip_l"].detach(), embedding.vectors["clip_l"].detach())


def trained_tensors(session) -> dict[str, torch.Tensor]:
    return session.network.kohya_state_dict(torch.float32)


@pytest.mark.parametrize("settings", [{}, PIVOTAL], ids=["embedding", "pivotal"])
def test_twenty_steps_equal_ten_and_ten_resumed_bit_for_bit(tmp_path, settings):
    straight, _ = ti_session(FakeTextBridge(), steps=20, **settings)
    straight.run(NullHost())

    first, _ = ti_session(FakeTextBridge(), steps=20, run_dir=tmp_path, **settings)
    assert first.run(RecordingHost(stop_after=10)).steps_done == 10
    resumed, embedding = ti_session(FakeTextBridge(), steps=20, run_dir=tmp_path, **settings)
    resumed.resume(latest_state_folder(tmp_path))
    assert resumed.step == 10 and resumed.run(NullHost()).steps_done == 20

    expected, actual = trained_tensors(straight), trained_tensors(resumed)
    assert expected.keys() == actual.keys()
    assert any(key.startswith("lora_unet_") for key in actual) == bool(settings)
    differ = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ after resume, e.g. {differ[:3]}"
    initial = FakeTextBridge().token_vectors("red red")["clip_l"]
    assert not torch.equal(embedding.vectors["clip_l"].detach(), initial), "the embedding did not train"


def test_pivotal_tuning_trains_embedding_and_lora_at_their_own_rates_and_learns_more(tmp_path):
    losses = {}
    for label, settings in (("embedding", {}), ("pivotal", PIVOTAL)):
        session, embedding = ti_session(FakeTextBridge(), steps=40, **settings)
        session.prepare(NullHost())
        before = session.evaluate()
        session.run(NullHost())
        losses[label] = (before, session.evaluate())
    print(f"fixed-noise loss before -> after 40 steps: embedding {losses['embedding'][0]:.4f} -> "
          f"{losses['embedding'][1]:.4f}, pivotal {losses['pivotal'][0]:.4f} -> {losses['pivotal'][1]:.4f}")
    assert losses["pivotal"][1] < losses["embedding"][1] < losses["embedding"][0]

    assert isinstance(session.network, PivotalTuning)
    rates = {group["name"]: group["lr"] for group in session.optimizer.param_groups}
    assert rates == {"embedding": 5e-2, "unet": 5e-3}
    path, vectors = save_trained_embedding(session, embedding, tmp_path / "tkred.safetensors")
    torch.testing.assert_close(vectors["clip_l"], embedding.vectors["clip_l"].detach())
    lora_path, tensors, _ = save_pivotal_lora(session, path, tmp_path / "tkred.safetensors")
    assert lora_path.name == "tkred_2.safetensors", "the embedding's file was overwritten"
    saved, metadata = load_lora(lora_path)
    assert saved.keys() == tensors.keys() and all(key.startswith("lora_unet_") for key in saved)
    assert metadata["modelspec.trigger_phrase"] == "embedding:tkred" and metadata["ss_network_dim"] == "4"
    assert metadata["ss_learning_rate"] == "0.05" and metadata["ss_unet_lr"] == "0.005"
    assert '"init_word": "red"' in metadata["ss_tunekit_embedding"]


def test_resume_refuses_another_vector_count_or_pivotal_setting(tmp_path):
    first, _ = ti_session(FakeTextBridge(), steps=2, run_dir=tmp_path)
    first.run(NullHost())
    folder = first.save_final(NullHost())
    for changed in ({"pivotal": True}, {"num_vectors": 3}):
        config = TrainConfig(**{**first.config.to_dict(), **changed})
        embedding = TokenEmbedding.from_init_word(FakeTextBridge(), "tkred", "red", config.num_vectors)
        session = TrainSession(FakeTextBridge(), solid_dataset(), config, tmp_path, trainable=embedding)
        with pytest.raises(ConfigError, match=f"{next(iter(changed))} "):
            session.resume(folder)


def test_a_run_file_for_an_embedding_names_what_it_lacks(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "images").mkdir()
    run = '[run]\nmethod = "{}"\nname = "{}"\ncheckpoint = "model.safetensors"\ndataset = "images"\n'
    path = tmp_path / "run.toml"
    path.write_text("num_vectors = 0\n" + run.format("embedding", "my token"))
    with pytest.raises(ConfigError) as error:
        read_run_file(path)
    for expected in ("name is 'my token'", "init_word is empty", "num_vectors is 0"):
        assert expected in str(error.value), expected
    path.write_text("pivotal = true\n" + run.format("lora", "demo"))
    with pytest.raises(ConfigError, match="pivotal is true but run.method is 'lora'"):
        read_run_file(path)
    config = TrainConfig(init_word="red", num_vectors=2, pivotal=True, rank=4)
    path.write_text(config.to_toml() + run.format("embedding", "tkred"))
    assert read_run_file(path).config == config
