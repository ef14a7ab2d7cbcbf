"""One LoRA training step, side by side: TuneKit, ComfyUI's own TrainLoraNode, diffusers + PEFT.

    python3 benchmarks/train_step.py [--family sd15|sdxl] [--resolution 256] [--steps N]
                                     [--targets comfy|diffusers|both] [--json out.json]

Each tool runs in its own fresh process on the same full-size UNet architecture with random weights,
the same latents, conditioning, batch, rank and target layers:
  tunekit     TuneKit's TrainSession through nodes/bridge.py on ComfyUI's own UNet (ModelPatcher, weights
              loaded under inference mode, as CheckpointLoader does)
  comfy_node  ComfyUI 0.3.75's TrainLoraNode (comfy_extras/nodes_train.py), its settings pinned and printed
  comfy_node_new, comfy_node_bypass  the same node of ComfyUI 0.30.0, the newest a registry serves, with
              bypass_mode off (its default) and on (LoRA as forward hooks, as TuneKit trains)
  diffusers   diffusers' UNet2DConditionModel + PEFT LoRA, the loop of diffusers' LoRA example scripts
Target sets: `comfy` (every Linear and Conv2d: what TrainLoraNode trains) and `diffusers` (to_q/to_k/
to_v/to_out.0: diffusers' examples; TrainLoraNode cannot train it). The machine's matmul ceiling is a
timed 2048^3 GEMM run before and after the tools. Results: a table on stdout, JSON (--json) and an SVG
chart beside the JSON.

Needs only Python >= 3.10 and PyPI: the ComfyUI test host is provisioned as for the tests
(tools/comfy_host.py), diffusers + PEFT go into .cache/bench-site (never into the host's venv).
"""

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "benchmarks" / "trainbench"  # the workers and helpers
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(HERE))
import comfy_host  # noqa: E402
import provision  # noqa: E402
import report  # noqa: E402

log = logging.getLogger("tunekit.bench")
WORKERS = {"tunekit": "run_tunekit.py", "comfy_node": "run_comfy_node.py", "comfy_node_new": "run_comfy_node.py",
           "comfy_node_bypass": "run_comfy_node.py", "diffusers": "run_diffusers.py"}
# The host of the NEWEST_TOOLS; every other ComfyUI-based tool runs on the oldest supported, 0.3.75.
NEWEST_COMFY, NEWEST_TOOLS = "0.30.0", ("comfy_node_new", "comfy_node_bypass")
# Which tools can train which target set, and TuneKit's preset for it.
TARGET_SETS = {
    "comfy": {"tunekit_preset": "all", "tools": ("tunekit", "comfy_node", *NEWEST_TOOLS, "diffusers")},
    "diffusers": {"tunekit_preset": "attention", "tools": ("tunekit", "diffusers")},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--resolution", type=int, default=256, help="pixels (latents are 1/8); default 256")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per tool (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--targets", choices=("comfy", "diffusers", "both"), default="both")
    parser.add_argument("--tools", default=",".join(WORKERS), help="comma-separated subset")
    parser.add_argument("--json", type=Path, help="write every number here (and an SVG chart beside it)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: fp32 on CPU, bf16 on a GPU")
    parser.add_argument("--sdxl-depth", type=int, default=None,
                        help="transformer blocks of SDXL's deepest level (full: 10; default 2 on CPU, 10 on a GPU)")
    parser.add_argument("--comfy-attention", choices=("default", "pytorch"), default="default",
                        help="ComfyUI's attention for both ComfyUI-based tools: its default for the device, "
                             "or as with --use-pytorch-cross-attention (SDPA)")
    parser.add_argument("--comfy-checkpointing", choices=("on", "off"), default="on",
                        help="TrainLoraNode's gradient_checkpointing (its default: on)")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="address-space limit per tool on CPU, so running out of memory is a result and not "
                             "the kernel's OOM killer (default: 85%% of the memory available at start)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for every tool and the GEMM (default: torch's choice, one per core)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per tool")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time TuneKit's step piece by piece (forward, frozen backward, LoRA presets, "
                             "SDPA) on the same model: trainbench/breakdown.py")
    parser.add_argument("--channels", type=int, default=None, help=argparse.SUPPRESS)  # smoke runs: smaller UNet
    return parser.parse_args(argv)


def detect_device(host) -> str:
    code = "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"
    return subprocess.run([str(host.python), "-c", code], env=host.env(), capture_output=True, text=True,
                          check=True).stdout.strip()


def memory_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def base_spec(args, host, device: str) -> dict:
    dtype = args.dtype if args.dtype != "auto" else ("fp32" if device == "cpu" else "bf16")
    depth = args.sdxl_depth if args.sdxl_depth is not None else (2 if device == "cpu" else 10)
    return {
        "family": args.family, "resolution": args.resolution, "batch": args.batch, "rank": args.rank,
        "steps": args.steps, "warmup": args.warmup, "seed": args.seed, "device": device, "dtype": dtype,
        "sdxl_depth": depth if args.family == "sdxl" else None, "channels": args.channels,
        "comfy_dir": str(host.comfy_dir), "comfy_attention": args.comfy_attention,
        "comfy_checkpointing": args.comfy_checkpointing == "on", "threads": args.threads,
    }


