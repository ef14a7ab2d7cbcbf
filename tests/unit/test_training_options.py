"""Training options on the fake: the formulas on a table of timesteps, every optimizer and schedule, exact
resume with a stateful combination, EMA, precision, checkpointing, metadata, bad combinations, NaN."""

import math
import sys

import pytest
import torch
from fakes import FakeBridge, RecordingHost
from helpers import make_session
from tunekit.trainer.checkpoints import CONFIG_FILE, latest_state_folder, load_state
from tunekit.trainer.config import LR_SCHEDULERS, OPTIMIZERS, TrainConfig
from tunekit.trainer.errors import ConfigError, TrainingDivergedError
from tunekit.trainer.events import StepDone
from tunekit.trainer.host import NullHost
from tunekit.trainer.losses import min_snr_weights, snr
from tunekit.trainer.noise import TERMINAL_ALPHA, is_zero_terminal, rescale_zero_terminal_snr
from tunekit.trainer.optional import MissingPackage
from tunekit.trainer.timesteps import sample_timesteps, timestep_weights

TABLE = torch.tensor([0, 1, 10, 100, 250, 500, 750, 999])


class VPredictionBridge(FakeBridge):
    prediction_type = "v_prediction"


# ----- formulas on a table of timesteps -----

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_paper_on_a_table_of_timesteps(prediction_type):
    alphas = FakeBridge().alphas_cumprod()
    weights = min_snr_weights(snr(alphas, TABLE), 5.0, prediction_type)
    for t, weight in zip(TABLE.tolist(), weights.tolist()):
        sigma = math.sqrt((1 - alphas[t].item()) / alphas[t].item())  # SNR = 1 / sigma^2 (Karras form)
        ratio = 1 / sigma**2
        expected = min(ratio, 5.0) / (ratio + 1 if prediction_type == "v_prediction" else ratio)
        assert weight == pytest.approx(expected, rel=1e-5), t
    # Low-noise timesteps (SNR >> 5) are weighted down; high-noise ones keep weight 1 (epsilon).
    if prediction_type == "epsilon":
        assert weights[0] < 0.01 and weights[-1] == pytest.approx(1.0)


def test_timestep_bias_weights_match_the_diffusers_recipe():
    later = timestep_weights(TrainConfig(timestep_bias_strategy="later", timestep_bias_multiplier=2.0,
                                         timestep_bias_portion=0.25), 1000)
    assert later[:750].unique().tolist() == [pytest.approx(1 / 1250)]
    assert later[750:].unique().tolist() == [pytest.approx(2 / 1250)]
    earlier = timestep_weights(TrainConfig(timestep_bias_strategy="earlier", timestep_bias_multiplier=0.5,
                                           timestep_bias_portion=0.5), 1000)
    assert earlier[0] == pytest.approx(0.5 / 750) and earlier[999] == pytest.approx(1 / 750)
    ranged = timestep_weights(TrainConfig(timestep_bias_strategy="range", timestep_bias_multiplier=3.0,
                                          timestep_bias_begin=200, timestep_bias_end=400), 1000)
    assert ranged[199] == pytest.approx(1 / 1400) and ranged[200] == ranged[399] == pytest.approx(3 / 1400)
    assert ranged[400] == pytest.approx(1 / 1400) and float(ranged.sum()) == pytest.approx(1.0)
    assert timestep_weights(TrainConfig(), 1000) is None


def test_biased_timesteps_are_drawn_as_often_as_their_weight_says():
    weights = timestep_weights(TrainConfig(timestep_bias_strategy="later", timestep_bias_multiplier=3.0), 1000)
    drawn = sample_timesteps(40_000, 1000, torch.Generator().manual_seed(0), weights)
    share = (drawn >= 750).float().mean().item()
    print(f"share of 'later' timesteps drawn: {share:.3f} (expected {750 / 1500:.3f})")
    assert share == pytest.approx(0.5, abs=0.01)
    assert drawn.min() >= 0 and drawn.max() <= 999


def test_zero_terminal_snr_rescale_ends_at_pure_noise_and_keeps_the_first_step():
    alphas = FakeBridge().alphas_cumprod()
    rescaled = rescale_zero_terminal_snr(alphas)
    assert not is_zero_terminal(alphas) and is_zero_terminal(rescaled)
    assert rescaled[-1].item() == pytest.approx(TERMINAL_ALPHA)
    assert rescaled[0].item() == pytest.approx(alphas[0].item(), rel=1e-6)
    assert bool((rescaled[1:] <= rescaled[:-1]).all())


