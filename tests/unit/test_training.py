"""The session on a tiny ldm-shaped denoiser: learning, frozen base, saving, resume, cancel, NaN."""

import shutil

import pytest
import torch
from fakes import FakeBridge, RecordingHost
from helpers import make_session
from tunekit.trainer.adapters.kohya import load_lora, save_lora
from tunekit.trainer.checkpoints import latest_state_folder
from tunekit.trainer.errors import ConfigError, SaveError, TrainingDivergedError
from tunekit.trainer.events import CheckpointSaved, Notice, StepDone
from tunekit.trainer.host import NullHost


def test_training_lowers_the_loss_at_fixed_noise():
    session = make_session(steps=60)
    session.prepare(NullHost())
    before = session.evaluate()
    session.run(NullHost())
    after = session.evaluate()
    print(f"fixed-noise loss before {before:.4f}, after {after:.4f}")
    assert after < 0.8 * before


def test_only_adapter_parameters_get_gradients_and_the_base_is_untouched():
    bridge = FakeBridge()
    base = {name: p.clone() for name, p in bridge.denoiser.named_parameters()}
    session = make_session(bridge=bridge, steps=5)
    session.run(NullHost())
    assert all(p.grad is not None for p in session.network.parameters())
    for name, parameter in bridge.denoiser.named_parameters():
        assert parameter.grad is None, name
        assert parameter.is_inference(), f"{name} was not restored to the host's own tensor"
        assert torch.equal(parameter, base[name]), f"{name} changed"


def test_training_uses_the_host_weights_in_place_without_a_copy():
    bridge = FakeBridge()
    original = {name: p.data_ptr() for name, p in bridge.denoiser.named_parameters()}
    seen = {}

    class PointerHost(RecordingHost):
        def emit(self, event):
            seen.update({name: p.data_ptr() for name, p in bridge.denoiser.named_parameters()})
            super().emit(event)

    make_session(bridge=bridge, steps=1).run(PointerHost())
    assert seen == original


def test_adapters_start_as_a_no_op_and_hooks_come_off_after_training():
    bridge = FakeBridge()
    session = make_session(bridge=bridge, steps=2)
    session.run(NullHost())
    assert all(not module._forward_hooks for module in bridge.denoiser.modules())


def test_saved_lora_round_trips_exactly(tmp_path):
    session = make_session(steps=3)
    session.run(NullHost())
    tensors, metadata = session.export("round_trip")
    path = save_lora(tmp_path / "round_trip.safetensors", tensors, metadata)
    loaded, loaded_metadata = load_lora(path)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[key], tensors[key]) for key in tensors)
    assert loaded_metadata["ss_base_model_version"] == "sd_v1"
    assert loaded_metadata["ss_network_dim"] == "4" and loaded_metadata["ss_network_alpha"] == "4.0"
    assert len(loaded_metadata["sshs_model_hash"]) == 64
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in loaded


def test_resume_continues_exactly_where_a_cancelled_run_stopped(tmp_path):
    straight = make_session(steps=12)
    straight.run(NullHost())

    first = make_session(tmp_path, steps=12)
    result = first.run(RecordingHost(stop_after=5))
    assert result.stopped_early and result.steps_done == 5
    folder = latest_state_folder(tmp_path)
    assert folder is not None and folder.name == "step_000005"

    resumed = make_session(tmp_path, steps=12)
    resumed.resume(folder)
    assert resumed.run(NullHost()).steps_done == 12
    expected, actual = straight.network.kohya_state_dict(), resumed.network.kohya_state_dict()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


class CrashingHost(RecordingHost):
    """Raises from inside the model's forward, as ComfyUI's ops do on Cancel."""

    def __init__(self, bridge, crash_in_step: int):
        super().__init__()
        self.forwards, self.crash_at = 0, crash_in_step
        bridge.denoiser.out.register_forward_hook(self._maybe_crash)

    def _maybe_crash(self, *args):
        self.forwards += 1
        if self.forwards == self.crash_at:
            raise KeyboardInterrupt("cancelled mid-step")


def test_an_exception_mid_step_keeps_every_completed_step_and_resumes_exactly(tmp_path):
    straight = make_session(steps=8)
    straight.run(NullHost())

    bridge = FakeBridge()
    crashing = make_session(tmp_path, bridge=bridge, steps=8)
    with pytest.raises(KeyboardInterrupt):
        crashing.run(CrashingHost(bridge, crash_in_step=4))
    folder = latest_state_folder(tmp_path)
    assert folder.name == "step_000003"

    resumed = make_session(tmp_path, steps=8)
    resumed.resume(folder)
    resumed.run(NullHost())
    expected, actual = straight.network.kohya_state_dict(), resumed.network.kohya_state_dict()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_a_cancel_whose_state_cannot_be_written_says_so_and_keeps_the_last_state(tmp_path, monkeypatch):
    first = make_session(tmp_path, steps=2)
    first.run(NullHost())
    first.save_final(NullHost())  # step_000002: the last complete state
    torch_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and "step" in obj:
            raise OSError(28, "No space left on device")
        return torch_save(obj, path, *args, **kwargs)

    bridge = FakeBridge()
    resumed = make_session(tmp_path, bridge=bridge, steps=8)
    resumed.resume(latest_state_folder(tmp_path))
    monkeypatch.setattr(torch, "save", disk_full)
    host = CrashingHost(bridge, crash_in_step=3)
    with pytest.raises(KeyboardInterrupt):
        resumed.run(host)
    notices = [event.message for event in host.of(Notice)]
    assert any("could not save the training state of step 4" in notice and "No space left" in notice
               and f"kept: {tmp_path / 'step_000002'}" in notice for notice in notices), notices
    assert sorted(folder.name for folder in tmp_path.glob("step_*")) == ["step_000002"]


