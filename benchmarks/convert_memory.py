"""Memory and time of converting an SDXL-sized checkpoint (issue 5: peak RAM well under 2x the file).

    python benchmarks/convert_memory.py WORKDIR [--scale 1.0] [--keep]

Writes a random checkpoint with the full SDXL key layout (UNet 2.6 B, CLIP-L, OpenCLIP bigG, KL VAE;
~3.5 B parameters, 6.9 GB in fp16; --scale < 1 keeps only that share of the tensors), then converts it
in a fresh process while sampling /proc/<pid>/status every 20 ms:

  1. .safetensors fp16 -> .safetensors bf16 (precision conversion, streamed)
  2. .ckpt (zip pickle, separate storage per tensor) fp16 -> .safetensors fp16 (torch.load mmap, weights_only)

Peak anonymous memory (RssAnon) is what the conversion itself holds; file-backed pages (RssFile) are the
page cache of memory-mapped inputs, which the kernel drops under pressure. Prints one JSON line per run.
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
# The checkout as the package `tunekit`, whatever its folder is called (as tests/conftest.py does).
ALIAS = f"import sys, types; sys.modules.setdefault('tunekit', types.ModuleType('tunekit')).__path__ = [{str(REPO)!r}]"

SDXL_UNET = dict(model_channels=320, channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2],
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], context_dim=2048,
                 use_linear_in_transformer=True, adm_in_channels=2816)


def sdxl_layout():
    import tiny_models as tm

    layout = tm._Layout()
    tm._unet(layout, SDXL_UNET)
    tm._clip_hf(layout, "conditioner.embedders.0.transformer.", tm.CLIP_L, "te")
    tm._clip_openclip(layout, "conditioner.embedders.1.model.", tm.CLIP_G, "te")
    tm._kl_vae(layout, "first_stage_model.")
    return layout


def make_safetensors(path: Path, scale: float) -> None:
    import torch

    exec(ALIAS)
    from tunekit.trainer.convert.tensor_files import TensorSpec, write_streaming

    items = list(sdxl_layout().items.items())
    keep = items if scale >= 1 else items[: max(1, int(len(items) * scale))]
    specs = {key: TensorSpec(torch.float16, tuple(shape)) for key, (shape, _) in keep}
    generator = torch.Generator().manual_seed(0)
    write_streaming(path, specs, lambda key: torch.randn(specs[key].shape, generator=generator).mul_(0.02).half(),
                    {"modelspec.title": "random SDXL-shaped benchmark file"})


def make_ckpt(source: Path, path: Path) -> None:
    """A .ckpt with one storage per tensor, built from memory maps of the safetensors (no copy in RAM)."""
    import numpy as np
    import torch

    with open(source, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_length))
    header.pop("__metadata__", None)
    state = {}
    for key, entry in header.items():
        begin = 8 + header_length + entry["data_offsets"][0]
        array = np.memmap(source, dtype=np.float16, mode="c", offset=begin, shape=tuple(entry["shape"]) or (1,))
        state[key] = torch.from_numpy(array) if entry["shape"] else torch.from_numpy(array).reshape(())
    torch.save({"state_dict": state, "global_step": 1}, path)


CONVERT = """
{alias}
from pathlib import Path
from tunekit.trainer.convert.checkpoint import CheckpointOptions, convert_checkpoint
report = convert_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), CheckpointOptions(precision=sys.argv[3] or None))
print(report.summary(), flush=True)
"""


def status(pid: int) -> dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                values[name] = int(rest.split()[0]) * 1024
    return values


def measure(source: Path, target: Path, precision: str) -> dict:
    target.unlink(missing_ok=True)
    code = CONVERT.format(alias=ALIAS)
    began = time.monotonic()
    process = subprocess.Popen([sys.executable, "-c", code, str(source), str(target), precision],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[str, int] = {}

    def sample() -> None:
        while process.poll() is None:
            try:
                for name, value in status(process.pid).items():
                    peaks[name] = max(peaks.get(name, 0), value)
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = process.communicate()[0]
    sampler.join()
    gib = lambda count: round(count / 2**30, 3)  # noqa: E731
    return {"source": source.name, "source_gib": gib(source.stat().st_size), "target_gib": gib(target.stat().st_size),
            "seconds": round(time.monotonic() - began, 1), "peak_rss_anon_gib": gib(peaks.get("RssAnon", 0)),
            "peak_rss_gib": gib(peaks.get("VmRSS", 0)), "peak_rss_file_gib": gib(peaks.get("RssFile", 0)),
            "returncode": process.returncode, "report": output.strip().splitlines()[-1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    source, ckpt = args.workdir / "sdxl_random_fp16.safetensors", args.workdir / "sdxl_random_fp16.ckpt"
    began = time.monotonic()
    if not source.exists():
        make_safetensors(source, args.scale)
    print(json.dumps({"generated": source.name, "gib": round(source.stat().st_size / 2**30, 3),
                      "seconds": round(time.monotonic() - began, 1)}), flush=True)
    print(json.dumps(measure(source, args.workdir / "out_bf16.safetensors", "bf16")), flush=True)
    if not ckpt.exists():
        began = time.monotonic()
        make_ckpt(source, ckpt)
        print(json.dumps({"generated": ckpt.name, "seconds": round(time.monotonic() - began, 1)}), flush=True)
    print(json.dumps(measure(ckpt, args.workdir / "out_from_ckpt.safetensors", "")), flush=True)
    if not args.keep:
        for path in (source, ckpt, args.workdir / "out_bf16.safetensors", args.workdir / "out_from_ckpt.safetensors"):
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
