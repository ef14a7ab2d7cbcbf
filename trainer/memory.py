"""How much memory a run adds, before it starts; settings that make it fit; what to say when it does not.

The estimate is counted, not modelled: one training step (forward and backward through the host's real
model, with the run's adapters, attention, precision and checkpointing) runs under torch's FakeTensorMode,
where every tensor has a shape and a dtype but no data. A dispatch-mode counter adds up the bytes of every
storage an operation creates and subtracts them when it is freed: its peak is what the step holds at once
(activations saved for backward, plus the backward's transients and the adapters' gradients). That costs a
few seconds of Python on a full-size UNet, whatever the resolution and batch, and needs no per-layer table
that a new architecture or attention kernel would silently break. Optimizer state is counted from the
trained parameters' shapes (each optimizer's own state layout), adapter weights and the EMA copy from
their bytes. The frozen base the host already holds is reported apart: training does not add it.

On a CPU the process's resident memory is more than the tensors' bytes (the C heap keeps freed blocks): the
traced step's blocks are weighted by size class with factors measured on full-size and tiny UNets (below).
On a GPU the estimate is the tensors' bytes (not yet measured against one).
"""

import dataclasses
import inspect
import logging
import math
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .errors import TuneKitError
from .host import PromptEmbedding, SizeInfo

log = logging.getLogger(__name__)
MB = 2**20
GB = 2**30
LATENT_FACTOR = 8  # pixels per latent cell (every SD VAE)
# bitsandbytes' 8-bit optimizers: tensors below this size keep fp32 state; quantile blocks of 256 values.
BNB_MIN_8BIT_SIZE, BNB_BLOCK = 4096, 256


class OutOfMemoryError(TuneKitError):
    """The run does not fit (estimated before it starts, or met while training)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes, for one configuration of a run."""

    base_weights: int  # the frozen model the host already holds: not added by training
    adapter_weights: int
    gradients: int  # of the trained weights (inside `step_peak`; apart where they outlive a micro-batch)
    optimizer_state: int
    ema: int
    activations: int  # live after the forward: what autograd saved for backward
    step_peak: int  # most bytes one forward + backward holds at once (activations, transients, gradients)
    batch_size: int
    resolution: tuple[int, int]  # (width, height) of the largest batch's bucket
    gradient_checkpointing: bool
    gradient_accumulation_steps: int = 1
    resident: int = 0  # CPU: resident bytes (the heap's overhead and the runtime's included); 0 elsewhere

    @property
    def live(self) -> int:
        """The most bytes of tensors training holds at once."""
        kept_gradients = self.gradients if self.gradient_accumulation_steps > 1 else 0
        return self.adapter_weights + self.optimizer_state + self.ema + kept_gradients + self.step_peak

    @property
    def added(self) -> int:
        """What training adds over the loaded model at its peak (on the CPU: resident memory)."""
        return max(self.live, self.resident)

    def describe(self) -> str:
        width, height = self.resolution
        ema = f", EMA {_gb(self.ema)}" if self.ema else ""
        resident = f", {_gb(self.resident)} resident on the CPU" if self.resident else ""
        return (f"{_gb(self.added)} added at batch_size {self.batch_size}, {width}x{height} px, gradient "
                f"checkpointing {'on' if self.gradient_checkpointing else 'off'} (activations and backward "
                f"{_gb(self.step_peak)}, adapter weights {_gb(self.adapter_weights)}, optimizer state "
                f"{_gb(self.optimizer_state)}{ema}{resident}; the loaded model's {_gb(self.base_weights)} not counted)")


@dataclass(frozen=True)
class MemoryPlan:
    """What a run will use: the estimate of the chosen settings, and the settings changed to fit."""

    estimate: MemoryEstimate
    free: int
    changes: dict  # setting -> new value; empty when the run fits as configured
    fits: bool

    def describe(self) -> str:
        if not self.changes:
            return f"Memory: {self.estimate.describe()}; {_gb(self.free)} free."
        chosen = ", ".join(f"{key} {value}" for key, value in self.changes.items())
        return f"Memory (auto): chose {chosen} to fit {_gb(self.free)} free: {self.estimate.describe()}."


# ----- counting -----
FREED = -1


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages operations create, while they live; `peak` is the most at once. `events` keeps
    the order: (token, bytes) for each new storage, (token, FREED) when it is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.events: list[tuple[int, int]] = []
        self._tokens: dict[int, tuple[int, int]] = {}  # storage handle -> (token, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results (the schema says they alias an input) hold no new bytes; so the host's
        # weights, first met as `weight.t()`, are not counted as training's.
        if any(result.alias_info is not None for result in func._schema.returns):
            return out
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage())
        return out

    def _count(self, storage) -> None:
        handle = storage._cdata
        if handle in self._tokens:
            return
        token, size = len(self.events), storage.nbytes()
        self._tokens[handle] = (token, size)
        self.events.append((token, size))
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, handle)

    def _free(self, handle: int) -> None:
        token, size = self._tokens.pop(handle, (None, 0))
        if token is not None:
            self.live -= size
            self.events.append((token, FREED))