def test_resume_refuses_a_different_rank(tmp_path):
    make_session(tmp_path, steps=2, save_every=1).run(NullHost())
    other = make_session(tmp_path, steps=4, rank=8, alpha=8)
    with pytest.raises(ConfigError, match="rank 4"):
        other.resume(latest_state_folder(tmp_path))


def test_save_every_keeps_the_last_checkpoints(tmp_path):
    host = RecordingHost()
    make_session(tmp_path, steps=7, save_every=2).run(host)
    saved = [event.step for event in host.events if isinstance(event, CheckpointSaved)]
    assert saved == [2, 4, 6]
    assert sorted(folder.name for folder in tmp_path.glob("step_*")) == ["step_000004", "step_000006"]


def test_a_full_disk_mid_save_stops_with_advice_leaves_no_half_state_and_keeps_the_last_one(tmp_path, monkeypatch):
    torch_save, failed = torch.save, []

    def disk_full_from_step_4(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:  # state.pt, after lora.safetensors was written
            failed.append(path)
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return torch_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_from_step_4)
    session = make_session(tmp_path, steps=8, save_every=2)
    with pytest.raises(SaveError) as raised:
        session.run(NullHost())
    message = str(raised.value)
    assert "state of step 4" in message and "file write failed" in message and "free there" in message
    assert f"the last complete state is kept: {tmp_path / 'step_000002'}" in message
    assert sorted(folder.name for folder in tmp_path.glob("step_*")) == ["step_000002"]
    assert len(failed) == 1, "the failed state was written a second time on the way out"

    monkeypatch.setattr(torch, "save", torch_save)
    resumed = make_session(tmp_path, steps=8)
    resumed.resume(latest_state_folder(tmp_path))
    assert resumed.run(NullHost()).steps_done == 8


@pytest.mark.parametrize("settings", [{}, {"optimizer": "sgd"}, {"ema_decay": 0.99}, {"rank": 32, "alpha": 32}])
def test_the_size_of_a_state_is_estimated_within_25_percent(tmp_path, settings):
    session = make_session(tmp_path, steps=2, **settings)
    session.run(NullHost())
    session.save_final(NullHost())
    written = sum(path.stat().st_size for path in latest_state_folder(tmp_path).iterdir())
    print(f"\n{settings}: estimated {session.state_bytes()} bytes, written {written}")
    assert 0.75 * written <= session.state_bytes() <= 1.25 * written


def test_a_run_whose_states_cannot_fit_on_the_disk_stops_before_any_step(tmp_path, monkeypatch):
    session = make_session(tmp_path / "run", steps=8, save_every=2)
    one_state = session.state_bytes()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=int(2.5 * one_state)))
    host = RecordingHost()
    with pytest.raises(SaveError, match=r"holds up to 3 training states .* or set save_every to 0") as raised:
        session.run(host)
    assert not host.of(StepDone) and not (tmp_path / "run").exists()
    print(f"\n{raised.value}")

    make_session(tmp_path / "run", steps=8).run(NullHost())  # one final state: it fits


def test_nan_loss_stops_with_advice_and_keeps_the_last_good_state(tmp_path):
    session = make_session(tmp_path, steps=5)
    session.run(RecordingHost(stop_after=2))
    session.config.steps = 5
    with torch.no_grad():
        next(iter(session.network.parameters())).fill_(float("nan"))
    with pytest.raises(TrainingDivergedError, match="Lower learning_rate"):
        session.run(NullHost())
    assert latest_state_folder(tmp_path) is not None


def test_invalid_settings_are_reported_together():
    with pytest.raises(ConfigError) as raised:
        make_session(steps=0, rank=0, resolution=100)
    message = str(raised.value)
    assert "steps is 0" in message and "rank is 0" in message and "resolution is 100" in message


def test_a_session_built_and_resumed_under_inference_mode_trains(tmp_path):
    """ComfyUI runs every node under torch.inference_mode()."""
    make_session(tmp_path, steps=2, save_every=1).run(NullHost())
    with torch.inference_mode():
        session = make_session(tmp_path, steps=4)
        session.resume(latest_state_folder(tmp_path))
        assert session.run(NullHost()).steps_done == 4


def test_the_epoch_notice_counts_optimizer_steps():
    """4 images at batch 1 are 4 batches; with 2 accumulation steps an epoch is 2 optimizer steps."""
    host = RecordingHost()
    make_session(steps=2, gradient_accumulation_steps=2).prepare(host)
    assert any("4 images in 1 buckets, 2 steps per epoch." in notice.message for notice in host.of(Notice))