# ----- optimizers and schedules -----

LEARNING_RATES = {"adamw": 5e-3, "adamw8bit": 5e-3, "adafactor": 5e-3, "lion": 2.5e-3, "prodigy": 1.0,
                  "schedule_free_adamw": 1e-2, "sgd": 0.5}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizer_lowers_the_loss(optimizer):
    session = make_session(steps=25, optimizer=optimizer, learning_rate=LEARNING_RATES[optimizer], weight_decay=0.0)
    session.prepare(NullHost())
    before = session.evaluate()
    session.run(NullHost())
    after = session.evaluate()
    print(f"{optimizer}: fixed-noise loss {before:.4f} -> {after:.4f} ({type(session.optimizer).__module__})")
    assert after < 0.9 * before
    assert session.export("x")[1]["ss_optimizer"].startswith(type(session.optimizer).__module__)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_torchs_own_optimizers_update_in_one_fused_kernel_where_this_torch_has_one(optimizer):
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    session = make_session(optimizer=optimizer)
    fused_here = "cpu" in _get_fused_kernels_supported_devices()
    assert session.optimizer.defaults["fused"] is (True if fused_here else None)
    assert session.optimizer.defaults["foreach"] is (None if fused_here else True)


def learning_rates(**settings) -> list[float]:
    host = RecordingHost()
    make_session(**settings).run(host)
    return [event.learning_rate for event in host.events if isinstance(event, StepDone)]


@pytest.mark.parametrize("scheduler", LR_SCHEDULERS)
def test_each_schedule_shapes_the_learning_rate(scheduler):
    warmup = 0 if scheduler == "constant" else 3
    rates = learning_rates(steps=12, learning_rate=1e-3, lr_scheduler=scheduler, lr_warmup_steps=warmup,
                           lr_scheduler_num_cycles=2)
    print(scheduler, [f"{rate:.2e}" for rate in rates])
    assert len(rates) == 12 and max(rates) <= 1e-3 * (1 + 1e-9)
    if warmup:
        assert rates[0] < rates[1] < rates[2] < rates[3] == pytest.approx(1e-3)  # 3 warmup steps from 0
    if scheduler in ("constant", "constant_with_warmup"):
        assert rates[-1] == pytest.approx(1e-3)
    else:
        assert rates[-1] < 0.5e-3  # decays


def test_separate_unet_learning_rate_is_the_groups_rate():
    session = make_session(steps=1, learning_rate=1e-3, unet_lr=2e-4)
    assert [group["lr"] for group in session.optimizer.param_groups] == [2e-4]
    assert session.export("x")[1]["ss_unet_lr"] == "0.0002"


@pytest.mark.parametrize("module, optimizer, pip_name", [
    ("bitsandbytes", "adamw8bit", "bitsandbytes"),
    ("pytorch_optimizer", "prodigy", "pytorch-optimizer"),
    ("pytorch_optimizer", "lion", "pytorch-optimizer"),
])
def test_a_missing_optimizer_package_names_the_optimizer_and_the_install_command(monkeypatch, module, optimizer, pip_name):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingPackage) as raised:
        make_session(steps=2, optimizer=optimizer)
    message = str(raised.value)
    assert f"'{optimizer}' optimizer" in message and f"pip install {pip_name}" in message


# ----- exact resume -----

STATEFUL = {"steps": 20, "optimizer": "lion", "learning_rate": 1e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 4,
            "ema_decay": 0.9, "gradient_accumulation_steps": 2, "min_snr_gamma": 5.0, "noise_offset": 0.1,
            "timestep_bias_strategy": "later", "timestep_bias_multiplier": 2.0, "caption_dropout_rate": 0.3,
            "max_grad_norm": 1.0, "loss_every": 3, "batch_size": 2}


# Rank 256: bitsandbytes keeps tensors under 4096 elements in 32 bits; these get 8-bit state.
@pytest.mark.parametrize("changes", [{}, {"optimizer": "adamw8bit", "learning_rate": 5e-3, "rank": 256, "alpha": 256}],
                         ids=["lion", "adamw8bit"])