@dataclass(frozen=True)
class StepTrace:
    after_forward: int  # bytes live after the forward: what autograd saved
    peak: int  # most bytes live at once through the backward
    events: list  # LiveBytes.events


def trace_step(forward, backward) -> StepTrace:
    """Run `backward(forward())` on fake tensors, counting: real parameters are read as shapes only,
    nothing is computed or allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), LiveBytes() as live:
        loss = forward()
        after_forward = live.live
        backward(loss)
        del loss
    return StepTrace(after_forward, live.peak, list(live.events))  # a copy: freeing the gradients appends


# ----- the C heap: what the process's RSS does with those allocations (CPU) -----
# glibc keeps freed heap blocks resident and a later, larger block cannot always reuse a smaller hole, so a
# CPU process holds more than its live tensors. Measured on this project's 2-core machine (glibc 2.36,
# torch 2.13, fresh process, peak RSS minus RSS with the model loaded, 2 steps): ComfyUI's full-size SD1.5
# UNet at 256 px, whose step allocates blocks of at most ~10 MB, held 1.44-1.46x its traced step bytes
# (targets attention and all; 1.67-1.70x before the wide convolutions ran as matmuls, when oneDNN's weight
# reorders added scratch buffers), SDXL's (benchmark depth 2) 1.58x; the tiny test UNet at 384 px, whose
# step is dominated by 21 MB attention matrices, 1.11x; at 512 px (64 MB matrices, mapped and unmapped on
# their own) 1.07x. A best-fit model of the heap gave only 1.1-1.2x for SD1.5: glibc's binning fragments
# more than it predicts. So: small blocks count 1.6x (over every measurement, as a fit check should err),
# large ones 1.1x.
SMALL_BLOCK = 16 * MB
SMALL_BLOCK_FACTOR, LARGE_BLOCK_FACTOR = 1.6, 1.1
# What the first training steps add besides tensors on a CPU (autograd's and the kernels' threads, code, caches):
# a 64 px step of the unit tests' tiny model added 36 MB of RSS for 0.5 MB of tensors.
CPU_RUNTIME = 40 * MB


def resident_step_peak(trace: StepTrace) -> int:
    """The traced step's peak as resident bytes on a CPU: each live block weighted by its size class."""
    sizes, weighted, peak = {}, 0.0, 0.0
    for token, size in trace.events:
        if size == FREED:
            weighted -= sizes.pop(token)
            continue
        sizes[token] = size * (SMALL_BLOCK_FACTOR if size < SMALL_BLOCK else LARGE_BLOCK_FACTOR)
        weighted += sizes[token]
        peak = max(peak, weighted)
    return int(peak)


# ----- the parts counted from shapes -----
def optimizer_state_bytes(optimizer: str, parameters: list[torch.Tensor]) -> int:
    """The state each optimizer keeps per trained tensor (trainer/optim.py builds them)."""
    return sum(sum(state_tensors(optimizer, p)) for p in parameters)


def state_tensors(optimizer: str, parameter: torch.Tensor) -> list[int]:
    """Bytes of each state tensor `optimizer` keeps for `parameter`."""
    numel, size = parameter.numel(), parameter.element_size()
    if optimizer == "adamw8bit":
        if numel < BNB_MIN_8BIT_SIZE:
            return [numel * 4] * 2
        return [numel, numel, 4 * math.ceil(numel / BNB_BLOCK), 4 * math.ceil(numel / BNB_BLOCK)]  # uint8 + absmax
    if optimizer == "adafactor":  # transformers' Adafactor without a first moment (beta1=None)
        shape = parameter.shape
        if len(shape) < 2:
            return [numel * size]
        return [math.prod(shape[:-1]) * size, math.prod(shape[:-2]) * shape[-1] * size]  # factored second moment
    states = {"adamw": 2, "lion": 1, "sgd": 1, "prodigy": 4, "schedule_free_adamw": 2}.get(optimizer, 2)
    return [numel * size] * states


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ----- the estimate of a session -----
def estimate_memory(session, batch_size: int | None = None, gradient_checkpointing: bool | None = None,
                    gradient_accumulation_steps: int | None = None) -> MemoryEstimate:
    """What `session` would add at its settings, or at the ones given (the adapters it built stay the same)."""
    config = session.config
    batch_size = batch_size or config.batch_size
    checkpointing = config.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    width, height, batch = largest_batch(session.plan, config.resolution, batch_size)
    trained = [p for group in session.optimizer.param_groups for p in group["params"]]
    trace = _trace_session_step(session, batch, (width, height), checkpointing)
    ema = [p for p in trained] if getattr(session, "ema", None) else []
    optimizer_state = optimizer_state_bytes(config.optimizer, trained)
    resident = 0
    if session.bridge.device.type == "cpu":
        resident = tensor_bytes(trained + ema) + optimizer_state + resident_step_peak(trace) + CPU_RUNTIME
    return MemoryEstimate(
        base_weights=tensor_bytes(m.weight for m in _denoiser_weights(session.bridge)),
        adapter_weights=tensor_bytes(trained),
        gradients=tensor_bytes(trained),
        optimizer_state=optimizer_state,
        ema=tensor_bytes(ema),
        activations=trace.after_forward,
        step_peak=trace.peak,
        batch_size=batch,
        resolution=(width, height),
        gradient_checkpointing=checkpointing,
        gradient_accumulation_steps=gradient_accumulation_steps or config.gradient_accumulation_steps,
        resident=resident,
    )


