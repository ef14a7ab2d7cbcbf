"""LoRA key formats: kohya <-> diffusers/PEFT <-> ComfyUI, exact both ways, with the metadata other UIs read."""

import json

import pytest
import safetensors
import safetensors.torch
import torch
from convert_fixtures import add_lora, kohya_sd1, kohya_sdxl, real_unet_modules
from tunekit.trainer.convert.arch import SD1_ARCH, SDXL_ARCH
from tunekit.trainer.convert.errors import ConversionError, UnknownArchitectureError
from tunekit.trainer.convert.lora_file import convert_lora, convert_lora_file, parse_lora
from tunekit.trainer.convert.unet_names import UNetNameError, diffusers_to_ldm, ldm_to_diffusers


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key, tensor in a.items():
        assert tensor.dtype == b[key].dtype and torch.equal(tensor, b[key]), key


# ----- layer names -----

@pytest.mark.parametrize("arch", [SD1_ARCH, SDXL_ARCH], ids=["sd1", "sdxl"])
def test_every_unet_layer_maps_to_diffusers_and_back_one_to_one(arch):
    modules = real_unet_modules(arch.name)
    mapped = {ldm_to_diffusers(path, arch.layout) for path in modules}
    assert len(mapped) == len(modules) > 200
    assert all(diffusers_to_ldm(ldm_to_diffusers(path, arch.layout), arch.layout) == path for path in modules)


