"""Adapters trained beside the host's frozen weights (side branches, never merged weights)."""

from .lora import LoRABranch
from .network import AdapterNetwork, select_targets, TARGET_PRESETS

__all__ = ["LoRABranch", "AdapterNetwork", "select_targets", "TARGET_PRESETS"]
