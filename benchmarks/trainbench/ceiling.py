"""The machine's matmul ceiling: a timed N^3 GEMM (default 2048) in the run's dtype, in a fresh process.

    python benchmarks/ceiling.py SPEC.json OUT.json
"""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import worker_common as wc  # noqa: E402


def main() -> None:
    spec, out = wc.load_spec()
    with wc.Result({**spec, "targets": None}, out, "gemm") as result:
        import torch

        n, repeats = spec.get("gemm_size", 2048), spec.get("gemm_repeats", 12)
        device = torch.device(spec["device"])
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["dtype"]]
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=generator).to(device, dtype)
        b = torch.randn(n, n, generator=generator).to(device, dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        times, cpu_times = [], []
        for i in range(repeats + 3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = wc.clocks()
            torch.mm(a, b, out=c)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ended = wc.clocks()
            if i >= 3:
                times.append(ended[0] - began[0])
                cpu_times.append(ended[1] - began[1])
        flops = 2 * n**3
        result["gemm_size"] = n
        result["threads"] = torch.get_num_threads()
        result["times_s"] = times
        result["median_flops_per_s"] = flops / statistics.median(times)
        result["best_flops_per_s"] = flops / min(times)
        result["cpu_times_s"] = cpu_times
        result["median_flops_per_cpu_s"] = flops / statistics.median(cpu_times)


if __name__ == "__main__":
    main()
