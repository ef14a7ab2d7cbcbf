"""Where TuneKit's step goes, on ComfyUI's own UNet: the same model timed piece by piece in one process.

    python benchmarks/trainbench/breakdown.py SPEC.json OUT.json   (train_step.py --breakdown writes the spec)

Variants, each timed `repeats` times (min and median kept), with its FLOPs counted:
  forward            the UNet forward, no autograd (what sampling costs)
  frozen_fwd_bwd     forward + backward to the input through the frozen aliases, no LoRA: the seam's floor
  lora_<preset>      TuneKit's step: FrozenBase + AdapterNetwork hooks, wide low-resolution convolutions as
                     matmuls (trainer/conv_matmul.py), MSE, backward, AdamW
and the same under SDPA attention when ComfyUI's default is another one (CPU: sub-quadratic). A
torch.profiler table of the `lora_all` step is written too.
"""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import worker_common as wc  # noqa: E402


def main() -> None:
    spec, out = wc.load_spec()
    with wc.Result({**spec, "targets": None}, out, "breakdown") as result:
        import torch
        import torch.nn.functional as F

        wc.import_comfy(spec)
        wc.import_tunekit()
        import comfy.ldm.modules.attention as attention
        from tunekit.trainer.adapters import AdapterNetwork, select_targets
        from tunekit.trainer.conv_matmul import matmul_convolutions
        from tunekit.trainer.frozen import FrozenBase

        patcher = wc.build_comfy_model(spec)
        unet = patcher.model.diffusion_model
        latents, context, _ = wc.make_inputs(spec)
        timesteps = torch.full((latents.shape[0],), 500.0)
        repeats = spec.get("repeats", 3)

        def timed(name, fn):
            fn()  # warm-up
            times, cpu = [], []
            for _ in range(repeats):
                began = wc.clocks()
                fn()
                ended = wc.clocks()
                times.append(ended[0] - began[0])
                cpu.append(ended[1] - began[1])
            with wc.FlopCount() as flops:
                fn()
            result[name] = {"min_s": min(times), "median_s": statistics.median(times), "times": times,
                            "cpu_times": cpu, "median_cpu_s": statistics.median(cpu),
                            "gflop": flops.total / 1e9, "loadavg": wc.os.getloadavg()[0]}
            wc.log_line(f"{name}: min {min(times):.2f} s, median {statistics.median(times):.2f} s, "
                        f"CPU {statistics.median(cpu):.2f} s, "
                        f"{flops.total / 1e9:.0f} GFLOP, load {wc.os.getloadavg()[0]:.2f}")

        def forward():
            with torch.no_grad():
                unet(latents, timesteps, context=context)

        def frozen_fwd_bwd():
            x = latents.clone().requires_grad_(True)
            out = unet(x, timesteps, context=context)
            F.mse_loss(out, latents).backward()

        def lora_step(network, optimizer):
            def step():
                out = unet(latents, timesteps, context=context)
                loss = F.mse_loss(out, latents)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return step

        modules = dict(unet.named_modules())
        levels = list(wc.comfy_unet_config(spec)["num_res_blocks"])
        family = {"sd15": "sd1", "sdxl": "sdxl"}[spec["family"]]
        from tunekit.trainer.families import get_family

        names = get_family(family)
        default_attention = attention.optimized_attention
        result["default_attention"] = default_attention.__name__
        variants = [("", default_attention)]
        if default_attention is not attention.attention_pytorch:
            variants.append(("_sdpa", attention.attention_pytorch))
        with torch.inference_mode(False), torch.enable_grad():
            frozen = FrozenBase()
            frozen.apply(unet)
            for suffix, function in variants:
                attention.optimized_attention = function
                timed("forward" + suffix, forward)
                timed("frozen_fwd_bwd" + suffix, frozen_fwd_bwd)
                for preset in ("all", "attention"):
                    targets = select_targets(modules, preset)
                    network = AdapterNetwork({names.kohya_unet_name(p, levels): m for p, m in targets.items()},
                                             spec["rank"], spec["rank"])
                    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
                    network.attach()
                    with matmul_convolutions(unet):
                        timed(f"lora_{preset}" + suffix, lora_step(network, optimizer))
                        if preset == "all" and not suffix:
                            write_profile(lora_step(network, optimizer), Path(str(out) + ".profile.txt"))
                    network.detach()
            attention.optimized_attention = default_attention
            frozen.restore()


def write_profile(step, path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
