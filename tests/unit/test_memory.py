"""The memory estimate (trainer/memory.py) against what training really adds; fitting by auto; out of memory."""

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from fakes import FakeBridge, FakeTextBridge, SpatialTransformer
from helpers import make_session, solid_dataset
from torch.utils.checkpoint import checkpoint
from tunekit.trainer import memory
from tunekit.trainer.checkpoints import load_state
from tunekit.trainer.config import TrainConfig
from tunekit.trainer.embeddings import TokenEmbedding
from tunekit.trainer.frozen import FrozenBase
from tunekit.trainer.host import NullHost
from tunekit.trainer.session import TrainSession

HERE = Path(__file__).resolve().parent
COMFY_HOST = Path(sys.prefix).parent  # the test venv is a ComfyUI host's (tools/comfy_host.py)
TOLERANCE = 0.25


def probe(**settings) -> dict:
    """memory_probe.py in a fresh process: its peak RSS is training's alone."""
    env = {**os.environ, "PYTHONPATH": str(COMFY_HOST / "stubs")}
    done = subprocess.run([sys.executable, str(HERE / "memory_probe.py"), json.dumps(settings)], check=False, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_close(result: dict) -> None:
    estimate, measured = result["estimate_added_mb"], result["measured_added_mb"]
    print(f"estimate {estimate:.0f} MB, measured {measured:.0f} MB ({estimate / measured - 1:+.0%}): {result}")
    assert abs(estimate - measured) <= TOLERANCE * measured, result


def test_estimate_matches_the_rss_training_adds_on_the_tiny_shape():
    # 384 px: 2304 latent tokens, so the fake's explicit self-attention matrices make activations dominate.
    assert_close(probe(shape="tiny", resolution=384, batch=2, rank=4, steps=2, targets="transformer"))


@pytest.mark.full_size
@pytest.mark.skipif(not (COMFY_HOST / "ComfyUI" / "comfy").is_dir(), reason="needs the ComfyUI test host")
@pytest.mark.parametrize("targets", ["all", "attention"])
def test_estimate_matches_the_rss_training_adds_on_full_size_sd15(targets):
    """ComfyUI's own SD1.5 UNet (3.4 GB fp32, random weights), 256 px, batch 1, rank 16, 2 steps."""
    assert_close(probe(shape="sd15", resolution=256, batch=1, rank=16, steps=2, targets=targets,
                       comfy_dir=str(COMFY_HOST / "ComfyUI")))


class CheckpointingBridge(FakeBridge):
    """The fake, with gradient checkpointing of its transformer blocks as the real bridge offers it."""

    def __init__(self):
        super().__init__()
        self.trained_with: list[bool] = []

    @contextmanager
    def training(self, attach, detach, gradient_checkpointing: bool = False):
        self.trained_with.append(gradient_checkpointing)
        blocks = [m for m in self.denoiser.modules() if isinstance(m, SpatialTransformer)]
        frozen = FrozenBase()
        frozen.apply(self.denoiser)
        attach()
        if gradient_checkpointing:
            for block in blocks:
                block.forward = _checkpointed(block.forward)
        try:
            yield
        finally:
            for block in blocks:
                block.__dict__.pop("forward", None)
            detach()
            frozen.restore()


def _checkpointed(forward):
    return lambda *args: checkpoint(forward, *args, use_reentrant=False)


def test_checkpointing_and_smaller_batches_lower_the_estimate():
    session = make_session(bridge=CheckpointingBridge(), resolution=256, batch_size=4)
    full = memory.estimate_memory(session)
    checkpointed = memory.estimate_memory(session, gradient_checkpointing=True)
    halved = memory.estimate_memory(session, batch_size=2, gradient_checkpointing=True)
    assert checkpointed.activations < 0.5 * full.activations
    assert halved.step_peak < 0.7 * checkpointed.step_peak
    assert full.adapter_weights == full.gradients == tensor_bytes(session.network.parameters())
    assert full.optimizer_state == 2 * full.adapter_weights  # AdamW: two fp32 moments
    assert full.base_weights > 0 and all(p.grad is None for p in session.network.parameters())


def test_a_training_text_encoder_adds_what_it_keeps_for_backward():
    frozen_text = memory.estimate_memory(make_session(bridge=FakeTextBridge(), batch_size=4))
    session = make_session(bridge=FakeTextBridge(), batch_size=4, text_encoders="all")
    trained_text = memory.estimate_memory(session)
    kept = text_encoder_saved_bytes(session, batch=4)
    added = trained_text.activations - frozen_text.activations
    print(f"text encoder keeps {kept} B for backward; the estimate adds {added} B")
    assert kept > 0 and kept <= added <= 2 * kept  # its outputs (the prompts) are held too
    assert trained_text.step_peak - frozen_text.step_peak >= added  # and backward forms the captions' gradient


def test_an_embeddings_estimate_traces_the_gradient_into_the_captions():
    bridge = FakeTextBridge()
    embedding = TokenEmbedding.from_init_word(bridge, "sksdog", "dog", 2)
    session = TrainSession(bridge, solid_dataset(), TrainConfig(steps=4, resolution=64), trainable=embedding)
    estimate = memory.estimate_memory(session)  # the UNet has nothing trained: backward runs for the captions alone
    assert 0 < estimate.activations < estimate.step_peak
    assert embedding.vectors["clip_l"].grad is None  # fake gradients never reach the real vectors


def text_encoder_saved_bytes(session, batch: int) -> int:
    """What autograd saves in the text encoder's forward, seen through saved-tensor hooks (not LiveBytes);
    weights (saved too, but held before training) left out."""
    storages = {}
    bridge, network = session.bridge, session.network
    weights = {p.untyped_storage().data_ptr() for p in [*network.parameters(), *bridge.text_encoder.parameters()]}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    training = bridge.training(network.attach, network.detach, text=True)
    with torch.inference_mode(False), torch.enable_grad(), training, \
            torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        bridge.encode_prompts([session.dataset.images[0].caption] * batch)
    return sum(size for pointer, size in storages.items() if pointer not in weights)


def tensor_bytes(parameters) -> int:
    return sum(p.numel() * p.element_size() for p in parameters)


def test_auto_turns_checkpointing_on_then_halves_the_batch_and_says_so():
    session = make_session(bridge=CheckpointingBridge(), resolution=256, batch_size=4, gradient_accumulation_steps=1)
    checkpointed = memory.estimate_memory(session, gradient_checkpointing=True)
    needed = []

    def free(required):
        needed.append(required)
        return checkpointed.added - 1  # checkpointing alone is one byte short

    plan = memory.plan_memory(session, free, "auto")
    assert plan.fits
    assert plan.changes == {"gradient_checkpointing": True, "batch_size": 2, "gradient_accumulation_steps": 2}
    assert needed and needed[0] > checkpointed.added  # ComfyUI is asked to free what the run as set would need
    assert "chose gradient_checkpointing True, batch_size 2, gradient_accumulation_steps 2" in plan.describe()
    fitted = memory.with_changes(session.config, plan.changes)
    assert fitted.batch_size * fitted.gradient_accumulation_steps == 4  # the same images per optimizer step


def test_fit_check_stops_before_any_work_naming_the_estimate_the_free_memory_and_what_to_lower():
    bridge = CheckpointingBridge()
    session = make_session(bridge=bridge, resolution=256, batch_size=4)
    plan = memory.plan_memory(session, lambda required: 10 * 2**20, "fit-check")
    assert not plan.fits and not plan.changes
    with pytest.raises(memory.OutOfMemoryError) as raised:
        memory.check_plan(plan, "fit-check", "cpu")
    message = str(raised.value)
    assert f"{plan.estimate.added / 2**30:.2f} GB" in message and "0.01 GB is free" in message
    for setting in ("gradient_checkpointing", "batch_size (now 4", "resolution", "rank", "memory_mode"):
        assert setting in message
    assert bridge.encoded_images == 0 and session.step == 0  # nothing was encoded or trained


def test_auto_that_cannot_fit_says_what_it_tried():
    session = make_session(bridge=CheckpointingBridge(), resolution=128, batch_size=2)
    plan = memory.plan_memory(session, lambda required: 1, "auto")
    assert not plan.fits and plan.changes["batch_size"] == 1
    tried = "even after auto chose gradient_checkpointing True, batch_size 1"
    with pytest.raises(memory.OutOfMemoryError, match=tried):
        memory.check_plan(plan, "auto", "cuda")


class RunsOutOfMemory(FakeBridge):
    def __init__(self, at_call: int, error: Exception):
        super().__init__()
        self.calls, self.at_call, self.error = 0, at_call, error

    def predict(self, *args):
        self.calls += 1
        if self.calls == self.at_call:
            raise self.error
        return super().predict(*args)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1")])
def test_out_of_memory_while_training_names_the_settings_and_keeps_the_last_step(tmp_path, error):
    session = make_session(tmp_path / "run", bridge=RunsOutOfMemory(3, error), steps=5, loss_every=1)
    with pytest.raises(memory.OutOfMemoryError) as raised, memory.explained_out_of_memory(session):
        session.run(NullHost())
    message = str(raised.value)
    assert "Out of memory at step 3/5" in message and str(session.last_checkpoint) in message
    for setting in ("gradient_checkpointing", "resolution", "rank"):
        assert setting in message
    assert raised.value.__cause__ is error
    assert load_state(session.last_checkpoint).step == 2  # the two completed steps are kept


def test_other_errors_pass_through_unchanged():
    session = make_session()
    with pytest.raises(ValueError, match="not memory"), memory.explained_out_of_memory(session):
        raise ValueError("not memory")


def test_on_a_cpu_small_blocks_weigh_more_than_large_ones():
    mb, freed = 2**20, memory.FREED
    small = memory.StepTrace(0, 0, [(0, 10 * mb), (1, 10 * mb), (0, freed), (2, 5 * mb)])
    large = memory.StepTrace(0, 0, [(0, 40 * mb), (0, freed), (1, 20 * mb)])
    assert memory.resident_step_peak(small) == int(20 * mb * memory.SMALL_BLOCK_FACTOR)
    assert memory.resident_step_peak(large) == int(40 * mb * memory.LARGE_BLOCK_FACTOR)


def test_optimizer_state_per_optimizer():
    linear, bias = torch.zeros(16, 320), torch.zeros(320)  # a LoRA down projection (5120 values); a small tensor
    assert memory.optimizer_state_bytes("adamw", [linear, bias]) == 2 * 4 * (5120 + 320)
    assert memory.optimizer_state_bytes("adamw8bit", [linear]) == 2 * 5120 + 2 * 4 * 20  # uint8 states + absmax
    assert memory.optimizer_state_bytes("adamw8bit", [bias]) == 2 * 4 * 320  # below bitsandbytes' 4096: fp32
    assert memory.optimizer_state_bytes("adafactor", [linear, bias]) == 4 * (16 + 320) + 4 * 320  # factored rows/cols
    assert memory.optimizer_state_bytes("lion", [linear]) == memory.optimizer_state_bytes("sgd", [linear]) == 4 * 5120
    assert memory.optimizer_state_bytes("prodigy", [linear]) == 4 * 4 * 5120