@pytest.mark.parametrize("ldm, diffusers, arch", [
    ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv", SD1_ARCH),
    ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv", SD1_ARCH),  # SD1's last level has no attention
    ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv", SD1_ARCH),
    ("input_blocks.7.0.skip_connection", "down_blocks.2.resnets.0.conv_shortcut", SD1_ARCH),
    ("middle_block.2.out_layers.3", "mid_block.resnets.1.conv2", SD1_ARCH),
    ("output_blocks.11.1.proj_out", "up_blocks.3.attentions.2.proj_out", SD1_ARCH),
    ("input_blocks.4.1.transformer_blocks.1.attn2.to_k", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", SDXL_ARCH),
    ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv", SDXL_ARCH),
    ("label_emb.0.2", "add_embedding.linear_2", SDXL_ARCH),
])
def test_known_layer_names(ldm, diffusers, arch):
    assert ldm_to_diffusers(ldm, arch.layout) == diffusers
    assert diffusers_to_ldm(diffusers, arch.layout) == ldm


def test_a_name_outside_the_layout_is_refused():
    with pytest.raises(UNetNameError, match="down_blocks.7"):
        diffusers_to_ldm("down_blocks.7.resnets.0.conv1", SD1_ARCH.layout)


# ----- round trips -----

def test_kohya_sd1_round_trips_exactly_through_diffusers_and_comfy():
    original = kohya_sd1()
    for middle in ("diffusers", "comfy"):
        there = convert_lora(original, {}, middle)
        back = convert_lora(there.tensors, there.metadata, "kohya")
        assert_same(back.tensors, original)
    comfy = convert_lora(original, {}, "comfy")
    via_diffusers = convert_lora(convert_lora(comfy.tensors, comfy.metadata, "diffusers").tensors,
                                 convert_lora(comfy.tensors, comfy.metadata, "diffusers").metadata, "comfy")
    assert_same(via_diffusers.tensors, comfy.tensors)


def test_sdxl_round_trips_with_both_text_encoders_and_fp16_alphas():
    original = kohya_sdxl()
    diffusers = convert_lora(original, {}, "diffusers")
    assert "text_encoder_2.text_model.encoder.layers.31.mlp.fc2.lora_A.weight" in diffusers.tensors
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.lora_B.weight" in diffusers.tensors
    assert_same(convert_lora(diffusers.tensors, diffusers.metadata, "kohya").tensors, original)
    comfy = convert_lora(original, {}, "comfy")
    assert "text_encoders.clip_g.transformer.text_model.encoder.layers.31.mlp.fc2.lora_up.weight" in comfy.tensors
    assert "diffusion_model.output_blocks.2.2.conv.alpha" in comfy.tensors
    assert_same(convert_lora(comfy.tensors, comfy.metadata, "kohya").tensors, original)


def test_diffusers_keeps_alphas_in_the_metadata_diffusers_reads():
    diffusers = convert_lora(kohya_sd1(), {}, "diffusers")
    assert not any(key.endswith(".alpha") for key in diffusers.tensors)
    config = json.loads(diffusers.metadata["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 2.0
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert config["unet.rank_pattern"] == {name: 8}
    assert config["unet.alpha_pattern"] == {name: 4.0, "mid_block.resnets.1.time_emb_proj": 1.0}


def test_a_diffusers_file_without_alphas_means_scale_one_everywhere():
    t = {}
    add_lora(t, "unet.down_blocks.0.attentions.0.proj_in", 320, 320, rank=4, alpha=None)
    t = {key.replace("lora_up", "lora_B").replace("lora_down", "lora_A"): value for key, value in t.items()}
    kohya = convert_lora(t, {}, "kohya", family="sd1")
    assert not any(key.endswith(".alpha") for key in kohya.tensors)  # kohya: no alpha = scale 1
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight" in kohya.tensors
    assert_same(convert_lora(kohya.tensors, kohya.metadata, "diffusers").tensors, t)


def test_older_diffusers_attention_processor_keys_are_read():
    module = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    t = {f"{module}.up.weight": torch.zeros(1280, 4), f"{module}.down.weight": torch.zeros(4, 1280)}
    comfy = convert_lora(t, {}, "comfy", family="sd1")
    assert sorted(comfy.tensors) == [f"diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_out.0.lora_{side}.weight"
                                     for side in ("down", "up")]


def test_simpletuner_lycoris_keys_are_read():
    t = {"lycoris_down_blocks_0_attentions_0_proj_in.lokr_w1": torch.ones(4, 4),
         "lycoris_down_blocks_0_attentions_0_proj_in.lokr_w2": torch.ones(80, 80)}
    comfy = convert_lora(t, {}, "comfy", family="sd1")
    assert sorted(comfy.tensors) == ["diffusion_model.input_blocks.1.1.proj_in.lokr_w1", "diffusion_model.input_blocks.1.1.proj_in.lokr_w2"]


def test_loha_and_lokr_are_kept_by_kohya_and_comfy_and_refused_by_diffusers():
    g = torch.Generator().manual_seed(0)
    t = {f"lora_unet_input_blocks_4_1_proj_in.hada_{name}": torch.randn(shape, generator=g)
         for name, shape in (("w1_a", (640, 4)), ("w1_b", (4, 640)), ("w2_a", (640, 4)), ("w2_b", (4, 640)))}
    t["lora_unet_input_blocks_4_1_proj_in.alpha"] = torch.tensor(4.0)
    t["lora_unet_input_blocks_5_1_proj_in.lokr_w1"] = torch.randn(8, 8, generator=g)
    t["lora_unet_input_blocks_5_1_proj_in.lokr_w2"] = torch.randn(80, 80, generator=g)
    metadata = {"ss_base_model_version": "sdxl_base_v1-0"}
    comfy = convert_lora(t, metadata, "comfy")
    assert "diffusion_model.input_blocks.4.1.proj_in.hada_w1_a" in comfy.tensors
    assert_same(convert_lora(comfy.tensors, comfy.metadata, "kohya").tensors, t)
    assert comfy.metadata["ss_network_module"] == "lycoris.kohya"
    with pytest.raises(ConversionError, match="LoHa and LoKr.*kohya or ComfyUI"):
        convert_lora(t, metadata, "diffusers")


def test_text_encoder_norms_stay_comfy_only():
    t = {"text_encoders.clip_l.transformer.text_model.final_layer_norm.diff": torch.ones(768)}
    add_lora(t, "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1", 3072, 768)
    with pytest.raises(ConversionError, match="final_layer_norm.*ComfyUI format"):
        convert_lora(t, {}, "kohya", family="sd1")


# ----- which family -----

def test_family_from_metadata_names_and_shapes():
    t = kohya_sd1()
    assert parse_lora(t, {}).arch.name == "sd1"  # attn2.to_k reads 768 wide
    assert parse_lora(t, {"ss_base_model_version": "sd_v2"}, layout=SD1_ARCH.layout).arch.name == "sd2"
    assert parse_lora(kohya_sdxl(), {}).arch.name == "sdxl"  # lora_te2
    only_unet = {k: v for k, v in kohya_sd1().items() if "attn2_to_k" in k}
    wide = {k: torch.zeros(v.shape[0], 1024) if k.endswith("down.weight") else v for k, v in only_unet.items()}
    assert parse_lora(wide, {}).arch.name == "sd2"


def test_unknown_family_is_refused_with_the_fix():
    t = {}
    add_lora(t, "lora_unet_down_blocks_0_resnets_0_conv1", 320, 320, conv=True)
    with pytest.raises(UnknownArchitectureError, match="Name the family"):
        convert_lora(t, {}, "comfy")
    assert convert_lora(t, {}, "comfy", family="sd1").tensors


def test_a_lora_for_another_family_is_refused():
    with pytest.raises(ConversionError, match="names no layer of the SD 1.x text encoder"):
        convert_lora({"lora_te_text_model_encoder_layers_31_mlp_fc1.lora_up.weight": torch.zeros(2, 2),
                      "lora_te_text_model_encoder_layers_31_mlp_fc1.lora_down.weight": torch.zeros(2, 2)}, {}, "kohya",
                     family="sd1")
    with pytest.raises(ConversionError, match="in no format TuneKit knows"):
        convert_lora({"transformer.blocks.0.lora_A.weight": torch.zeros(2, 2)}, {}, "kohya", family="sd1")


# ----- metadata and files -----

def test_metadata_is_carried_completed_and_hashed(tmp_path):
    source = tmp_path / "in.safetensors"
    safetensors.torch.save_file(kohya_sd1(), str(source), {"ss_output_name": "mine", "ss_tag_frequency": "{}"})
    converted = convert_lora_file(source, tmp_path / "out.safetensors", "comfy")
    with safetensors.safe_open(str(tmp_path / "out.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_output_name"] == "mine" and metadata["ss_tag_frequency"] == "{}"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_network_dim"] == "4"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert len(metadata["sshs_model_hash"]) == 64
    assert json.loads(metadata["tunekit_conversion"]) == {"from": "kohya", "to": "comfy", "source": "in.safetensors"}
    assert converted.summary().startswith("SD 1.x LoRA, kohya -> comfy")


def test_never_overwrites_unasked(tmp_path):
    source, target = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    safetensors.torch.save_file(kohya_sd1(), str(source))
    target.write_bytes(b"mine")
    with pytest.raises(ConversionError, match="already exists"):
        convert_lora_file(source, target, "comfy")
    assert target.read_bytes() == b"mine"


def test_a_full_disk_while_writing_a_lora_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from tunekit.trainer.adapters import kohya

    source = tmp_path / "in.safetensors"
    safetensors.torch.save_file(kohya_sd1(), str(source))

    def fills_up(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kohya.safetensors.torch, "save_file", fills_up)
    with pytest.raises(ConversionError, match="disk filled up while writing 'out.safetensors'"):
        convert_lora_file(source, tmp_path / "out.safetensors", "comfy")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.safetensors"]
