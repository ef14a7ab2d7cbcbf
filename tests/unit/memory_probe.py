"""Run in a fresh process by test_memory.py: estimate a run's memory, then train it and measure what it added.

    python memory_probe.py '{"shape": "tiny"|"sd15", "resolution": 512, "batch": 2, "rank": 4, ...}'

Prints one JSON line: the estimate's parts and the peak RSS training added over the loaded model
(VmHWM after the steps minus VmRSS before the session was built). The estimate runs first, on fake tensors,
after one warm-up trace of its machinery, so its own imports are not counted as training's.
"""

import json
import re
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
if "tunekit" not in sys.modules:
    package = types.ModuleType("tunekit")
    package.__path__ = [str(REPO)]
    sys.modules["tunekit"] = package


def status_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def comfy_unet_bridge(settings: dict):
    """ComfyUI's own full-size SD1.5 UNet (random weights, built as CheckpointLoader builds it), behind a
    bridge that trains it the way nodes/bridge.py does: frozen aliases, the adapters' hooks, SDPA, the wide
    convolutions as matmuls."""
    sys.path.insert(0, str(REPO / "benchmarks" / "trainbench"))
    from contextlib import contextmanager

    import torch
    import worker_common as wc
    from fakes import FakeBridge
    from tunekit.trainer.conv_matmul import matmul_convolutions
    from tunekit.trainer.frozen import FrozenBase

    spec = {"family": "sd15", "comfy_dir": settings["comfy_dir"], "device": "cpu", "dtype": "fp32", "seed": 0}
    patcher = wc.build_comfy_model(spec)
    unet = patcher.model.diffusion_model
    attention = wc.import_comfy(spec).ldm.modules.attention

    class ComfyUNetBridge(FakeBridge):  # the fake's encoders; ComfyUI's denoiser
        def __init__(self):
            super().__init__()
            with torch.inference_mode():
                self.text_table = torch.randn(64, 768)
            self.denoiser = unet

        def unet_levels(self):
            return [2, 2, 2, 2]

        def predict(self, noisy, timesteps, prompts, sizes):
            context = torch.stack([p.context.repeat(77, 1)[:77] for p in prompts])
            sdpa = {"optimized_attention_override": lambda default, *a, **k: attention.attention_pytorch(*a, **k)}
            return unet(noisy, timesteps.float(), context=context, transformer_options=sdpa)

        @contextmanager
        def training(self, attach, detach):
            frozen = FrozenBase()
            frozen.apply(unet)
            attach()
            try:
                with matmul_convolutions(unet):
                    yield
            finally:
                detach()
                frozen.restore()

    return ComfyUNetBridge()


def main() -> None:
    settings = json.loads(sys.argv[1])
    import torch
    from fakes import FakeBridge
    from helpers import solid_images
    from tunekit.trainer import memory
    from tunekit.trainer.config import TrainConfig
    from tunekit.trainer.data import Dataset, TrainImage
    from tunekit.trainer.host import NullHost
    from tunekit.trainer.session import TrainSession

    torch.set_num_threads(settings.get("threads", torch.get_num_threads()))
    bridge = comfy_unet_bridge(settings) if settings["shape"] == "sd15" else FakeBridge()
    memory.trace_step(lambda: torch.ones(2, requires_grad=True).sum(), lambda loss: loss.backward())  # warm-up
    images = solid_images(settings["batch"], settings["resolution"])
    dataset = Dataset.from_images([TrainImage(f"image {i}", "tkred square", pixels) for i, pixels in enumerate(images)])
    config = TrainConfig(steps=settings["steps"], rank=settings["rank"], alpha=settings["rank"],
                         batch_size=settings["batch"], resolution=settings["resolution"], targets=settings["targets"],
                         optimizer=settings.get("optimizer", "adamw"), loss_every=1,
                         gradient_checkpointing=settings.get("checkpointing", False))
    loaded = status_mb("VmRSS")
    session = TrainSession(bridge, dataset, config)
    estimate = memory.estimate_memory(session)
    session.run(NullHost())
    result = {key: value / 2**20 for key, value in vars(estimate).items() if isinstance(value, int) and key.endswith(
        ("weights", "gradients", "state", "ema", "activations", "peak", "resident"))}
    result.update(estimate_added_mb=estimate.added / 2**20, measured_added_mb=status_mb("VmHWM") - loaded,
                  rss_loaded_mb=loaded, losses=session.losses)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
