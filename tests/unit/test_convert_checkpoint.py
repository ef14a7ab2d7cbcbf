"""`.ckpt` -> `.safetensors`: never runs a pickle's code, precision, pruning, VAE, streamed, no partial files."""

import errno
import gc
import os
import pickle
import sys
import types
import weakref

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from tunekit.trainer.convert import tensor_files
from tunekit.trainer.convert.checkpoint import CheckpointOptions, convert_checkpoint
from tunekit.trainer.convert.ckpt import load_pickle_state_dict
from tunekit.trainer.convert.errors import ConversionError, UnsafeCheckpointError


def state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
        "model.diffusion_model.out.2.bias": torch.randn(4, generator=g),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
        "first_stage_model.decoder.conv_out.weight": torch.randn(3, 8, 3, 3, generator=g),
        "alphas_cumprod": torch.linspace(0.99, 0.01, 10, dtype=torch.float64),
        "model_ema.diffusion_modelinput_blocks00weight": torch.ones(8, 4, 3, 3),
        "model_ema.diffusion_modelout2bias": torch.ones(4),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(12, dtype=torch.int32),
    }


@pytest.fixture
def lightning_ckpt(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state_dict(), "optimizer_states": [{"exp_avg": torch.ones(3)}],
                "global_step": np.int64(1000), "epoch": 3}, path)
    return path


def written(path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


# ----- safety -----

class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["zip", "legacy", "plain pickle"])
def test_a_pickle_that_runs_code_is_refused_and_never_executed(tmp_path, how):
    marker = tmp_path / "EXECUTED"
    payload = RunsCode()
    payload.marker = marker
    path = tmp_path / "evil.ckpt"
    if how == "plain pickle":
        path.write_bytes(pickle.dumps({"state_dict": {"w": torch.ones(1)}, "x": payload}))
    else:
        torch.save({"state_dict": {"w": torch.ones(1)}, "x": payload}, path,
                   _use_new_zipfile_serialization=how == "zip")
    with pytest.raises(ConversionError) as caught:
        convert_checkpoint(path, tmp_path / "out.safetensors")
    assert not marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "out.safetensors").exists()
    if how == "zip":
        assert isinstance(caught.value, UnsafeCheckpointError)
        assert "system" in str(caught.value) and "never runs code" in str(caught.value)


def test_lightning_leftovers_load_as_inert_data_without_importing_lightning(tmp_path, monkeypatch):
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "/somewhere"

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    fakes = {"pytorch_lightning": types.ModuleType("pytorch_lightning"),
             "pytorch_lightning.callbacks": types.ModuleType("pytorch_lightning.callbacks"), module.__name__: module}
    fakes["pytorch_lightning"].callbacks = fakes["pytorch_lightning.callbacks"]
    fakes["pytorch_lightning.callbacks"].model_checkpoint = module
    for name, fake in fakes.items():
        monkeypatch.setitem(sys.modules, name, fake)
    torch.save({"state_dict": state_dict(), "callbacks": {"ModelCheckpoint": ModelCheckpoint()},
                "global_step": np.int64(5)}, tmp_path / "lightning.ckpt")
    monkeypatch.undo()
    assert "pytorch_lightning" not in sys.modules
    assert sorted(load_pickle_state_dict(tmp_path / "lightning.ckpt")) == sorted(state_dict())


# ----- conversion -----

def test_ckpt_to_safetensors_keeps_every_tensor_exactly_and_drops_training_state(lightning_ckpt, tmp_path):
    report = convert_checkpoint(lightning_ckpt, tmp_path / "out.safetensors")
    out = written(tmp_path / "out.safetensors")
    original = state_dict()
    assert sorted(out) == sorted(original)
    assert all(out[key].dtype == value.dtype and torch.equal(out[key], value) for key, value in original.items())
    assert "optimizer_states" in report.summary() and "global_step" in report.summary()


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_precision_converts_floats_only(lightning_ckpt, tmp_path, precision, dtype):
    convert_checkpoint(lightning_ckpt, tmp_path / "out.safetensors", CheckpointOptions(precision=precision))
    out, original = written(tmp_path / "out.safetensors"), state_dict()
    for key, value in original.items():
        expected = value.to(dtype) if value.is_floating_point() else value
        assert out[key].dtype == expected.dtype and torch.equal(out[key], expected), key


def test_ema_drop_and_only(lightning_ckpt, tmp_path):
    convert_checkpoint(lightning_ckpt, tmp_path / "drop.safetensors", CheckpointOptions(ema="drop"))
    assert not any(key.startswith("model_ema.") for key in written(tmp_path / "drop.safetensors"))
    convert_checkpoint(lightning_ckpt, tmp_path / "only.safetensors", CheckpointOptions(ema="only"))
    only = written(tmp_path / "only.safetensors")
    assert not any(key.startswith("model_ema.") for key in only)
    assert torch.equal(only["model.diffusion_model.input_blocks.0.0.weight"], torch.ones(8, 4, 3, 3))
    assert torch.equal(only["first_stage_model.decoder.conv_out.weight"], state_dict()["first_stage_model.decoder.conv_out.weight"])


