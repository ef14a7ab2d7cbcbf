"""benchmarks/trainbench/report.py: the derived figures of the training-step benchmark, on made-up results."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "trainbench"))
import report  # noqa: E402

SPEC = {"family": "sd15", "resolution": 256, "batch": 2, "rank": 16, "steps": 5, "warmup": 1, "dtype": "fp32",
        "device": "cpu", "sdxl_depth": None, "threads": 1, "python": "/x/python", "comfy_dir": "/x/ComfyUI"}


def _result(tool, targets, seconds, cpu, gflop, loaded_mb, peak_mb, status="ok"):
    return {"tool_key": tool, "targets": targets, "status": status, "median_s_per_step": seconds,
            "median_cpu_s_per_step": cpu, "step_seconds": [seconds] * 6, "flops_per_step": gflop * 1e9,
            "rss_loaded_mb": loaded_mb, "peak_rss_train_mb": peak_mb, "adapted_layers": 282,
            "loadavg_start": [1.0, 1.0, 1.0], "loadavg_end": [2.0, 1.0, 1.0]}


def test_ratios_ceiling_fraction_and_added_memory():
    results = [
        _result("tunekit", "comfy", 5.0, 5.0, 400, 3000, 4500),
        {**_result("comfy_node", "comfy", 25.0, 20.0, 800, 3000, 8000),
         "settings": {"gradient_checkpointing": True, "rank": 16}},
        {"tool_key": "diffusers", "targets": "comfy", "status": "oom", "error": "not enough memory"},
    ]
    ceilings = [{"status": "ok", "median_flops_per_s": 100e9, "median_flops_per_cpu_s": 100e9},
                {"status": "ok", "median_flops_per_s": 80e9, "median_flops_per_cpu_s": 90e9}]
    summary = report.summarise(SPEC, results, ceilings, memory_limit_gb=12.0)
    tunekit, node, diffusers = summary["rows"]
    assert summary["matmul_ceiling_flops_per_s"] == 100e9  # the best of before and after
    assert tunekit["ceiling_fraction"] == 0.8 and tunekit["images_per_s"] == 0.4
    assert node["slower_than_tunekit"] == 5.0 and node["cpu_slower_than_tunekit"] == 4.0
    assert node["rss_added_mb"] == 5000 and tunekit["rss_added_mb"] == 1500
    assert diffusers["status"] == "oom" and "s_per_step" not in diffusers
    assert "python" not in summary["spec"]
    text = report.table(summary)
    assert "| comfy | ComfyUI 0.3.75 TrainLoraNode | 282 | 25.00 | 0.080 | 5.00x | 20.00 | 4.00x | 800 | 32% |" in text
    assert "| comfy | diffusers+PEFT | | OOM |" in text
    assert "- ComfyUI 0.3.75 TrainLoraNode, comfy targets: gradient_checkpointing True, rank 16" in text
    assert report.svg_chart(summary).startswith("<svg") and "TuneKit - comfy targets" in report.svg_chart(summary)
