"""Worker: TuneKit's real TrainSession through the real ComfyModelBridge on ComfyUI's own UNet.

The model is built by ComfyUI's classes under torch.inference_mode() (as CheckpointLoader loads it),
wrapped in a ModelPatcher, and trained the way the Train LoRA node does: TrainSession.prepare/run
called under inference mode. Only the VAE and text encoder are stood in for: the bridge's
encode_images / encode_prompts return the benchmark's shared latents and conditioning.
"""

import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import worker_common as wc  # noqa: E402


def bench_bridge_class():
    from tunekit.nodes.bridge import ComfyModelBridge
    from tunekit.trainer.host import PromptEmbedding

    class BenchBridge(ComfyModelBridge):
        """The real bridge (predict, training injection, FrozenBase); images and captions map to the
        benchmark's fixed inputs: image i is a solid grey of value 10 * (i + 1), caption 'image i'."""

        def __init__(self, patcher, latents, context, pooled):
            super().__init__(patcher, clip=types.SimpleNamespace(tokenizer=None), vae=None)  # captions: below
            self.latents, self.context, self.pooled = latents, context, pooled

        def encode_images(self, pixels):
            indices = (pixels[:, 0, 0, 0] * 255 / 10).round().long() - 1
            return self.latents[indices]

        def vae_identity(self):
            return "benchmark-latents"

        def encode_prompts(self, captions):
            out = []
            for caption in captions:
                i = int(caption.split()[-1])
                pooled = self.pooled[i] if self.pooled is not None else None
                out.append(PromptEmbedding(self.context[i], pooled))
            return out

    return BenchBridge


class TimingHost:
    def __init__(self):
        self.stamps, self.losses = [], []

    def emit(self, event):
        from tunekit.trainer.events import StepDone

        if isinstance(event, StepDone):
            self.stamps.append(wc.clocks())
            self.losses.append(event.loss)

    def should_stop(self):
        return False


def main() -> None:
    spec, out = wc.load_spec()
    with wc.Result(spec, out, "tunekit") as result:
        import numpy as np
        import torch

        torch.manual_seed(spec["seed"])
        wc.import_comfy(spec)
        wc.import_tunekit()
        from tunekit.trainer.config import TrainConfig
        from tunekit.trainer.data import Dataset, TrainImage
        from tunekit.trainer.session import TrainSession

        from tunekit.nodes.bridge import training_attention

        result["comfy_attention"] = wc.comfy_attention_name()
        if training_attention():  # the bridge trains with SDPA where ComfyUI only fell back to sub-quadratic
            result["comfy_attention"] = f"attention_pytorch (bridge override of {result.data['comfy_attention']})"
        latents, context, pooled = wc.make_inputs(spec)
        from tunekit.trainer import memory

        # The estimate's own machinery (torch's fake tensors) loaded before the baseline: not training's memory.
        memory.trace_step(lambda: torch.ones(2, requires_grad=True).sum(), lambda loss: loss.backward())
        result.phase = "load"
        patcher = wc.build_comfy_model(spec)
        result["model_params"] = wc.count_params(patcher.model.diffusion_model)
        result["rss_loaded_mb"] = wc.rss_mb()
        wc.reset_peak_rss()

        result.phase = "setup"
        side = spec["resolution"]
        images = [
            TrainImage(f"image {i}", f"image {i}", np.full((side, side, 3), 10 * (i + 1), dtype=np.uint8))
            for i in range(spec["batch"])
        ]
        config = TrainConfig(
            steps=spec["warmup"] + spec["steps"], learning_rate=1e-4, rank=spec["rank"], alpha=spec["rank"],
            batch_size=spec["batch"], resolution=side, seed=spec["seed"], targets=spec["tunekit_preset"],
        )
        bridge = bench_bridge_class()(patcher, latents, context, pooled)
        host = TimingHost()
        # ComfyUI runs every node under inference mode; the Train LoRA node builds and runs the session there.
        with torch.inference_mode():
            session = TrainSession(bridge, Dataset.from_images(images), config)
            session.prepare(host)
        estimate = memory.estimate_memory(session)  # what the Train LoRA node checks before training
        result["memory_estimate"] = {key: value / 2**20 for key, value in vars(estimate).items()
                                     if isinstance(value, int) and key not in ("batch_size", "gradient_accumulation_steps")}
        result["estimate_added_mb"] = estimate.added / 2**20
        result["adapted_layers"] = len(session.network.branches)
        result["trainable_params"] = sum(p.numel() for p in session.network.parameters())
        result["settings"] = {
            "preset": spec["tunekit_preset"], "rank": config.rank, "alpha": config.alpha,
            "optimizer": "AdamW, " + ("fused" if session.optimizer.defaults.get("fused") else "foreach"),
            "dtype": spec["dtype"], "gradient_checkpointing": False, "attention": result.data["comfy_attention"],
        }

        result.phase = "train"
        host.stamps.append(wc.clocks())
        with torch.inference_mode():
            session.run(host)
        result.data.update(wc.summarise_steps(host.stamps, spec["warmup"]))
        wc.memory_after_training(result)
        result["losses"] = host.losses

        result.phase = "flops"
        session.config.steps += 1
        with wc.FlopCount() as flops, torch.inference_mode():
            session.run(host)
        result["flops_per_step"] = flops.total
        result["flops_by_op"] = flops.by_op


if __name__ == "__main__":
    main()