def test_twenty_steps_equal_ten_and_a_resumed_ten_bit_for_bit(tmp_path, changes):
    settings = {**STATEFUL, **changes}
    straight = make_session(**settings)
    straight.run(NullHost())

    first = make_session(tmp_path, **settings)
    first.config.steps = 10  # stop after 10, then save, as a cancel would
    first.run(NullHost())
    folder = first.save_final(NullHost())
    assert folder.name == "step_000010"

    resumed = make_session(tmp_path, **settings)
    resumed.resume(folder)
    resumed.run(NullHost())
    for name, expected, actual in [("raw", straight.network.kohya_state_dict(), resumed.network.kohya_state_dict()),
                                   ("saved", straight.export("a")[0], resumed.export("a")[0])]:
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[key], actual[key]) for key in expected), name
    assert straight.losses[10:] == resumed.losses
    if settings["optimizer"] == "adamw8bit":
        states = [value for state in resumed.optimizer.state.values() for value in state.values()]
        assert any(isinstance(value, torch.Tensor) and value.dtype == torch.uint8 for value in states)
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())


def test_a_state_saved_before_the_training_options_still_resumes(tmp_path):
    """Format 1 (no scheduler/scaler/EMA/raw weights in state.pt) loads as the constant-LR AdamW run it was."""
    session = make_session(tmp_path, steps=3)
    session.run(NullHost())
    folder = session.save_final(NullHost())
    state = torch.load(folder / "state.pt", weights_only=True)
    old = {key: state[key] for key in ("step", "optimizer", "generator", "order", "position", "config", "dataset")}
    torch.save(old, folder / "state.pt")
    resumed = make_session(tmp_path, steps=5)
    resumed.resume(folder)
    assert resumed.step == 3 and resumed.run(NullHost()).steps_done == 5


# ----- EMA, precision, checkpointing, clip skip, caption dropout -----

def test_ema_weights_differ_from_the_raw_ones_and_are_saved_when_asked(tmp_path):
    session = make_session(tmp_path, steps=15, ema_decay=0.9)
    session.run(NullHost())
    raw = session.network.kohya_state_dict()
    saved, _ = session.export("ema")
    shadow = dict(zip([name for name, _ in session.network.named_parameters()], session.ema.shadow))
    ups = [key for key in raw if key.endswith("lora_up.weight")]
    assert any(not torch.allclose(raw[key].half(), saved[key]) for key in ups)
    assert all(torch.equal(saved[key], raw[key].half()) for key in raw if key.endswith(".alpha"))
    first_up = next(name for name in shadow if name.endswith("up.weight"))
    assert any(torch.equal(shadow[first_up].half(), saved[key]) for key in ups)
    folder = session.save_final(NullHost())
    state = load_state(folder)
    assert state.raw_network is not None and torch.equal(state.raw_network[ups[0]], raw[ups[0]])
    assert torch.equal(state.network[ups[0]].half(), saved[ups[0]])  # the artefact holds the EMA weights

    session.config.save_ema = False
    assert all(torch.equal(session.export("raw")[0][key], raw[key].half()) for key in raw)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_the_cpu(precision):
    session = make_session(steps=25, mixed_precision=precision)
    seen = []
    session.bridge.denoiser.out.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    session.prepare(NullHost())
    before = session.evaluate()
    session.run(NullHost())
    after = session.evaluate()
    print(f"{precision}: fixed-noise loss {before:.4f} -> {after:.4f}")
    assert {torch.bfloat16 if precision == "bf16" else torch.float16} <= set(seen)
    assert after < 0.9 * before and all(p.dtype == torch.float32 for p in session.network.parameters())
    assert (session.precision.scaler is not None) == (precision == "fp16")


def test_gradient_checkpointing_recomputes_and_gives_the_same_weights():
    plain, bridge = make_session(steps=3), FakeBridge()
    checkpointed = make_session(bridge=bridge, steps=3, gradient_checkpointing=True)
    plain.run(NullHost())
    checkpointed.run(NullHost())
    # Each block runs twice per step: forward, and again in backward.
    assert bridge.checkpointed_forwards == 2 * 3 * 4
    expected, actual = plain.network.kohya_state_dict(), checkpointed.network.kohya_state_dict()
    assert all(torch.allclose(expected[key], actual[key], atol=1e-6) for key in expected)
    assert all("forward" not in vars(module) for module in bridge.denoiser.modules())  # undone after training