def test_ema_only_refuses_a_missing_or_partial_ema(tmp_path):
    partial = {key: value for key, value in state_dict().items() if key != "model_ema.diffusion_modelout2bias"}
    safetensors.torch.save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ConversionError, match="lacks 1 UNet weights.*out.2.bias"):
        convert_checkpoint(tmp_path / "partial.safetensors", tmp_path / "out.safetensors", CheckpointOptions(ema="only"))
    bare = {key: value for key, value in state_dict().items() if not key.startswith("model_ema.")}
    safetensors.torch.save_file(bare, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ConversionError, match="no EMA weights"):
        convert_checkpoint(tmp_path / "bare.safetensors", tmp_path / "out.safetensors", CheckpointOptions(ema="only"))
    assert not (tmp_path / "out.safetensors").exists()


def test_baking_in_a_vae(lightning_ckpt, tmp_path):
    vae = {"decoder.conv_out.weight": torch.full((3, 8, 3, 3), 7.0), "encoder.conv_in.weight": torch.ones(8, 3, 3, 3)}
    safetensors.torch.save_file(vae, str(tmp_path / "vae.safetensors"))
    report = convert_checkpoint(lightning_ckpt, tmp_path / "out.safetensors", CheckpointOptions(vae=tmp_path / "vae.safetensors"))
    out = written(tmp_path / "out.safetensors")
    assert torch.equal(out["first_stage_model.decoder.conv_out.weight"], vae["decoder.conv_out.weight"])
    assert "first_stage_model.encoder.conv_in.weight" in out and "VAE replaced" in report.summary()
    safetensors.torch.save_file({"decoder.conv_out.weight": torch.ones(3, 4, 3, 3)}, str(tmp_path / "small_vae.safetensors"))
    with pytest.raises(ConversionError, match="does not fit this checkpoint"):
        convert_checkpoint(lightning_ckpt, tmp_path / "x.safetensors", CheckpointOptions(vae=tmp_path / "small_vae.safetensors"))


def test_conversion_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    safetensors.torch.save_file({f"t{i}": torch.randn(64, 64) for i in range(12)}, str(tmp_path / "in.safetensors"))
    alive, most = [], []
    original_get = tensor_files.TensorSource.get

    def watched_get(self, key):
        gc.collect()
        most.append(sum(ref() is not None for ref in alive))
        tensor = original_get(self, key)
        alive.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(tensor_files.TensorSource, "get", watched_get)
    convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out.safetensors", CheckpointOptions(precision="fp16"))
    assert len(most) == 12 and max(most) == 0  # each tensor is released before the next is read


# ----- bad input and failed writes -----

def test_a_truncated_file_gets_a_clear_error(tmp_path):
    safetensors.torch.save_file(state_dict(), str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="not a complete safetensors file.*truncated"):
        convert_checkpoint(tmp_path / "cut.safetensors", tmp_path / "out.safetensors")
    torch.save({"state_dict": state_dict()}, tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated, corrupt"):
        convert_checkpoint(tmp_path / "cut.ckpt", tmp_path / "out.safetensors")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cut.ckpt", "cut.safetensors", "full.ckpt", "full.safetensors"]


def test_a_full_disk_mid_write_leaves_nothing_behind(lightning_ckpt, tmp_path, monkeypatch):
    class FillsUp:
        def __init__(self, path, mode):
            self.handle, self.room = open(path, mode), 2000

        def write(self, data):
            size = memoryview(data).nbytes
            if size > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= size
            return self.handle.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(tensor_files, "open", FillsUp, raising=False)
    out = tmp_path / "out" / "model.safetensors"
    with pytest.raises(ConversionError, match="disk filled up.*Nothing was left behind"):
        convert_checkpoint(lightning_ckpt, out)
    assert list(out.parent.iterdir()) == []


def test_refuses_to_overwrite_or_to_write_a_pickle(lightning_ckpt, tmp_path):
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    with pytest.raises(ConversionError, match="already exists"):
        convert_checkpoint(lightning_ckpt, tmp_path / "taken.safetensors")
    with pytest.raises(ConversionError, match="only as .safetensors"):
        convert_checkpoint(lightning_ckpt, tmp_path / "out.ckpt")
    with pytest.raises(ConversionError, match="precision 'fp8'"):
        convert_checkpoint(lightning_ckpt, tmp_path / "out.safetensors", CheckpointOptions(precision="fp8"))
    assert (tmp_path / "taken.safetensors").read_bytes() == b"mine"