def run_worker(script: str, spec: dict, env: dict, workdir: Path, name: str, limit_bytes: int | None,
               timeout: int) -> dict:
    """One tool in a fresh process; its result JSON, or what went wrong (killed, timed out)."""
    spec_path, out_path, log_path = (workdir / f"{name}.{ext}" for ext in ("spec.json", "json", "log"))
    spec_path.write_text(json.dumps(spec, indent=1))

    def limit():
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    began = time.monotonic()
    with open(log_path, "w") as out:
        try:
            code = subprocess.call([str(spec["python"]), str(HERE / script), str(spec_path), str(out_path)],
                                   env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit,
                                   timeout=timeout)
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.monotonic() - began
    if out_path.is_file():
        result = json.loads(out_path.read_text())
    else:
        status = "timeout" if code == "timeout" else ("oom" if code in (-9, 137) else "error")
        result = {"status": status, "error": f"worker exited with {code} without a result", "targets": spec.get("targets")}
    result.update(wall_s=wall, exit_code=code, log=str(log_path))
    return result


def tool_runs(tools: list[str], host, comfy_env: dict, threads: dict | None) -> dict[str, tuple[dict, dict]]:
    """tool -> (its environment, the spec entries its own host changes)."""
    runs = {tool: (comfy_env, {}) for tool in tools}
    if "diffusers" in tools:
        site = provision.ensure_site(host.python, comfy_env)
        # Not the host's stand-ins: transformers would take the torchvision stand-in for the real thing.
        runs["diffusers"] = ({**comfy_env, "PYTHONPATH": str(site)}, {})
    if set(NEWEST_TOOLS) & set(tools):
        newest = comfy_host.provision(NEWEST_COMFY)
        for tool in set(NEWEST_TOOLS) & set(tools):
            runs[tool] = (newest.env(threads), {"comfy_dir": str(newest.comfy_dir), "python": str(newest.python),
                                                "comfy_bypass": tool == "comfy_node_bypass"})
    return runs


def run_tools(args, runs: dict[str, tuple[dict, dict]], spec: dict, workdir: Path,
              limit_bytes: int | None) -> list[dict]:
    """Each chosen tool on each chosen target set it can train, one fresh process after another."""
    results = []
    sets = ("comfy", "diffusers") if args.targets == "both" else (args.targets,)
    for targets in sets:
        for tool in TARGET_SETS[targets]["tools"]:
            if tool not in runs:
                continue
            env, own_host = runs[tool]
            preset = TARGET_SETS[targets]["tunekit_preset"]
            tool_spec = {**spec, "targets": targets, "tunekit_preset": preset, **own_host}
            log.info("%s on the %s target set ...", tool, targets)
            result = run_worker(WORKERS[tool], tool_spec, env, workdir, f"{targets}-{tool}", limit_bytes, args.timeout)
            result["tool_key"] = tool
            results.append(result)
            log.info("  %s", report.one_line(result))
    return results


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    tools = [tool.strip() for tool in args.tools.split(",") if tool.strip()]
    unknown = [tool for tool in tools if tool not in WORKERS]
    if unknown:
        raise SystemExit(f"unknown tool(s) {unknown}; choose from {', '.join(WORKERS)}")
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    host = comfy_host.provision()
    comfy_env = host.env(threads)
    runs = tool_runs(tools, host, comfy_env, threads)
    device = detect_device(host) if args.device == "auto" else args.device
    spec = {**base_spec(args, host, device), "python": str(host.python)}
    limit_gb = args.memory_limit_gb if args.memory_limit_gb is not None else 0.85 * memory_available_gb()
    limit_bytes = int(limit_gb * 2**30) if device == "cpu" and limit_gb > 0 else None
    workdir = REPO / ".cache" / "bench-runs" / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    log.info("Benchmark %s %dpx batch %d rank %d on %s %s; workers' logs in %s", args.family, args.resolution,
             args.batch, args.rank, device, spec["dtype"], workdir)

    ceilings = [run_worker("ceiling.py", spec, comfy_env, workdir, "gemm-before", limit_bytes, args.timeout)]
    log.info("matmul ceiling %.1f GFLOP/s (load %.2f)", ceilings[0].get("median_flops_per_s", 0) / 1e9,
             os.getloadavg()[0])
    results = run_tools(args, runs, spec, workdir, limit_bytes)
    breakdown = None
    if args.breakdown:
        log.info("breakdown of TuneKit's step ...")
        breakdown = run_worker("breakdown.py", spec, comfy_env, workdir, "breakdown", limit_bytes, args.timeout)
    ceilings.append(run_worker("ceiling.py", spec, comfy_env, workdir, "gemm-after", limit_bytes, args.timeout))

    summary = report.summarise(spec, results, ceilings, limit_gb if limit_bytes else None)
    print(report.table(summary))
    if breakdown is not None:
        summary["breakdown"] = breakdown
        print(report.breakdown_table(breakdown, summary["matmul_ceiling_flops_per_s"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1, default=str))
        svg = args.json.with_suffix(".svg")
        svg.write_text(report.svg_chart(summary))
        log.info("wrote %s and %s", args.json, svg)
    return 0 if all(r["status"] in ("ok", "oom") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