def largest_batch(plan, resolution: int, batch_size: int) -> tuple[int, int, int]:
    """(width, height, images) of the batch with the most pixels the plan will draw."""
    counts = plan.bucket_counts() if plan is not None else {}
    candidates = [(w * h * min(batch_size, n), w, h, min(batch_size, n)) for (w, h), n in counts.items()]
    if not candidates:
        return resolution, resolution, batch_size
    _, width, height, images = max(candidates)
    return width, height, images


def _denoiser_weights(bridge):
    seen = set()
    for module in bridge.denoiser_modules().values():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and id(weight) not in seen:
            seen.add(id(weight))
            yield module


def _trace_session_step(session, batch: int, size: tuple[int, int], checkpointing: bool) -> StepTrace:
    """One step of the session's model on a synthetic batch of `size`, counted on fake tensors."""
    bridge, network = session.bridge, session.network
    with torch.inference_mode(False), torch.no_grad():
        # Real: the text encoders' output shapes (one caption of the run; cheap beside a step).
        prompt = bridge.encode_prompts([session.dataset.images[0].caption])[0]
    width, height = size
    channels = getattr(bridge.family, "latent_channels", 4)
    latent_shape = (batch, channels, height // LATENT_FACTOR, width // LATENT_FACTOR)
    sizes = [SizeInfo((height, width), (0, 0), (height, width))] * batch
    precision = getattr(session, "precision", None)
    autocast = precision.autocast if precision is not None else nullcontext
    options = {"gradient_checkpointing": True} if checkpointing else {}
    text_trains = getattr(getattr(session, "feed", None), "text_trains", False)
    if text_trains:
        options["text"] = True  # as the session trains: each clone attaches its own branches

    def forward():
        noisy = torch.randn(latent_shape, device=bridge.device)
        timesteps = torch.full((batch,), 500, device=bridge.device)
        # A training text encoder (or embedding) gets the gradient of the captions' context: backward computes it.
        prompts = [_needing_grad(prompt) if text_trains else prompt] * batch
        with autocast():
            prediction = bridge.predict(noisy, timesteps, prompts, sizes)
        return prediction.float().square().mean()

    try:
        training = bridge.training(network.attach, network.detach, **options)
        with torch.inference_mode(False), torch.enable_grad(), training:
            held = _text_encoder_saved(bridge, [session.dataset.images[0].caption] * batch) if text_trains else 0
            return _with_held(trace_step(forward, lambda loss: loss.backward()), held)
    finally:
        for parameter in network.parameters():
            parameter.grad = None  # fake gradients must not reach the real optimizer


def _needing_grad(prompt: PromptEmbedding) -> PromptEmbedding:
    pooled = prompt.pooled.detach().requires_grad_() if prompt.pooled is not None else None
    return PromptEmbedding(prompt.context.detach().requires_grad_(), pooled)


def _text_encoder_saved(bridge, captions: list[str]) -> int:
    """Bytes a training text encoder keeps for backward over one batch (its saved activations, and the weights
    it casts to the compute dtype): they stay live through the UNet's forward and backward. Counted on real
    tensors (the text side is small beside the UNet)."""
    with LiveBytes() as live:
        prompts = bridge.encode_prompts(captions)
        held = live.live  # before the prompts are freed: what the step holds while they feed it
    del prompts
    return held


def _with_held(trace: StepTrace, held: int) -> StepTrace:
    """`trace` with `held` more bytes live from its start to its end: one block, since blocks held that long
    leave no holes in the heap (the churn of the step's own blocks does)."""
    return StepTrace(trace.after_forward + held, trace.peak + held, [(-1, held), *trace.events])


# ----- fitting -----
def plan_memory(session, free_for, mode: str) -> MemoryPlan:
    """The estimate at the session's settings against `free_for(bytes needed)`, the bytes free once the host
    made what room it can. With `auto`, where it does not fit: gradient checkpointing first, then halving
    batch_size while raising gradient_accumulation_steps so the images per optimizer step stay the same."""
    config = session.config
    estimate = estimate_memory(session)
    free = free_for(estimate.added)
    if estimate.added <= free or mode != "auto":
        return MemoryPlan(estimate, free, {}, estimate.added <= free)
    changes, batch, accumulation = {}, config.batch_size, config.gradient_accumulation_steps
    if not config.gradient_checkpointing and supports_checkpointing(session.bridge):
        changes["gradient_checkpointing"] = True
        estimate = estimate_memory(session, gradient_checkpointing=True)
    checkpointing = changes.get("gradient_checkpointing", config.gradient_checkpointing)
    while estimate.added > free and batch > 1:
        batch = (batch + 1) // 2
        accumulation = math.ceil(config.batch_size * config.gradient_accumulation_steps / batch)
        changes.update(batch_size=batch, gradient_accumulation_steps=accumulation)
        estimate = estimate_memory(session, batch, checkpointing, accumulation)
    return MemoryPlan(estimate, free, changes, estimate.added <= free)


def supports_checkpointing(bridge) -> bool:
    return "gradient_checkpointing" in inspect.signature(bridge.training).parameters


def check_plan(plan: MemoryPlan, mode: str, device: str) -> None:
    """Stops a run that will not fit, before any work, saying what to lower."""
    if plan.fits:
        return
    estimate = plan.estimate
    tried = " even after auto chose " + ", ".join(f"{k} {v}" for k, v in plan.changes.items()) if plan.changes else ""
    advice = lower_settings_advice(estimate.batch_size, estimate.gradient_checkpointing)
    if mode != "auto":
        advice += "; or set memory_mode to 'auto' to let TuneKit choose checkpointing and batch size"
    raise OutOfMemoryError(
        f"This run needs about {_gb(estimate.added)} of {device} memory on top of the loaded model, but "
        f"{_gb(plan.free)} is free{tried}. Estimate: {estimate.describe()}. To fit: {advice}.")


def lower_settings_advice(batch_size: int, gradient_checkpointing: bool) -> str:
    steps = []
    if batch_size > 1:
        steps.append(f"lower batch_size (now {batch_size}; raise gradient_accumulation_steps to keep the images "
                     f"per step)")
    steps.append("lower resolution")
    steps.append("lower rank (or train fewer layers: targets 'attention')")
    if not gradient_checkpointing:
        steps.insert(0, "turn gradient_checkpointing on")
    return ", ".join(steps)


@contextmanager
def explained_out_of_memory(session, host_types: tuple = ()):
    """Turn an out-of-memory error met while training into one that names the settings to lower and the
    state kept (the session saves the last completed step on any error). `host_types`: the host's own
    out-of-memory exception classes (ComfyUI's OOM_EXCEPTION)."""
    try:
        yield
    except Exception as error:
        if not (isinstance(error, host_types) or is_out_of_memory(error)):
            raise
        message = out_of_memory_message(session.config, session.step, session.last_checkpoint)
        raise OutOfMemoryError(message) from error


def out_of_memory_message(config, step: int, checkpoint) -> str:
    """For an out-of-memory error met while training."""
    kept = f"The last saved state ({checkpoint}) is kept. " if checkpoint else ""
    return (f"Out of memory at step {step + 1}/{config.steps}. {kept}To fit: "
            f"{lower_settings_advice(config.batch_size, config.gradient_checkpointing)}, and close other models "
            f"or programs that use the device.")


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                                or "not enough memory" in text)


def with_changes(config, changes: dict):
    return dataclasses.replace(config, **changes) if changes else config


def common_settings(configs: list):
    """One set of settings for the processes of a data-parallel run, whose 'auto' fits may differ (GPUs with
    different free memory): the smallest batch with its accumulation steps, and gradient checkpointing where
    any process needs it. Every process must train as many micro-steps, or the gradient averaging waits forever."""
    smallest = min(configs, key=lambda config: config.batch_size)
    return dataclasses.replace(smallest, gradient_checkpointing=any(config.gradient_checkpointing for config in configs))


def _gb(value: int) -> str:
    return f"{value / GB:.2f} GB"
