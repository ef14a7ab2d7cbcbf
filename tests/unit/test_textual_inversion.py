"""Textual inversion on a tiny CLIP-shaped encoder: vectors from an init word, trained through the one
session loop with denoiser and text encoder frozen, saved in the files ComfyUI and A1111 load."""

import pytest
import safetensors.torch
import torch
from fakes import FakeTextBridge
from helpers import solid_dataset
from tunekit.trainer.config import TrainConfig
from tunekit.trainer.embeddings import TokenEmbedding, cycle_rows, mark_embeddings, save_embedding
from tunekit.trainer.errors import ConfigError
from tunekit.trainer.host import NullHost
from tunekit.trainer.session import TrainSession


def ti_session(bridge, steps=60, **settings):
    embedding = TokenEmbedding.from_init_word(bridge, "tkred", "red", num_vectors=2)
    config = TrainConfig(steps=steps, learning_rate=settings.pop("learning_rate", 5e-2), resolution=64, seed=3, **settings)
    return TrainSession(bridge, solid_dataset(), config, trainable=embedding), embedding


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

    path = save_embedding(tmp_path / "tkred.safetensors", embedding, session.config, "red", session.step)
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
