"""Adapters trained beside the host's frozen weights (side branches, never merged weights)."""

from .algorithms import ALGORITHMS, Algorithm
from .base import AdapterBranch
from .lora import LoRABranch
from .network import AdapterNetwork, NetworkSettings, select_targets, TARGET_PRESETS

__all__ = ["ALGORITHMS", "Algorithm", "AdapterBranch", "LoRABranch", "AdapterNetwork", "NetworkSettings",
           "select_targets", "TARGET_PRESETS"]
