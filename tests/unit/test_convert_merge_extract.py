"""Merge LoRAs into a checkpoint, extract a LoRA from two checkpoints, resize a LoRA: numbers and errors."""

import pytest
import safetensors.torch
import torch
from convert_fixtures import add_lora, kohya_sdxl, mini_checkpoint
from tunekit.trainer.convert.errors import ConversionError
from tunekit.trainer.convert.extract import ExtractOptions, extract_lora_file
from tunekit.trainer.convert.lora_file import convert_lora
from tunekit.trainer.convert.lora_math import apply
from tunekit.trainer.convert.merge import LoraToMerge, merge_loras
from tunekit.trainer.convert.resize import resize_lora_file
from tunekit.trainer.convert.svd import choose_rank

Q = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_input_blocks_1_0_in_layers_2"
UNET = "model.diffusion_model."
# kohya names SD1 layers the diffusers way when it writes (it reads ldm names too)
Q_OUT = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV_OUT = "lora_unet_down_blocks_0_resnets_0_conv1"


def save(path, tensors, metadata=None):
    safetensors.torch.save_file(tensors, str(path), metadata)
    return path


def load(path):
    return safetensors.torch.load_file(str(path))


def scaled(lora, name, rank):
    up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
    return lora[f"{name}.alpha"].item() / rank * (up.flatten(1) @ down.flatten(1))


@pytest.fixture
def sd1(tmp_path):
    return save(tmp_path / "base.safetensors", mini_checkpoint("sd1"))


# ----- merge -----

