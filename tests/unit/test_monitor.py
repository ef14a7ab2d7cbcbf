"""Validation loss on held-out images and the sample schedule (trainer/monitor.py) on the tiny denoiser."""

import itertools
import random

import pytest
import torch
from fakes import FakeBridge, RecordingHost
from helpers import solid_images
from tunekit.trainer.checkpoints import load_state
from tunekit.trainer.config import TrainConfig
from tunekit.trainer.data import Dataset, TrainImage
from tunekit.trainer.errors import ConfigError
from tunekit.trainer.events import Notice, SamplesSaved, ValidationLoss
from tunekit.trainer.monitor import Monitor, MonitorSettings, ValidationSet, read_log, split_validation
from tunekit.trainer.session import TrainSession

SETTINGS = {"learning_rate": 5e-3, "rank": 4, "alpha": 4, "resolution": 64, "seed": 3}


def six_images() -> Dataset:
    return Dataset.from_images([TrainImage(f"graph image {i}", "tkred square", pixels)
                                for i, pixels in enumerate(solid_images(6))])


def monitored_session(steps, every, run_dir=None, count=2, sampler=None):
    bridge = FakeBridge()
    train, held_out = split_validation(six_images(), count, seed=5)
    session = TrainSession(bridge, train, TrainConfig(steps=steps, **SETTINGS), run_dir)
    validation = ValidationSet(bridge, held_out, 64, seed=5, draws=4) if held_out else None
    monitor = Monitor(MonitorSettings(every=every, validation_count=count), validation, sampler, run_dir)
    session.step_hooks.append(monitor)
    return session, monitor


def network_weights(session):
    return {k: v.clone() for k, v in session.network.kohya_state_dict(torch.float32).items()}


def test_the_split_is_fixed_by_its_seed_and_the_held_out_images_are_not_trained_on():
    train, held = split_validation(six_images(), 2, seed=5)
    again_train, again_held = split_validation(six_images(), 2, seed=5)
    held_names = [image.source for image in held.images]
    assert held_names == [image.source for image in again_held.images]
    assert [i.source for i in train.images] == [i.source for i in again_train.images]
    assert len(held_names) == 2 and not set(held_names) & {i.source for i in train.images}
    others = {tuple(i.source for i in split_validation(six_images(), 2, seed=s)[1].images) for s in range(8)}
    assert len(others) > 1, "the seed should choose which images are held out"
    session, _ = monitored_session(steps=1, every=1)
    assert not {item.image.source for item in session.plan.items} & set(held_names)
    assert len(session.plan.items) == 4


def test_holding_out_every_image_is_refused_with_the_count():
    with pytest.raises(ConfigError, match="validation_count is 6 but the dataset has 6 training images"):
        split_validation(six_images(), 6, seed=0)
    with pytest.raises(ConfigError, match="every is 0"):
        Monitor(MonitorSettings(every=0))


def test_validation_loss_is_fixed_for_a_fixed_model():
    bridge = FakeBridge()
    _, held = split_validation(six_images(), 2, seed=5)
    first, second = ValidationSet(bridge, held, 64, seed=5, draws=4), ValidationSet(bridge, held, 64, seed=5, draws=4)
    other_noise = ValidationSet(bridge, held, 64, seed=6, draws=4)
    torch.randn(100)  # the global RNG does not enter
    assert first.loss() == first.loss() == second.loss()
    assert other_noise.loss() != first.loss()
    assert first.timesteps().tolist() == [125, 375, 625, 875]


def test_monitor_runs_at_step_zero_every_n_steps_and_at_the_end_and_logs_the_curve(tmp_path):
    sampled = []
    session, monitor = monitored_session(steps=10, every=4, run_dir=tmp_path, sampler=lambda step: sampled.append(step) or [])
    host = RecordingHost()
    session.run(host)
    validations = host.of(ValidationLoss)
    assert [event.step for event in validations] == [0, 4, 8, 10] == sampled
    assert [event.step for event in host.of(SamplesSaved)] == sampled
    assert all(event.images == 2 for event in validations)
    rows = read_log(tmp_path / "validation.csv")
    assert [(row["step"], row["validation_loss"]) for row in rows] == [(e.step, e.loss) for e in validations]
    print("validation loss by step:", [(e.step, round(e.loss, 4)) for e in validations])
    curve = [event.loss for event in validations]
    assert all(later < earlier for earlier, later in itertools.pairwise(curve)), "held-out look-alikes should get easier"
    assert "validation loss (2 held-out images, fixed noise): step 0" in monitor.summary()


