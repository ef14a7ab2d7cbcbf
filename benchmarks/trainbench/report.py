"""Derived figures (images/s, ratios, ceiling fraction, RSS added), the table and an SVG chart.

Standard library only: the orchestrator runs on any Python >= 3.10.
"""

import html
import platform
import os

LABELS = {"tunekit": "TuneKit", "comfy_node": "ComfyUI 0.3.75 TrainLoraNode",
          "comfy_node_new": "ComfyUI 0.30.0 TrainLoraNode",
          "comfy_node_bypass": "ComfyUI 0.30.0 TrainLoraNode, bypass", "diffusers": "diffusers+PEFT"}
TARGET_LABELS = {"comfy": "every Linear+Conv (ComfyUI's set)", "diffusers": "to_q/k/v/out.0 (diffusers' set)"}


def one_line(result: dict) -> str:
    if result.get("status") != "ok":
        return f"{result.get('status')}: {result.get('error', '')} (phase {result.get('phase', '?')}; log {result.get('log')})"
    cpu = result.get("median_cpu_s_per_step")
    return (f"{result['median_s_per_step']:.2f} s/step (steps {', '.join(f'{s:.2f}' for s in result['step_seconds'])}), "
            + (f"{cpu:.2f} CPU s/step, " if cpu is not None else "")
            + f"+{result['peak_rss_train_mb'] - result['rss_loaded_mb']:.0f} MB RSS"
            + (f" (estimated +{result['estimate_added_mb']:.0f} MB), " if result.get("estimate_added_mb") else ", ")
            + f"{result.get('flops_per_step', 0) / 1e9:.0f} GFLOP/step, load {result['loadavg_end'][0]:.2f}")


def summarise(spec: dict, results: list[dict], ceilings: list[dict], memory_limit_gb: float | None) -> dict:
    rates = [c["median_flops_per_s"] for c in ceilings if c.get("status") == "ok"]
    ceiling = max(rates) if rates else None
    cpu_rates = [c["median_flops_per_cpu_s"] for c in ceilings if c.get("median_flops_per_cpu_s")]
    cpu_ceiling = max(cpu_rates) if cpu_rates else None
    tunekit = {r["targets"]: r for r in results if r.get("tool_key") == "tunekit" and r.get("status") == "ok"}
    rows = []
    for r in results:
        row = {"targets": r.get("targets"), "tool": r.get("tool_key"), "status": r.get("status"),
               "error": r.get("error"), "load_1min_start": (r.get("loadavg_start") or [None])[0],
               "load_1min_end": (r.get("loadavg_end") or [None])[0]}
        if r.get("status") == "ok":
            median, cpu = r["median_s_per_step"], r.get("median_cpu_s_per_step")
            base = tunekit.get(r["targets"])
            base_cpu = base.get("median_cpu_s_per_step") if base else None
            row.update(
                s_per_step=median,
                images_per_s=spec["batch"] / median,
                slower_than_tunekit=(median / base["median_s_per_step"]) if base else None,
                cpu_s_per_step=cpu,
                cpu_slower_than_tunekit=(cpu / base_cpu) if cpu and base_cpu else None,
                flops_per_step=r.get("flops_per_step"),
                ceiling_fraction=(r["flops_per_step"] / median / ceiling) if ceiling and r.get("flops_per_step") else None,
                cpu_ceiling_fraction=(r["flops_per_step"] / cpu / cpu_ceiling)
                if cpu and cpu_ceiling and r.get("flops_per_step") else None,
                rss_loaded_mb=r["rss_loaded_mb"],
                peak_rss_mb=r["peak_rss_train_mb"],
                rss_added_mb=r["peak_rss_train_mb"] - r["rss_loaded_mb"],
                estimate_added_mb=r.get("estimate_added_mb"),
                peak_vram_mb=r.get("peak_vram_train_mb"),
                adapted_layers=r.get("adapted_layers"),
                trainable_params=r.get("trainable_params"),
            )
        rows.append(row)
    return {
        "spec": {k: v for k, v in spec.items() if k not in ("python", "comfy_dir")},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "matmul_ceiling_flops_per_s": ceiling,
        "matmul_ceiling_flops_per_cpu_s": cpu_ceiling,
        "ceilings": ceilings,
        "memory_limit_gb": memory_limit_gb,
        "rows": rows,
        "results": results,
    }


def _fmt(value, pattern: str, missing: str = "-") -> str:
    return missing if value is None else pattern.format(value)


