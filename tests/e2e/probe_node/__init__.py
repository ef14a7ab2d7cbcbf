"""Test-only custom node, linked into the test servers by tests/e2e/conftest.py (never shipped to users):
reports the process's global torch state, so a test can show that a TuneKit run leaves it as it found it.
Classic node API, which every ComfyUI version loads."""
import hashlib
import json

import torch


def global_torch_state() -> dict:
    state = {
        "default_dtype": str(torch.get_default_dtype()),
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "anomaly": torch.is_anomaly_enabled(),
        "cudnn": [torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.enabled],
        "tf32": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32],
        "autocast_cpu": torch.is_autocast_cpu_enabled() if hasattr(torch, "is_autocast_cpu_enabled") else None,
        "cpu_rng": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16],
    }
    if hasattr(torch, "get_default_device"):
        state["default_device"] = str(torch.get_default_device())
    return state


class TestProbeTorchState:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tag": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "probe"
    CATEGORY = "testing"

    def probe(self, tag):
        return {"ui": {"text": [json.dumps(global_torch_state())]}}


NODE_CLASS_MAPPINGS = {"TestProbeTorchState": TestProbeTorchState}