def test_sampling_and_validation_leave_the_trained_weights_bit_identical():
    def greedy_sampler(step):  # what ComfyUI's sampling does to global RNG state, and more
        torch.manual_seed(step)
        torch.randn(1000)
        random.random()
        return []

    plain, _ = monitored_session(steps=8, every=2, count=2, sampler=None)
    plain.step_hooks.clear()
    plain.run(RecordingHost())
    monitored, _ = monitored_session(steps=8, every=2, count=2, sampler=greedy_sampler)
    torch.manual_seed(99)
    before = torch.random.get_rng_state()
    monitored.run(RecordingHost())
    assert torch.equal(torch.random.get_rng_state(), before), "the global RNG was left changed"
    expected, got = network_weights(plain), network_weights(monitored)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert torch.equal(plain.generator.get_state(), monitored.generator.get_state())


def test_a_resumed_run_continues_its_validation_curve(tmp_path):
    session, _ = monitored_session(steps=6, every=3, run_dir=tmp_path)
    session.run(RecordingHost())
    session.save_final(RecordingHost())
    longer, _ = monitored_session(steps=9, every=3, run_dir=tmp_path)
    longer.resume(session.last_checkpoint)
    host = RecordingHost()
    longer.run(host)
    assert [e.step for e in host.of(ValidationLoss)] == [6, 9]
    assert [row["step"] for row in read_log(tmp_path / "validation.csv")] == [0, 3, 6, 9]


class ScriptedValidation(ValidationSet):
    """Held-out images whose loss at each round is given (the rule under test is what follows from the curve)."""

    def __init__(self, losses):
        super().__init__(FakeBridge(), six_images(), 64, seed=5, draws=1)
        self.script = iter(losses)

    def loss(self) -> float:
        return next(self.script)


# Rounds at steps 0, 2, 4, ...: the lowest at step 4, then three rounds without a new low (steps 6, 8, 10).
CURVE = [1.0, 0.8, 0.7, 0.75, 0.72, 0.71, 0.5, 0.4]


class WeightsPerStep:
    """A step hook recording the trained weights after every step."""

    def __init__(self):
        self.weights = {}

    def __call__(self, session, host):
        self.weights[session.step] = network_weights(session)


def early_stopping_session(run_dir, keep_best):
    session = TrainSession(FakeBridge(), six_images(), TrainConfig(steps=40, save_every=5, **SETTINGS), run_dir)
    monitor = Monitor(MonitorSettings(every=2, patience=3, keep_best=keep_best), ScriptedValidation(CURVE), log_dir=run_dir)
    recorder = WeightsPerStep()
    session.step_hooks += [monitor, recorder]
    return session, monitor, recorder


def test_patience_finishes_the_run_after_that_many_rounds_without_a_new_low(tmp_path):
    session, monitor, _ = early_stopping_session(tmp_path, keep_best=False)
    host = RecordingHost()
    result = session.run(host)
    assert (result.steps_done, result.stopped_early) == (10, False)
    assert [row["step"] for row in read_log(tmp_path / "validation.csv")] == [0, 2, 4, 6, 8, 10]
    assert "Finished at step 10 of 40: the validation loss has not gone below 0.7000 (step 4) for 3 rounds." in [notice.message for notice in host.of(Notice)]
    assert "stopped at step 10: no new low for 3 rounds" in monitor.summary()
    session.save_final(host)
    assert session.last_checkpoint.name == "step_000010"
    _, metadata = session.export("early")
    assert metadata["ss_steps"] == "10"


def test_keep_best_saves_and_exports_the_lowest_rounds_weights_and_resumes_from_the_last(tmp_path):
    session, monitor, recorder = early_stopping_session(tmp_path, keep_best=True)
    session.run(RecordingHost())
    session.save_final(RecordingHost())
    best, last = recorder.weights[4], recorder.weights[10]
    assert any(not torch.equal(best[key], last[key]) for key in best)
    tensors, metadata = session.export("best")
    assert metadata["ss_steps"] == "4"
    assert all(torch.equal(tensors[key], best[key].half()) for key in best), "the export holds step 4's weights"
    assert all(torch.equal(value, last[key]) for key, value in network_weights(session).items()), \
        "after the export the network holds the last weights again"
    state = load_state(session.last_checkpoint)
    assert all(torch.equal(state.network[key], best[key]) for key in best)
    assert all(torch.equal(state.raw_network[key], last[key]) for key in last), "a resume continues the last weights"
    assert "the result holds the weights of step 4 (lowest validation loss)" in monitor.summary()


def test_patience_and_keep_best_without_a_validation_loss_are_refused():
    with pytest.raises(ConfigError, match="patience and keep_best follow the validation loss"):
        Monitor(MonitorSettings(every=5, keep_best=True))
    with pytest.raises(ConfigError, match="patience is -1"):
        Monitor(MonitorSettings(every=5, patience=-1), ScriptedValidation(CURVE))
