"""Worker: a diffusers UNet2DConditionModel + PEFT LoRA loop, as diffusers' train_text_to_image_lora.py
(and train_text_to_image_lora_sdxl.py) trains: frozen UNet, `unet.add_adapter(LoraConfig(...))` with
gaussian init, AdamW on the LoRA parameters, DDPM noise, MSE on epsilon. No accelerate (one CPU/GPU
process, fp32 or autocast as the spec says), no gradient checkpointing (the script's default).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import worker_common as wc  # noqa: E402


def target_modules(unet, targets: str) -> list[str]:
    import torch

    if targets == "diffusers":
        return list(wc.DIFFUSERS_TARGETS)
    # ComfyUI's set: every Linear and Conv2d of the UNet, named exactly.
    return [name for name, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]


def main() -> None:
    spec, out = wc.load_spec()
    with wc.Result(spec, out, "diffusers_peft") as result:
        import diffusers
        import peft
        import torch
        import torch.nn.functional as F
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig

        torch.manual_seed(spec["seed"])
        device = torch.device(spec["device"])
        result["versions"] = {"diffusers": diffusers.__version__, "peft": peft.__version__, "torch": torch.__version__}
        latents, context, pooled = wc.make_inputs(spec)
        latents, context = latents.to(device), context.to(device)

        result.phase = "load"
        unet = UNet2DConditionModel(**wc.diffusers_unet_config(spec)).to(device)
        unet.requires_grad_(False)
        result["model_params"] = wc.count_params(unet)
        result["attention"] = sorted({type(p).__name__ for p in unet.attn_processors.values()})
        result["rss_loaded_mb"] = wc.rss_mb()
        wc.reset_peak_rss()

        result.phase = "setup"
        modules = target_modules(unet, spec["targets"])
        config = LoraConfig(r=spec["rank"], lora_alpha=spec["rank"], init_lora_weights="gaussian", target_modules=modules)
        unet.add_adapter(config)
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        result["adapted_layers"] = sum(1 for _, m in unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))
        result["trainable_params"] = sum(p.numel() for p in params)
        result["settings"] = {"targets": spec["targets"] if spec["targets"] == "diffusers" else "every Linear and Conv2d",
                              "rank": spec["rank"], "lora_alpha": spec["rank"], "init_lora_weights": "gaussian",
                              "optimizer": "AdamW", "dtype": spec["dtype"], "gradient_checkpointing": False,
                              "attention": result.data["attention"]}
        added = {}
        if pooled is not None:
            side = spec["resolution"]
            time_ids = torch.tensor([[side, side, 0, 0, side, side]] * spec["batch"], dtype=torch.float32)
            added = {"added_cond_kwargs": {"text_embeds": pooled.to(device), "time_ids": time_ids.to(device)}}
        generator = torch.Generator().manual_seed(spec["seed"])
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["dtype"] == "bf16")

        def step():
            noise = torch.randn(latents.shape, generator=generator).to(device)
            timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator).to(device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            with autocast:
                prediction = unet(noisy, timesteps, context, return_dict=False, **added)[0]
            loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return loss

        result.phase = "train"
        unet.train()
        stamps, losses = [wc.clocks()], []
        for _ in range(spec["warmup"] + spec["steps"]):
            losses.append(step().item())  # the script reads the loss every step (accelerator.gather(...).mean())
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(wc.clocks())
        result.data.update(wc.summarise_steps(stamps, spec["warmup"]))
        wc.memory_after_training(result)
        result["losses"] = losses

        result.phase = "flops"
        with wc.FlopCount() as flops:
            step()
        result["flops_per_step"] = flops.total
        result["flops_by_op"] = flops.by_op


if __name__ == "__main__":
    main()
