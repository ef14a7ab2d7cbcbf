"""How long scanning and bucketing a large dataset takes (issue: seconds, not minutes, for 10,000 images).

    python benchmarks/dataset_scan.py [--count 10000] [--folder DIR]

Generates `count` small images of mixed sizes and aspect ratios (PNG and JPEG) with caption files into
a temporary folder (not timed), then times `scan_image_folder` (every file read, hashed and decoded once,
captions read) and `plan_dataset` (kohya buckets at 512 and 1024). Run from the repository root with the
ComfyUI host's python, e.g. .cache/hosts/comfyui-0.3.75/venv/bin/python benchmarks/dataset_scan.py
"""

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if "tunekit" not in sys.modules:  # the checkout as the package `tunekit`, as the tests do
    package = types.ModuleType("tunekit")
    package.__path__ = [str(REPO)]
    sys.modules["tunekit"] = package

from tunekit.trainer.data import plan_dataset, scan_image_folder  # noqa: E402

SIZES = [(64, 64), (96, 64), (64, 96), (128, 48), (48, 128), (80, 60), (60, 80), (100, 100)]


def generate(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        suffix = ".jpg" if index % 2 else ".png"
        Image.fromarray(pixels).save(folder / f"img_{index:05d}{suffix}")
        (folder / f"img_{index:05d}.txt").write_text(f"tkbench, tag{index % 50}, photo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--folder", type=Path, help="reuse (or fill) this folder instead of a temporary one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        folder = args.folder or Path(temp)
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.glob("img_*")):
            began = time.perf_counter()
            generate(folder, args.count)
            print(f"generated {args.count} images in {time.perf_counter() - began:.1f} s (not part of the figure)")
        began = time.perf_counter()
        dataset = scan_image_folder(folder)
        scanned = time.perf_counter() - began
        timings = []
        for resolution in (512, 1024):
            began = time.perf_counter()
            plan = plan_dataset(dataset, resolution)
            timings.append((resolution, time.perf_counter() - began, len(plan.bucket_counts())))
        print(f"scan: {len(dataset)} images ({len(dataset.skipped)} skipped) in {scanned:.2f} s "
              f"({len(dataset) / scanned:.0f} images/s)")
        for resolution, seconds, buckets in timings:
            print(f"buckets at {resolution}: {seconds:.3f} s, {buckets} buckets used")
        print(f"scan + bucket (512): {scanned + timings[0][1]:.2f} s")


if __name__ == "__main__":
    main()
