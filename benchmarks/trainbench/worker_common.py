"""What every benchmark worker shares: the spec it is given, the inputs, the model shapes, and the
measurements (step times, RSS, FLOPs), so the three tools are measured the same way.

A worker runs in its own fresh process (`python benchmarks/trainbench/run_<tool>.py SPEC OUT`) and
writes one JSON result. Nothing here imports ComfyUI or diffusers at module level.
"""

import json
import os
import re
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# ComfyUI's unet_config for each family (what comfy.model_detection finds in the real checkpoints).
COMFY_UNET = {
    "sd15": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # popped from the end
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
    "sdxl": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64, "num_heads": -1,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
}
# The same architectures as diffusers configs (UNet2DConditionModel).
DIFFUSERS_UNET = {
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
CONTEXT = {"sd15": (77, 768), "sdxl": (77, 2048)}
POOLED = {"sdxl": 1280}
# diffusers' LoRA examples (train_text_to_image_lora.py) target these.
DIFFUSERS_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def comfy_unet_config(spec: dict) -> dict:
    """The family's config. For SDXL `sdxl_depth` replaces the 10-block transformers of the deepest
    level; `channels` (smoke runs only) replaces the 320 base channels."""
    family, depth, channels = spec["family"], spec.get("sdxl_depth"), spec.get("channels")
    config = json.loads(json.dumps(COMFY_UNET[family]))
    if family == "sdxl" and depth is not None:
        config["transformer_depth"] = [0, 0, 2, 2, depth, depth]
        config["transformer_depth_output"] = [0, 0, 0, 2, 2, 2, depth, depth, depth]
        config["transformer_depth_middle"] = depth
    if channels:
        config["model_channels"] = channels
    return config


def diffusers_unet_config(spec: dict) -> dict:
    family, depth, channels = spec["family"], spec.get("sdxl_depth"), spec.get("channels")
    config = dict(DIFFUSERS_UNET[family])
    if family == "sdxl" and depth is not None:
        config["transformer_layers_per_block"] = (1, 2, depth)
    if channels:
        mult = [c // 320 for c in config["block_out_channels"]]
        config["block_out_channels"] = tuple(channels * m for m in mult)
        if family == "sdxl":  # SDXL's attention_head_dim is the head count at 64 channels per head
            config["attention_head_dim"] = tuple(channels * m // 64 for m in mult)
    return config


# ------------------------------------------------------------------------------------------------
# The spec and the shared inputs
# ------------------------------------------------------------------------------------------------

def load_spec() -> tuple[dict, Path]:
    spec_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    return json.loads(spec_path.read_text()), out_path


def make_inputs(spec: dict):
    """The same latents and text conditioning for every tool, from the spec's seed."""
    import torch

    generator = torch.Generator().manual_seed(spec["seed"])
    side = spec["resolution"] // 8
    batch = spec["batch"]
    latents = torch.randn(batch, 4, side, side, generator=generator)
    tokens, width = CONTEXT[spec["family"]]
    context = torch.randn(batch, tokens, width, generator=generator)
    pooled = None
    if spec["family"] in POOLED:
        pooled = torch.randn(batch, POOLED[spec["family"]], generator=generator)
    return latents, context, pooled


def init_random_(module, seed: int) -> None:
    """Fill every parameter in place (no second copy): N(0, 1/fan_in) weights, small biases, unit norms.

    ComfyUI builds its modules without initialising them (uninitialised memory); a checkpoint load
    then writes every tensor in place, which this stands in for."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim >= 2:
                fan_in = parameter[0].numel()
                parameter.normal_(0.0, fan_in ** -0.5, generator=generator)
            elif re.search(r"norm|in_layers\.0|out_layers\.0|\.out\.0|emb_layers\.0", name) and name.endswith("weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.01, generator=generator)


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------

def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024


def rss_mb() -> float:
    return _status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS (and the peak
    VRAM where a GPU is in use)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def memory_after_training(result) -> None:
    result["peak_rss_train_mb"] = peak_rss_mb()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        result["peak_vram_train_mb"] = torch.cuda.max_memory_allocated() / 2**20


# ------------------------------------------------------------------------------------------------
# Time, FLOPs, results
# ------------------------------------------------------------------------------------------------

def summarise_steps(stamps: list[tuple[float, float]], warmup: int) -> dict:
    """`stamps`: (wall, process CPU) clock readings before the first step and after each step.

    CPU seconds (every thread of the process) are what a step costs regardless of what else runs on a
    shared machine; with one thread they equal the wall time of an idle machine."""
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    timed, timed_cpu = wall[warmup:], cpu[warmup:]
    return {
        "step_seconds": wall,
        "step_cpu_seconds": cpu,
        "warmup_steps": warmup,
        "median_s_per_step": statistics.median(timed) if timed else None,
        "min_s_per_step": min(timed) if timed else None,
        "median_cpu_s_per_step": statistics.median(timed_cpu) if timed_cpu else None,
    }


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class FlopCount:
    """torch.utils.flop_counter over one step: what the step executes (matmuls, convs, attention)."""

    def __enter__(self):
        import torch
        from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

        # torch's table misses the CPU kernels of scaled_dot_product_attention (diffusers' attention on a
        # CPU, ComfyUI's with --use-pytorch-cross-attention): count them like the GPU kernels.
        aten = torch.ops.aten
        cpu_sdpa = {
            aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
                lambda g, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(g, q, k, v),
        }
        self.mode = FlopCounterMode(display=False, custom_mapping=cpu_sdpa)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.total = self.mode.get_total_flops()
        self.by_op = {str(op): int(n) for op, n in self.mode.get_flop_counts().get("Global", {}).items()}
        return False


def is_oom(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, MemoryError) or "not enough memory" in text or "can't allocate" in text \
        or "out of memory" in text


class Result:
    """Collects one worker's numbers and writes them, also when the worker fails or runs out of memory."""

    def __init__(self, spec: dict, out: Path, tool: str):
        self.out, self.data = out, {"tool": tool, "targets": spec["targets"], "status": "ok",
                                     "loadavg_start": os.getloadavg()}
        self.data["rss_start_mb"] = rss_mb()
        self.phase = "start"

    def __setitem__(self, key, value):
        self.data[key] = value

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is not None:
            self.data["status"] = "oom" if is_oom(error) else "error"
            self.data["phase"] = self.phase
            self.data["error"] = f"{type(error).__name__}: {str(error)[:500]}"
            self.data["traceback"] = traceback.format_exception(kind, error, tb)[-6:]
        self.data["loadavg_end"] = os.getloadavg()
        self.data["peak_rss_process_mb"] = _status_mb("VmHWM")
        self.data["vm_peak_mb"] = _status_mb("VmPeak")
        self.out.write_text(json.dumps(self.data, indent=1, default=str))
        return error is not None and not isinstance(error, KeyboardInterrupt)


# ------------------------------------------------------------------------------------------------
# ComfyUI and TuneKit imports
# ------------------------------------------------------------------------------------------------

def import_comfy(spec: dict):
    """ComfyUI from the host tree, configured as `main.py --cpu` (plus the spec's attention choice)."""
    comfy_dir = spec["comfy_dir"]
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    args = comfy.cli_args.args
    args.cpu = spec["device"] == "cpu"
    if spec.get("comfy_attention") == "pytorch":
        args.use_pytorch_cross_attention = True
    import comfy.ldm.modules.attention
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    return sys.modules["comfy"]


def comfy_attention_name() -> str:
    import comfy.ldm.modules.attention as attention

    return attention.optimized_attention.__name__


def build_comfy_model(spec: dict):
    """ComfyUI's own model for the family, built the way CheckpointLoader does (inference mode, the
    loader's device and dtype), random weights written in place. Returns a ModelPatcher."""
    import torch

    with torch.inference_mode():
        return _built_comfy_model(spec)


def _built_comfy_model(spec: dict, disable_dynamic: bool = False):
    """build_comfy_model's work in the caller's grad mode. Newer ComfyUI records how its loader made a model
    (cached_patcher_init) and clone(force_deepcopy=True), as 0.30.0's TrainLoraNode calls it, loads it
    again through that, as from the checkpoint file (the node does so outside inference mode): here, the
    same build (never a dynamic patcher, whatever `disable_dynamic` asks)."""
    import torch

    comfy = import_comfy(spec)
    family = spec["family"]
    config_class = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[family]
    model_config = config_class(comfy_unet_config(spec))
    load_device = comfy.model_management.get_torch_device()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["dtype"]]
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "", device=comfy.model_management.unet_inital_load_device(0, dtype))
    init_random_(model.diffusion_model, spec["seed"])
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=load_device, offload_device=comfy.model_management.unet_offload_device()
    )
    if hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = (_built_comfy_model, (spec,))
    return patcher


def import_tunekit():
    """The checkout as the package `tunekit` without running its ComfyUI entry point (as tests/conftest.py)."""
    if "tunekit" not in sys.modules:
        package = types.ModuleType("tunekit")
        package.__path__ = [str(REPO)]
        sys.modules["tunekit"] = package
    return sys.modules["tunekit"]


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def now() -> float:
    return time.perf_counter()


def log_line(text: str) -> None:
    print(text, flush=True)
