"""Single-file checkpoint <-> diffusers folder: exact round trips, configs from the weights, offline loading."""

import json
import re

import pytest
import safetensors.torch
import torch
from convert_fixtures import kohya_sd1, needs, real_unet_modules, run_python, small_checkpoint
from tunekit.trainer.convert.arch import SD1_ARCH
from tunekit.trainer.convert.diffusers_folder import diffusers_to_single_file, single_file_to_diffusers
from tunekit.trainer.convert.errors import ConversionError
from tunekit.trainer.convert.lora_file import convert_lora
from tunekit.trainer.convert.unet_names import ldm_to_diffusers


def write_tokenizer(folder):
    """A stand-in CLIP BPE vocabulary (the real one ships with ComfyUI and transformers' hub models)."""
    folder.mkdir()
    vocab = {"<|startoftext|>": 49406, "<|endoftext|>": 49407, "!": 0, "a</w>": 1, "r": 2, "e": 3, "d</w>": 4}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


@pytest.fixture
def tokenizer(tmp_path):
    return write_tokenizer(tmp_path / "tokenizer")


def checkpoint(tmp_path, family, metadata=None):
    path = tmp_path / f"{family}.safetensors"
    safetensors.torch.save_file(small_checkpoint(family), str(path), metadata)
    return path