def test_merge_adds_strength_times_alpha_over_rank_times_up_down(sd1, tmp_path):
    lora = add_lora(add_lora({}, Q, 8, 8, rank=2, alpha=1.0, seed=1), CONV, 8, 8, rank=2, alpha=4.0, conv=True, seed=2)
    lora = add_lora(lora, "lora_te_text_model_encoder_layers_0_mlp_fc1", 32, 16, rank=4, alpha=4.0, seed=3)
    report = merge_loras(sd1, [LoraToMerge(save(tmp_path / "l.safetensors", lora), 0.5, strength_clip=2.0)],
                         tmp_path / "merged.safetensors")
    base, merged = load(sd1), load(tmp_path / "merged.safetensors")
    q = f"{UNET}input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    conv = f"{UNET}input_blocks.1.0.in_layers.2.weight"
    fc1 = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    torch.testing.assert_close(merged[q], base[q] + 0.5 * scaled(lora, Q, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(merged[conv], base[conv] + 0.5 * scaled(lora, CONV, 2).reshape(8, 8, 3, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(merged[fc1], base[fc1] + 2.0 * scaled(lora, "lora_te_text_model_encoder_layers_0_mlp_fc1", 4),
                               rtol=0, atol=1e-6)
    assert all(torch.equal(merged[key], value) for key, value in base.items() if key not in (q, conv, fc1))
    assert report.tensors_changed == 3


def test_merge_lands_on_the_right_third_of_a_fused_openclip_qkv(tmp_path):
    base = mini_checkpoint("sdxl")
    lora = add_lora({}, "lora_te2_text_model_encoder_layers_0_self_attn_k_proj", 16, 16, rank=2, alpha=2.0, seed=5)
    merge_loras(save(tmp_path / "xl.safetensors", base, {"modelspec.title": "mine"}),
                [LoraToMerge(save(tmp_path / "l.safetensors", lora))], tmp_path / "merged.safetensors")
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    merged = load(tmp_path / "merged.safetensors")[key]
    expected = base[key].clone()
    expected[16:32] += scaled(lora, "lora_te2_text_model_encoder_layers_0_self_attn_k_proj", 2)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)
    with safetensors.safe_open(str(tmp_path / "merged.safetensors"), "pt") as handle:
        assert handle.metadata()["modelspec.title"] == "mine" and "tunekit_merged_loras" in handle.metadata()


def test_loha_lokr_diff_and_dora_follow_comfyui_formulas():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, generator=g)
    w1a, w1b, w2a, w2b = (torch.randn(shape, generator=g) for shape in ((6, 2), (2, 4), (6, 2), (2, 4)))
    loha = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(1.0)}
    torch.testing.assert_close(apply(weight.clone(), loha, 0.7), weight + 0.7 * 0.5 * (w1a @ w1b) * (w2a @ w2b))
    k1, k2 = torch.randn(2, 2, generator=g), torch.randn(3, 2, generator=g)
    torch.testing.assert_close(apply(weight.clone(), {"lokr_w1": k1, "lokr_w2": k2}, 1.0), weight + torch.kron(k1, k2))
    diff = torch.randn(6, 4, generator=g)
    torch.testing.assert_close(apply(weight.clone(), {"diff": diff}, 0.5), weight + 0.5 * diff)
    up, down = torch.randn(6, 2, generator=g), torch.randn(2, 4, generator=g)
    scale = torch.rand(6, 1, generator=g) + 0.5
    dora = apply(weight.clone(), {"lora_up.weight": up, "lora_down.weight": down, "dora_scale": scale}, 1.0)
    direction = weight + up @ down
    torch.testing.assert_close(dora, direction * scale / (weight.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps))


def test_merge_refuses_a_lora_for_another_family_or_shape_and_writes_nothing(sd1, tmp_path):
    out = tmp_path / "merged.safetensors"
    with pytest.raises(ConversionError, match="is a SDXL LoRA but the checkpoint is SD 1.x"):
        merge_loras(sd1, [LoraToMerge(save(tmp_path / "xl.safetensors", kohya_sdxl()))], out)
    wrong = add_lora({}, Q, 16, 16, rank=2)  # the layer exists but is 8x8
    with pytest.raises(ConversionError, match="do not fit this checkpoint.*attn1.to_q.weight' has shape \\(8, 8\\)"):
        merge_loras(sd1, [LoraToMerge(save(tmp_path / "wrong.safetensors", wrong))], out)
    absent = add_lora({}, "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_k", 8, 8, rank=2)
    with pytest.raises(ConversionError, match="to_k.weight' is not in the checkpoint"):
        merge_loras(sd1, [LoraToMerge(save(tmp_path / "absent.safetensors", absent))], out)
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


# ----- extract -----

@pytest.fixture
def tuned(sd1, tmp_path):
    """The base plus a rank-3 change of attn1.to_q, a rank-8 change of a conv and a change of the TE."""
    g = torch.Generator().manual_seed(7)
    weights = load(sd1)
    weights[f"{UNET}input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"] += torch.randn(8, 3, generator=g) @ torch.randn(3, 8, generator=g)
    weights[f"{UNET}input_blocks.1.0.in_layers.2.weight"] += torch.randn(8, 8, 3, 3, generator=g) * 0.1
    weights["cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"] += torch.randn(16, 16, generator=g) * 0.1
    return save(tmp_path / "tuned.safetensors", weights)


def difference(tuned_path, base_path, key):
    return load(tuned_path)[key] - load(base_path)[key]


def test_extract_at_full_rank_reproduces_the_difference(sd1, tuned, tmp_path):
    report = extract_lora_file(tuned, sd1, tmp_path / "x.safetensors", ExtractOptions(rank=16, conv=True, dtype=torch.float32))
    assert report.layers == 3 and report.error < 1e-6
    merge_loras(sd1, [LoraToMerge(tmp_path / "x.safetensors")], tmp_path / "again.safetensors")
    again, target = load(tmp_path / "again.safetensors"), load(tuned)
    assert all(torch.allclose(again[key], target[key], atol=1e-5) for key in target)


def test_extract_at_low_rank_reports_the_error_it_really_has(sd1, tuned, tmp_path):
    report = extract_lora_file(tuned, sd1, tmp_path / "x.safetensors", ExtractOptions(rank=2, conv=True))
    key = f"{UNET}input_blocks.1.0.in_layers.2.weight"
    true = difference(tuned, sd1, key).flatten(1)
    lora = load(tmp_path / "x.safetensors")
    approx = lora[f"{CONV_OUT}.lora_up.weight"].float().flatten(1) @ lora[f"{CONV_OUT}.lora_down.weight"].float().flatten(1)
    measured = (torch.linalg.matrix_norm(true - approx) / torch.linalg.matrix_norm(true)).item()
    singular = torch.linalg.svdvals(true)
    theory = (singular[2:].square().sum() / singular.square().sum()).sqrt().item()
    assert report.per_layer["unet:input_blocks.1.0.in_layers.2"][1] == pytest.approx(measured, rel=1e-6)
    assert measured == pytest.approx(theory, rel=1e-2)  # fp16 factors add a little to the SVD tail
    q_error = report.per_layer["unet:input_blocks.1.1.transformer_blocks.0.attn1.to_q"][1]
    assert q_error > 0.01  # rank 3 change kept at rank 2


def test_extract_by_error_threshold_picks_the_fewest_ranks(sd1, tuned, tmp_path):
    report = extract_lora_file(tuned, sd1, tmp_path / "x.safetensors", ExtractOptions(rank=None, max_error=1e-4, dtype=torch.float32))
    assert report.per_layer["unet:input_blocks.1.1.transformer_blocks.0.attn1.to_q"][0] == 3  # its change has rank 3
    assert choose_rank(torch.tensor([4.0, 3.0, 0.0]), None, 0.0) == 2
    assert choose_rank(torch.tensor([4.0, 3.0, 1.0]), 1, 0.0) == 1  # the rank caps the threshold


def test_extract_refuses_a_mismatched_or_identical_base(sd1, tuned, tmp_path):
    xl = save(tmp_path / "xl.safetensors", mini_checkpoint("sdxl"))
    with pytest.raises(ConversionError, match="fine-tune is SD 1.x but the base is SDXL"):
        extract_lora_file(tuned, xl, tmp_path / "x.safetensors")
    with pytest.raises(ConversionError, match="nothing to extract"):
        extract_lora_file(sd1, sd1, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ----- resize -----

def test_resize_reports_the_error_of_the_factors_it_writes(tmp_path):
    lora = add_lora(add_lora({}, Q, 8, 8, rank=6, alpha=3.0, seed=1), CONV, 8, 8, rank=6, alpha=6.0, conv=True, seed=2)
    source = save(tmp_path / "l.safetensors", lora, {"ss_base_model_version": "sd_v1"})
    report = resize_lora_file(source, tmp_path / "small.safetensors", 2)
    small = load(tmp_path / "small.safetensors")
    errors = []
    for name, written in ((Q, Q_OUT), (CONV, CONV_OUT)):
        before = scaled(lora, name, 6)
        after = small[f"{written}.lora_up.weight"].flatten(1) @ small[f"{written}.lora_down.weight"].flatten(1)
        assert small[f"{written}.alpha"].item() == 2.0 and small[f"{written}.lora_down.weight"].shape[0] == 2
        errors.append((torch.linalg.matrix_norm(before - after).item(), torch.linalg.matrix_norm(before).item()))
    pooled = (sum(e * e for e, _ in errors) / sum(n * n for _, n in errors)) ** 0.5
    assert report.error == pytest.approx(pooled, rel=1e-5)
    assert small[f"{CONV_OUT}.lora_down.weight"].shape == (2, 8, 3, 3)
    lossless = resize_lora_file(source, tmp_path / "same.safetensors", 6)
    assert lossless.error < 1e-6


def test_resize_refuses_loha(tmp_path):
    loha = {f"{Q}.hada_{name}": torch.ones(shape) for name, shape in
            (("w1_a", (8, 2)), ("w1_b", (2, 8)), ("w2_a", (8, 2)), ("w2_b", (2, 8)))}
    with pytest.raises(ConversionError, match="plain LoRA/LoCon layers; this file has loha"):
        resize_lora_file(save(tmp_path / "h.safetensors", loha, {"ss_base_model_version": "sd_v1"}), tmp_path / "o.safetensors", 1)


def test_a_resized_lora_keeps_its_format(tmp_path):
    comfy = convert_lora(add_lora({}, Q, 8, 8, rank=4), {"ss_base_model_version": "sd_v1"}, "comfy")
    source = save(tmp_path / "c.safetensors", comfy.tensors, comfy.metadata)
    resize_lora_file(source, tmp_path / "o.safetensors", 2)
    assert all(key.startswith("diffusion_model.") for key in load(tmp_path / "o.safetensors"))


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    from tunekit.trainer.convert.diffusers_folder import single_file_to_diffusers
    from tunekit.trainer.convert.errors import UnknownArchitectureError

    other = save(tmp_path / "flux.safetensors", {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)})
    lora = save(tmp_path / "l.safetensors", add_lora({}, Q, 8, 8))
    with pytest.raises(UnknownArchitectureError, match="not an SD1/SD2/SDXL single-file checkpoint"):
        merge_loras(other, [LoraToMerge(lora)], tmp_path / "out.safetensors")
    with pytest.raises(UnknownArchitectureError, match="not an SD1/SD2/SDXL"):
        single_file_to_diffusers(other, tmp_path / "folder")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["flux.safetensors", "l.safetensors"]


def test_an_sdxl_refiner_is_named_and_refused(tmp_path):
    from tunekit.trainer.convert.diffusers_folder import single_file_to_diffusers
    from tunekit.trainer.convert.errors import UnknownArchitectureError

    refiner = save(tmp_path / "refiner.safetensors", {f"{UNET}input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
                                                      "conditioner.embedders.0.model.ln_final.weight": torch.ones(8)})
    with pytest.raises(UnknownArchitectureError, match="SDXL refiner"):
        single_file_to_diffusers(refiner, tmp_path / "folder")
    assert not (tmp_path / "folder").exists()
