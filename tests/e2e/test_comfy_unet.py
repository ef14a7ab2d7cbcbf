"""TuneKit on ComfyUI's own UNet classes (no server): the host's Python runs comfy_unet_probe.py.

- Training aliases the host's weights: while steps run, every parameter of the loaded UNet is a frozen
  alias on the very storage ComfyUI loaded (nothing copied, no weight gradients), and afterwards the
  host's own tensors are back and no hook (nor convolution route, trainer/conv_matmul.py) is left.
- Where ComfyUI runs its sub-quadratic attention only as the CPU default, training runs torch's SDPA.
- The 'all' preset (every Linear and Conv2d) gets kohya names that ComfyUI's LoRA loader maps back to
  the same weights, for the full SD1.5 and SDXL layouts (SD1 in diffusers style, as kohya/A1111 write).
"""

import json
import subprocess
from pathlib import Path

import pytest

PROBE = Path(__file__).resolve().parent / "comfy_unet_probe.py"


def _probe(comfy_host, check: str) -> dict:
    done = subprocess.run([str(comfy_host.python), str(PROBE), check, str(comfy_host.comfy_dir)],
                          env=comfy_host.env(), capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("PROBE "):])


@pytest.fixture(scope="module")
def storage_report(comfy_host) -> dict:
    return _probe(comfy_host, "storage")


def test_training_on_comfys_unet_shares_the_hosts_weight_storage(storage_report):
    report = storage_report
    count = report["parameters"]
    assert report["branches"] > 100 and report["branch_grads"] == 2 * report["branches"]
    assert len(report["during_steps"]) == 2
    for step in report["during_steps"]:
        assert step["aliases"] == count  # swapped for autograd-usable aliases...
        assert step["same_storage"] == count and step["same_data"] == count  # ...on the same memory
        assert step["inference"] == 0 and step["requires_grad"] == 0  # no full weight gradients
        assert step["matmul_routes"] > 0  # wide low-resolution convolutions may run as matmuls (CPU)...
    assert report["restored"] == count and report["hooks_left"] == 0
    assert report["matmul_routes_left"] == 0  # ...only while training


def test_training_uses_sdpa_where_comfyui_fell_back_to_sub_quadratic_attention(storage_report):
    report = storage_report  # a CPU host started without attention flags
    assert report["default_attention"] == "attention_sub_quad"
    assert report["sdpa_calls"] > 0


def test_every_linear_and_conv_gets_a_kohya_name_comfyui_loads(comfy_host):
    report = _probe(comfy_host, "names")
    for family, expected in (("SD15", 282), ("SDXL", 794)):
        entry = report[family]
        assert entry["targets"] == entry["linear_and_conv"] == entry["unique_names"] == expected, entry
        assert entry["wrong"] == [], entry["wrong"]
