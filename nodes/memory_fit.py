"""Fits, or says so before it starts: the core's memory estimate against what ComfyUI can free on the device."""

import logging

import comfy.model_management

from ..trainer import memory

log = logging.getLogger("tunekit")


def fit_session(session, rebuild):
    """Check (and with memory_mode 'auto', adapt) `session` before any training work. `rebuild(config)`
    makes the session again with changed settings. Returns the session to run and the plan's summary
    (None where memory_mode is 'off' or the model could not be traced)."""
    config = session.config
    mode = getattr(config, "memory_mode", "auto")
    if mode == "off":
        return session, None
    try:
        plan = memory.plan_memory(session, free_bytes_for(session.bridge, trained_bytes(session)), mode)
    except Exception:  # an estimate that cannot be made must never stop a run that might fit
        log.warning("TuneKit could not estimate this run's memory; training without a fit check.", exc_info=True)
        return session, None
    memory.check_plan(plan, mode, session.bridge.device.type)
    summary = plan.describe()
    log.info("TuneKit: %s", summary)
    if plan.changes:
        session = rebuild(memory.with_changes(config, plan.changes))
    return session, summary


def free_bytes_for(bridge, already_held: int = 0):
    """free(needed) -> bytes free for training once ComfyUI has unloaded what it can (its own
    free_memory), less the weights this model still has to load onto the device, plus `already_held`:
    what the run allocated before the check and the estimate counts again."""
    device = bridge.device

    def free(needed: int) -> int:
        mm = comfy.model_management
        mm.free_memory(max(0, needed - already_held) + _weights_to_load(bridge), device)
        available = mm.get_free_memory(device) - _weights_to_load(bridge)
        if device.type != "cpu":
            available -= mm.extra_reserved_memory()
        return max(0, available) + already_held

    return free


def trained_bytes(session) -> int:
    """The trained weights: built with the session (a full fine-tune's copy is most of it), before the check."""
    return memory.tensor_bytes(p for group in session.optimizer.param_groups for p in group["params"])


def _weights_to_load(bridge) -> int:
    patcher = getattr(bridge, "patcher", None)
    if bridge.device.type == "cpu" or patcher is None:
        return 0  # on the CPU the model already sits in the RAM that get_free_memory leaves out
    return max(0, patcher.model_size() - patcher.loaded_size())


def out_of_memory_types() -> tuple:
    """ComfyUI's OOM exception where it names one (CUDA's; plain Exception elsewhere, too broad to use)."""
    oom = comfy.model_management.OOM_EXCEPTION
    return () if oom is Exception else (oom,)