@pytest.mark.parametrize("family, prediction, kept_aside", [("sd1", None, 1), ("sd2", "v_prediction", 15), ("sdxl", None, 2)])
def test_single_file_to_diffusers_and_back_is_exact(tmp_path, tokenizer, family, prediction, kept_aside):
    source = checkpoint(tmp_path, family)
    report = single_file_to_diffusers(source, tmp_path / "folder", prediction, tokenizer)
    assert report.extra == kept_aside  # alphas_cumprod; SD2: its last CLIP layer, projection and logit scale too
    back = diffusers_to_single_file(tmp_path / "folder", tmp_path / "back.safetensors")
    original, returned = safetensors.torch.load_file(str(source)), safetensors.torch.load_file(str(tmp_path / "back.safetensors"))
    assert sorted(returned) == sorted(original)
    assert all(returned[key].dtype == value.dtype and torch.equal(returned[key], value) for key, value in original.items())
    scheduler = json.loads((tmp_path / "folder" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == (prediction or "epsilon")
    assert back.extra == kept_aside


def test_configs_come_from_the_weights(tmp_path, tokenizer):
    single_file_to_diffusers(checkpoint(tmp_path, "sdxl"), tmp_path / "xl", tokenizer_dir=tokenizer)
    unet = json.loads((tmp_path / "xl" / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [64, 64, 128] and unet["transformer_layers_per_block"] == [1, 1, 2]
    assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet["addition_embed_type"] == "text_time" and unet["projection_class_embeddings_input_dim"] == 2816
    te2 = json.loads((tmp_path / "xl" / "text_encoder_2" / "config.json").read_text())
    assert te2["architectures"] == ["CLIPTextModelWithProjection"] and te2["num_hidden_layers"] == 3
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]


DIFFUSERS_VIEW = """
import json, sys
import diffusers, transformers
root = sys.argv[1]
view = {}
for family in ("sd1", "sd2", "sdxl"):
    problems = {}
    for name, loader in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL),
                         ("text_encoder", transformers.CLIPTextModel)):
        _, info = loader.from_pretrained(f"{root}/{family}/{name}", output_loading_info=True, local_files_only=True)
        problems[name] = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"])
    pipeline = diffusers.DiffusionPipeline.from_pretrained(f"{root}/{family}", local_files_only=True)
    view[family] = {"pipeline": type(pipeline).__name__, "problems": problems,
                    "prediction": pipeline.scheduler.config.prediction_type}
unet = diffusers.UNet2DConditionModel(  # SD1 at 1/10 the width: names are all that matter
    block_out_channels=(32, 64, 128, 128), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    norm_num_groups=8, sample_size=8)
view["sd1_unet_weights"] = sorted(name for name, _ in unet.named_parameters() if name.endswith(".weight"))
# diffusers' own reading of a kohya file (its converter needs no PEFT): which modules, which alphas
state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(f"{root}/kohya.safetensors")
view["kohya_keys"] = sorted(state)
view["kohya_alphas"] = {key: float(value) for key, value in alphas.items()}
print(json.dumps(view))
"""


@pytest.fixture(scope="module")
def diffusers_view(tmp_path_factory):
    """What diffusers itself makes of TuneKit's folders, in one fresh interpreter (imports take seconds)."""
    needs("diffusers")
    root = tmp_path_factory.mktemp("folders")
    tokenizer = write_tokenizer(root / "tokenizer")
    for family in ("sd1", "sd2", "sdxl"):
        single_file_to_diffusers(checkpoint(root, family), root / family, "v_prediction" if family == "sd2" else None,
                                 tokenizer)
    safetensors.torch.save_file(kohya_sd1(), str(root / "kohya.safetensors"))
    return json.loads(run_python(DIFFUSERS_VIEW, str(root)).splitlines()[-1])


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_folder_loads_in_diffusers_offline_with_every_weight_used(diffusers_view, family):
    assert diffusers_view[family]["problems"] == {"unet": [], "vae": [], "text_encoder": []}
    assert diffusers_view[family]["pipeline"] == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    assert diffusers_view[family]["prediction"] == ("v_prediction" if family == "sd2" else "epsilon")


def _module(diffusers_key: str) -> str:
    """diffusers' older in-memory names (`attn1.processor.to_q_lora.down.weight`, `self_attn.to_q_lora...`) as
    module paths."""
    module = re.sub(r"(_lora)?\.(lora\.|lora_linear_layer\.)?(up|down)\.weight$|\.lora_[AB]\.weight$", "", diffusers_key).replace(".processor.", ".")
    module = re.sub(r"self_attn\.to_(q|k|v)$", r"self_attn.\1_proj", module).replace("self_attn.to_out", "self_attn.out_proj")
    return re.sub(r"\.to_out$", ".to_out.0", module)


def test_diffusers_reads_a_kohya_file_as_the_modules_tunekit_writes(diffusers_view):
    """diffusers' own kohya reader (no PEFT needed) and TuneKit's diffusers output name the same layers."""
    ours = convert_lora(kohya_sd1(), {}, "diffusers")
    assert sorted({_module(key) for key in diffusers_view["kohya_keys"]}) == sorted({_module(key) for key in ours.tensors})
    assert len(diffusers_view["kohya_alphas"]) == len({_module(key) for key in ours.tensors})


def test_unet_layer_names_agree_with_a_real_diffusers_unet(diffusers_view):
    ours = {ldm_to_diffusers(path, SD1_ARCH.layout) + ".weight" for path in real_unet_modules("sd1")}
    assert ours == set(diffusers_view["sd1_unet_weights"])


def test_a_folder_diffusers_made_gets_what_it_lacks_filled_and_reported(tmp_path, tokenizer):
    single_file_to_diffusers(checkpoint(tmp_path, "sd2"), tmp_path / "folder", tokenizer_dir=tokenizer)
    (tmp_path / "folder" / "tunekit_extra.safetensors").unlink()  # as diffusers itself would have written it
    report = diffusers_to_single_file(tmp_path / "folder", tmp_path / "back.safetensors")
    back = safetensors.torch.load_file(str(tmp_path / "back.safetensors"))
    layer = "cond_stage_model.model.transformer.resblocks.2."
    assert torch.equal(back[f"{layer}attn.out_proj.weight"], torch.zeros(64, 64))  # identity: the residual passes
    assert torch.equal(back["cond_stage_model.model.text_projection"], torch.eye(64))
    assert "identity last layer" in report.summary()
    assert set(small_checkpoint("sd2")) - set(back) == {"alphas_cumprod"}


def test_what_diffusers_cannot_hold_is_refused_clearly(tmp_path):
    taesd = tmp_path / "taesd.safetensors"  # tiny_models' default VAE is TAESD; diffusers' AutoencoderKL is not
    weights = {key: value for key, value in small_checkpoint("sd1").items() if not key.startswith("first_stage_model.")}
    weights["first_stage_model.taesd_encoder.0.weight"] = torch.zeros(64, 3, 3, 3)
    safetensors.torch.save_file(weights, str(taesd))
    with pytest.raises(ConversionError, match="not a KL autoencoder.*TAESD"):
        single_file_to_diffusers(taesd, tmp_path / "folder")
    assert list(tmp_path.iterdir()) == [taesd]
    with pytest.raises(ConversionError, match="not a diffusers pipeline folder"):
        diffusers_to_single_file(tmp_path, tmp_path / "x.safetensors")


def test_never_overwrites_a_folder_unasked(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        single_file_to_diffusers(checkpoint(tmp_path, "sd1"), tmp_path / "folder")


def test_a_failed_write_leaves_no_folder(tmp_path, monkeypatch):
    from tunekit.trainer.convert import diffusers_folder

    def fails(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(diffusers_folder, "write_streaming", fails)
    with pytest.raises(ConversionError, match="disk filled up"):
        single_file_to_diffusers(checkpoint(tmp_path, "sd1"), tmp_path / "folder")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sd1.safetensors"]


LOAD_LORA = """
import json, sys
import diffusers, torch
root = sys.argv[1]
torch.manual_seed(0)
sample, timestep, context = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 768)
tokens = torch.randint(0, 49407, (1, 77))

def outputs(pipeline):
    with torch.no_grad():
        return (pipeline.unet(sample, timestep, context).sample, pipeline.text_encoder(tokens)[0])

base = diffusers.StableDiffusionPipeline.from_pretrained(f"{root}/base", local_files_only=True)
before = outputs(base)
base.load_lora_weights(f"{root}/extracted.safetensors")
after = outputs(base)
tuned = outputs(diffusers.StableDiffusionPipeline.from_pretrained(f"{root}/tuned", local_files_only=True))
print(json.dumps({part: {"lora_vs_tuned": (after[i] - tuned[i]).abs().max().item(),
                         "base_vs_tuned": (before[i] - tuned[i]).abs().max().item()}
                  for i, part in enumerate(("unet", "text_encoder"))}))
"""


def test_a_kohya_lora_tunekit_extracts_loads_in_diffusers_and_gives_the_tuned_model(tmp_path, tokenizer):
    """diffusers' load_lora_weights (through PEFT) on a kohya file TuneKit wrote: the base pipeline with it
    computes what the tuned checkpoint computes, for a UNet attention layer, a 3x3 conv and text-encoder layers."""
    needs("diffusers")
    needs("peft")
    from tunekit.trainer.convert.extract import ExtractOptions, extract_lora_file

    base = checkpoint(tmp_path, "sd1")
    weights, generator = safetensors.torch.load_file(str(base)), torch.Generator().manual_seed(7)
    unet = "model.diffusion_model."
    weights[f"{unet}input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"] += torch.randn(64, 64, generator=generator) * 0.2
    weights[f"{unet}input_blocks.1.0.in_layers.2.weight"] += torch.randn(64, 64, 3, 3, generator=generator) * 0.05
    # diffusers recognises a text-encoder LoRA by an out_proj among its layers (as every real one has)
    for projection in ("q_proj", "out_proj"):
        key = f"cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.{projection}.weight"
        weights[key] += torch.randn(64, 64, generator=generator) * 0.2
    tuned = tmp_path / "tuned.safetensors"
    safetensors.torch.save_file(weights, str(tuned))
    report = extract_lora_file(tuned, base, tmp_path / "extracted.safetensors",
                               ExtractOptions(rank=64, conv=True, dtype=torch.float32))
    assert report.layers == 4
    for name, source in (("base", base), ("tuned", tuned)):
        single_file_to_diffusers(source, tmp_path / name, tokenizer_dir=tokenizer)
    distances = json.loads(run_python(LOAD_LORA, str(tmp_path)).splitlines()[-1])
    for part, distance in distances.items():
        assert distance["base_vs_tuned"] > 1e-2, (part, distance)  # the change is visible...
        assert distance["lora_vs_tuned"] < 1e-4, (part, distance)  # ...and the LoRA reproduces it