def test_clip_skip_encodes_from_another_layer():
    skip = make_session(steps=1, clip_skip=2)
    plain = make_session(steps=1)
    assert skip.bridge.clip_skip == 2
    skip.prepare(NullHost())
    plain.prepare(NullHost())
    caption = next(iter(plain.feed.prompts))
    assert not torch.equal(skip.feed.prompts[caption].context, plain.feed.prompts[caption].context)


def test_run_wide_caption_dropout_empties_some_prompts_and_a_subsets_own_rate_wins():
    session = make_session(steps=1, caption_dropout_rate=0.5)
    captions = [session.feed._caption(item, __import__("random").Random(i), 1, i, 100)
                for i, item in enumerate(session.plan.items * 10)]
    share = captions.count("") / len(captions)
    print(f"empty prompts: {share:.2f}")
    assert 0.3 < share < 0.7 and set(captions) == {"", "tkred square"}


def test_v_prediction_with_zero_terminal_snr_trains_on_the_rescaled_schedule():
    session = make_session(bridge=VPredictionBridge(), steps=15, zero_terminal_snr=True, min_snr_gamma=5.0)
    assert is_zero_terminal(session.alphas)
    session.prepare(NullHost())
    before = session.evaluate()
    session.run(NullHost())
    assert session.evaluate() < before
    metadata = session.export("v")[1]
    assert metadata["ss_zero_terminal_snr"] == "True" and metadata["ss_v_parameterization"] == "True"


# ----- read-back, NaN -----

def test_the_loss_is_read_back_only_every_n_steps():
    host = RecordingHost()
    session = make_session(steps=10, loss_every=4)
    session.run(host)
    reported = [event.loss for event in host.events if isinstance(event, StepDone)]
    assert all(math.isnan(loss) for loss in reported[:3]) and not math.isnan(reported[3])
    assert reported[4:7] == [reported[3]] * 3 and len(session.losses) == 10


class PoisonedBridge(FakeBridge):
    """Predicts NaN from the `poison_at`-th forward on, as a diverged model would."""

    def __init__(self, poison_at: int):
        super().__init__()
        self.forwards, self.poison_at = 0, poison_at

    def predict(self, *args):
        self.forwards += 1
        output = super().predict(*args)
        return output * float("nan") if self.forwards >= self.poison_at else output


@pytest.mark.parametrize("loss_every", [1, 4])
def test_nan_stops_training_keeps_the_last_good_state_and_names_the_setting(tmp_path, loss_every):
    session = make_session(tmp_path, bridge=PoisonedBridge(poison_at=7), steps=12, loss_every=loss_every)
    with pytest.raises(TrainingDivergedError, match=r"at step 7.*Lower learning_rate \(now 0.005\)"):
        session.run(NullHost())
    folder = latest_state_folder(tmp_path)
    state = load_state(folder)
    # loss_every 1: checked before step 7's update, so step 6 is kept. loss_every 4: read in steps 4 and 8; the
    # read in step 4 vouches for the weights step 4 started from (after step 3).
    good_step = 6 if loss_every == 1 else 3
    print(f"loss_every {loss_every}: diverged at step 7, kept {folder.name}")
    assert state.step == good_step
    assert all(torch.isfinite(tensor).all() for tensor in state.network.values())
    resumed = make_session(tmp_path, steps=good_step + 2)
    resumed.resume(folder)
    assert resumed.run(NullHost()).steps_done == good_step + 2


# ----- metadata, config file, bad combinations -----

EVERY_OPTION = {"optimizer": "adafactor", "weight_decay": 0.02, "unet_lr": 3e-3, "lr_scheduler": "polynomial",
                "lr_warmup_steps": 1, "lr_scheduler_num_cycles": 3, "lr_scheduler_power": 2.0,
                "gradient_accumulation_steps": 2, "max_grad_norm": 0.5, "min_snr_gamma": 4.0, "noise_offset": 0.05,
                "timestep_bias_strategy": "range", "timestep_bias_multiplier": 1.5, "timestep_bias_begin": 100,
                "timestep_bias_end": 300, "caption_dropout_rate": 0.1, "ema_decay": 0.95, "save_ema": False,
                "mixed_precision": "bf16", "gradient_checkpointing": True, "clip_skip": 2, "deterministic": True, "loss_every": 2}


