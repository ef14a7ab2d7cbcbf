"""tools/tiny_models.py without ComfyUI: layouts, determinism, the demo dataset.

That ComfyUI loads the files as the intended family is proven in tests/e2e/test_tiny_models.py.
"""
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))
import tiny_models  # noqa: E402


def test_importing_needs_neither_comfyui_nor_torch():
    code = "import sys, tiny_models; print('comfy' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=TOOLS, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_attention_targets_exist_in_input_middle_and_output_blocks(family):
    paths = tiny_models.attention_modules(family)
    for part in ("input_blocks.", "middle_block.", "output_blocks."):
        assert any(p.startswith(part) and p.endswith("attn1.to_q") for p in paths), part
        assert any(p.startswith(part) and p.endswith("attn2.to_q") for p in paths), part


def test_layouts_are_the_documented_ones():
    assert tiny_models.attention_modules("sd15") == [
        f"{block}.transformer_blocks.0.{attn}.to_q"
        for block in ("input_blocks.1.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1")
        for attn in ("attn1", "attn2")]
    sdxl = tiny_models.attention_modules("sdxl")
    assert len(sdxl) == 2 * (2 + 2 + 10 + 10 + 1 + 6)
    assert "input_blocks.8.1.transformer_blocks.9.attn2.to_q" in sdxl
    assert tiny_models.param_counts("sd15")["te"] == 123_060_480  # CLIP-L, every key
    assert tiny_models.param_counts("sd2")["te"] == 354_032_641  # OpenCLIP-H text tower
    assert tiny_models.param_counts("sdxl")["te"] == 817_720_321  # CLIP-L + OpenCLIP bigG
    keys = tiny_models.layout("sdxl").items
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in keys
    assert "cond_stage_model.model.text_projection" in tiny_models.layout("sd2").items
    assert "first_stage_model.post_quant_conv.weight" in tiny_models.layout("sd15", vae="kl").items


def test_state_dict_is_random_everywhere_and_deterministic():
    torch = pytest.importorskip("torch")
    # The text encoder (123 M params) is left out to keep this fast; its values are seeded the same way.
    a = tiny_models.make_state_dict("sd15", seed=5, parts=("unet", "vae"))
    b = tiny_models.make_state_dict("sd15", seed=5, parts=("unet", "vae"))
    c = tiny_models.make_state_dict("sd15", seed=6, parts=("vae",))
    layout = tiny_models.layout("sd15")
    assert a.keys() == b.keys() == {k for k in layout.items if layout.groups[k] != "te"}

    def bits(t):
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    assert all(torch.equal(bits(a[k]), bits(b[k])) for k in a)
    assert not torch.equal(a["first_stage_model.taesd_decoder.19.weight"], c["first_stage_model.taesd_decoder.19.weight"])
    zero = [k for k, t in a.items() if t.numel() > 1 and not bits(t).float().abs().sum() > 0]
    assert zero == []
    assert a["model.diffusion_model.middle_block.1.proj_out.weight"].dtype == torch.float32
    te = tiny_models.make_state_dict("sd15", seed=5, parts=("te",), te_dtype="fp8")
    assert set(te) == {k for k in tiny_models.layout("sd15").items if k.startswith("cond_stage_model.")}
    assert te["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"].dtype == torch.float8_e4m3fn
    assert te["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.bias"].dtype == torch.float16


def test_demo_dataset_is_deterministic_and_captioned(tmp_path):
    first = tiny_models.make_demo_dataset(tmp_path / "a", n=4, seed=2)
    second = tiny_models.make_demo_dataset(tmp_path / "b", n=4, seed=2)
    assert [p.name for p in first] == [p.name for p in second] and len(first) == 8
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(first, second))
    images = [p for p in first if p.suffix == ".png"]
    assert len({p.read_bytes() for p in images}) == 4  # jittered, not copies
    assert (tmp_path / "a" / "tkdemo_000.txt").read_text().startswith("tkdemo, a red checker pattern")