def table(summary: dict) -> str:
    spec = summary["spec"]
    ceiling = summary["matmul_ceiling_flops_per_s"]
    family = spec["family"] + (f" (SDXL depth {spec['sdxl_depth']})" if spec.get("sdxl_depth") else "")
    lines = [
        f"{family}, {spec['resolution']} px, batch {spec['batch']}, rank {spec['rank']}, {spec['dtype']} on {spec['device']}; "
        f"median of {spec['steps']} steps after {spec['warmup']} warm-up; matmul ceiling "
        f"{_fmt(ceiling and ceiling / 1e9, '{:.1f}')} GFLOP/s ("
        f"{_fmt(summary.get('matmul_ceiling_flops_per_cpu_s') and summary['matmul_ceiling_flops_per_cpu_s'] / 1e9, '{:.1f}')}"
        f" per CPU-second), threads {spec.get('threads') or 'default'}",
        "",
        "| targets | tool | layers | s/step | img/s | vs TuneKit | CPU s/step | vs TuneKit (CPU) | GFLOP/step | "
        "% ceiling | % ceiling (CPU) | RSS loaded | peak RSS | added by training | estimated | load 1m |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        name = LABELS.get(row["tool"], row["tool"])
        if row["status"] != "ok":
            lines.append(f"| {row['targets']} | {name} | | {row['status'].upper()} | | | | | | | | | | | | "
                         f"{_fmt(row['load_1min_end'], '{:.2f}')} |")
            continue
        lines.append(
            f"| {row['targets']} | {name} | {_fmt(row['adapted_layers'], '{}')} | {row['s_per_step']:.2f} | "
            f"{row['images_per_s']:.3f} | {_fmt(row['slower_than_tunekit'], '{:.2f}x')} | "
            f"{_fmt(row.get('cpu_s_per_step'), '{:.2f}')} | {_fmt(row.get('cpu_slower_than_tunekit'), '{:.2f}x')} | "
            f"{_fmt(row['flops_per_step'] and row['flops_per_step'] / 1e9, '{:.0f}')} | "
            f"{_fmt(row['ceiling_fraction'] and 100 * row['ceiling_fraction'], '{:.0f}%')} | "
            f"{_fmt(row.get('cpu_ceiling_fraction') and 100 * row['cpu_ceiling_fraction'], '{:.0f}%')} | "
            f"{row['rss_loaded_mb'] / 1024:.2f} GB | {row['peak_rss_mb'] / 1024:.2f} GB | "
            f"{row['rss_added_mb'] / 1024:.2f} GB | {_fmt(row.get('estimate_added_mb') and row['estimate_added_mb'] / 1024, '{:.2f} GB', '')} | "
            f"{_fmt(row['load_1min_end'], '{:.2f}')} |"
        )
    lines.append("")
    lines.append("vs TuneKit: the tool's s/step over TuneKit's on the same targets (2.00x = takes twice as long). "
                 "CPU s/step: CPU seconds of the tool's process per step (all its threads): what a step costs whatever "
                 "else runs on the machine. % ceiling: counted FLOPs per step / s/step / the GEMM's FLOP/s (CPU: per "
                 "CPU-second both). Added by training: peak RSS while training minus RSS with the model loaded. Estimated: "
                 "what TuneKit's memory check (trainer/memory.py) predicted it would add, before training.")
    lines.extend(["", "Each tool's pinned settings:", *settings_lines(summary["results"])])
    return "\n".join(lines)


def settings_lines(results: list[dict]) -> list[str]:
    lines = []
    for result in results:
        settings = result.get("settings")
        if settings:
            shown = ", ".join(f"{key} {value}" for key, value in settings.items())
            lines.append(f"- {LABELS.get(result.get('tool_key'), result.get('tool_key'))}, {result.get('targets')} "
                         f"targets: {shown}")
    return lines


def svg_chart(summary: dict) -> str:
    """Two bar charts: seconds per step and RSS added by training, one bar per tool and target set."""
    rows = [r for r in summary["rows"] if r["status"] == "ok"]
    colours = {"tunekit": "#2b7bba", "comfy_node": "#d9822b", "comfy_node_new": "#b5562a",
               "comfy_node_bypass": "#e0a458", "diffusers": "#5a9e4b"}
    bar, gap, left, width = 22, 8, 300, 380
    height = 60 + 2 * (len(rows) * (bar + gap) + 50)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 120}" height="{height}" '
             'font-family="sans-serif" font-size="12">',
             f'<text x="10" y="20" font-size="14">{html.escape(table(summary).splitlines()[0])}</text>']
    y = 45
    for title, key, unit, scale in (("seconds per step", "s_per_step", "s", 1.0),
                                    ("RSS added by training", "rss_added_mb", "GB", 1 / 1024)):
        values = [(r[key] or 0) * scale for r in rows]
        top = max(values + [1e-9])
        parts.append(f'<text x="10" y="{y}" font-weight="bold">{title}</text>')
        y += 12
        for row, value in zip(rows, values):
            label = f"{LABELS.get(row['tool'], row['tool'])} - {row['targets']} targets"
            length = width * value / top
            parts.append(f'<text x="{left - 6}" y="{y + bar * 0.7}" text-anchor="end">{html.escape(label)}</text>')
            parts.append(f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{bar}" '
                         f'fill="{colours.get(row["tool"], "#888")}"/>')
            parts.append(f'<text x="{left + length + 4:.1f}" y="{y + bar * 0.7}">{value:.2f} {unit}</text>')
            y += bar + gap
        y += 30
    parts.append("</svg>")
    return "\n".join(parts)


def breakdown_table(breakdown: dict, ceiling: float | None) -> str:
    if breakdown.get("status") != "ok":
        return f"breakdown: {breakdown.get('status')}: {breakdown.get('error')}"
    lines = ["", f"TuneKit's step piece by piece (ComfyUI default attention: {breakdown.get('default_attention')})", "",
             "| part | min s | median s | median CPU s | GFLOP | % ceiling (min) | load 1m |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, entry in breakdown.items():
        if not isinstance(entry, dict) or "min_s" not in entry:
            continue
        fraction = entry["gflop"] * 1e9 / entry["min_s"] / ceiling if ceiling else None
        lines.append(f"| {name} | {entry['min_s']:.2f} | {entry['median_s']:.2f} | "
                     f"{_fmt(entry.get('median_cpu_s'), '{:.2f}')} | {entry['gflop']:.0f} | "
                     f"{_fmt(fraction and 100 * fraction, '{:.0f}%')} | {entry['loadavg']:.2f} |")
    return "\n".join(lines)