def test_every_option_is_in_the_ss_metadata_and_the_config_file(tmp_path):
    session = make_session(tmp_path, steps=2, **EVERY_OPTION)
    session.run(NullHost())
    folder = session.save_final(NullHost())
    metadata = session.export("every")[1]
    expected = {
        "ss_optimizer": "transformers.optimization.Adafactor(weight_decay=0.02)", "ss_lr_scheduler": "polynomial",
        "ss_lr_warmup_steps": "1", "ss_lr_scheduler_num_cycles": "3", "ss_lr_scheduler_power": "2.0",
        "ss_unet_lr": "0.003", "ss_gradient_accumulation_steps": "2", "ss_max_grad_norm": "0.5",
        "ss_min_snr_gamma": "4.0", "ss_noise_offset": "0.05", "ss_caption_dropout_rate": "0.1",
        "ss_ema_decay": "0.95", "ss_ema_saved": "False", "ss_mixed_precision": "bf16",
        "ss_gradient_checkpointing": "True", "ss_clip_skip": "2", "ss_deterministic": "True",
        "ss_zero_terminal_snr": "False", "ss_v_parameterization": "False", "ss_seed": "3",
    }
    assert {key: metadata.get(key) for key in expected} == expected
    assert '"strategy": "range"' in metadata["ss_timestep_bias"] and '"begin": 100' in metadata["ss_timestep_bias"]
    assert TrainConfig.from_dict(__import__("json").loads(metadata["tunekit_config"])) == session.config
    for config_file in (folder / CONFIG_FILE, tmp_path / CONFIG_FILE):
        assert TrainConfig.from_toml(config_file.read_text()) == session.config
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run


def test_bad_combinations_are_reported_together_with_the_fix():
    config = TrainConfig(optimizer="adam", lr_scheduler="constant", lr_warmup_steps=5, steps=4,
                         min_snr_gamma=-1, timestep_bias_strategy="range", timestep_bias_begin=500,
                         timestep_bias_end=100, mixed_precision="fp8", ema_decay=1.5, clip_skip=0)
    message = "\n".join(config.problems())
    for expected in ("optimizer is 'adam': choose one of adamw", "lr_warmup_steps is 5 with steps 4",
                     "lr_scheduler is 'constant', which has no warmup: choose 'constant_with_warmup'",
                     "min_snr_gamma is -1", "timestep_bias_begin/end are 500/100", "mixed_precision is 'fp8'",
                     "ema_decay is 1.5", "clip_skip is 0"):
        assert expected in message, expected
    schedule_free = TrainConfig(optimizer="schedule_free_adamw", lr_scheduler="cosine", ema_decay=0.99).problems()
    assert any("set lr_scheduler to 'constant'" in problem for problem in schedule_free)
    assert any("already averages" in problem for problem in schedule_free)


def test_settings_that_contradict_the_model_are_errors():
    with pytest.raises(ConfigError, match="prediction_type is 'v_prediction' but the model predicts 'epsilon'.*ModelSamplingDiscrete"):
        make_session(steps=2, prediction_type="v_prediction")
    with pytest.raises(ConfigError, match="zero_terminal_snr is on but the model predicts 'epsilon'"):
        make_session(steps=2, zero_terminal_snr=True)
    assert TrainConfig(clip_skip=2).model_problems("epsilon", "sdxl")[0].startswith("clip_skip is 2 on an SDXL")
    make_session(bridge=VPredictionBridge(), steps=1, prediction_type="v_prediction")  # agrees: fine


def test_after_a_late_nan_a_large_trainable_keeps_its_last_saved_state(tmp_path, monkeypatch):
    """No copy of the state at each read for large trainables (a full fine-tune): nothing new is saved."""
    monkeypatch.setattr("tunekit.trainer.session.GOOD_STATE_COPY_LIMIT", 0)
    host = RecordingHost()
    session = make_session(tmp_path, bridge=PoisonedBridge(poison_at=7), steps=12, loss_every=4, save_every=2)
    with pytest.raises(TrainingDivergedError, match="at step 7"):
        session.run(host)
    assert session._good is None
    assert [folder.name for folder in sorted(tmp_path.glob("step_*"))] == ["step_000004", "step_000006"]
    assert any("the last saved state is kept" in getattr(event, "message", "") for event in host.events)
