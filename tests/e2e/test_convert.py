"""Conversion nodes in a real ComfyUI: converted LoRAs load with no key left behind and act exactly like
the original; a merged checkpoint samples like the base plus the LoRA at runtime; bad input fails clearly;
a converted diffusers folder's UNet computes what ComfyUI's does, and the nodes round-trip a checkpoint."""

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import comfy_host as harness
import tiny_models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from convert_fixtures import SMALL_UNETS, real_unet_modules, small_checkpoint
from tunekit.trainer.convert.diffusers_folder import single_file_to_diffusers
from tunekit.trainer.convert.lora_file import convert_lora

UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer."
TE_LAYERS = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$")


def lora_on_every_layer(family: str = "sd15", rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ComfyUI-format LoRA (what its own trainer saves) on every UNet linear and conv layer and every CLIP
    attention/MLP layer of a tiny checkpoint, strong enough to change a sample."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for key, (shape, _) in tiny_models.layout(family).items.items():
        if key.startswith(UNET) and key.endswith(".weight") and len(shape) in (2, 4):
            name = "diffusion_model." + key[len(UNET):-len(".weight")]
        elif key.startswith(TE) and TE_LAYERS.search(key):
            name = "text_encoders.clip_l.transformer." + key[len(TE):-len(".weight")]
        else:
            continue
        down_shape = (rank, *shape[1:])
        lora[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=g) / shape[1] ** 0.5
        lora[f"{name}.lora_up.weight"] = torch.randn((shape[0], rank, *([1, 1] if len(shape) == 4 else [])), generator=g) * 0.3
        lora[f"{name}.alpha"] = torch.tensor(1.0)
    return lora


@pytest.fixture(scope="module")
def sd15(comfy):
    """A tiny SD1.5 stored in the dtypes ComfyUI runs it in on CPU (UNet fp32, text encoder fp16), so the
    merged file and the runtime patch round the same numbers the same way."""
    path = comfy.models_dir / "checkpoints" / "tkconv_sd15.safetensors"
    if not path.exists():
        tiny_models.make_sd15(path, te_dtype="fp16")
    return path.name


@pytest.fixture(scope="module")
def loras(comfy):
    """The same LoRA written as ComfyUI saves it and as diffusers/PEFT saves it, in models/loras."""
    folder = comfy.models_dir / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    native = lora_on_every_layer()
    safetensors.torch.save_file(native, str(folder / "tkconv_native.safetensors"))
    peft = convert_lora(native, {}, "diffusers", family="sd1")
    safetensors.torch.save_file(peft.tensors, str(folder / "tkconv_peft.safetensors"), peft.metadata)
    return {"native": "tkconv_native.safetensors", "peft": "tkconv_peft.safetensors", "layers": len(native) // 3}


def sample(graph: dict, prefix: str, model, clip, steps: int = 2) -> dict:
    graph.update({
        f"{prefix}_text": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a red square"}},
        f"{prefix}_empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        f"{prefix}_sample": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [f"{prefix}_text", 0], "negative": [f"{prefix}_text", 0],
            "latent_image": [f"{prefix}_empty", 0], "seed": 3, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        f"{prefix}_save": {"class_type": "SaveLatent", "inputs": {"samples": [f"{prefix}_sample", 0],
                                                                 "filename_prefix": f"tkconv/{prefix}"}},
    })
    return graph


def with_lora(graph: dict, prefix: str, ckpt: str, lora: str, strength_model=1.0, strength_clip=1.0) -> dict:
    graph[f"{prefix}_ckpt"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}
    graph[f"{prefix}_lora"] = {"class_type": "LoraLoader", "inputs": {
        "model": [f"{prefix}_ckpt", 0], "clip": [f"{prefix}_ckpt", 1], "lora_name": lora,
        "strength_model": strength_model, "strength_clip": strength_clip}}
    return sample(graph, prefix, [f"{prefix}_lora", 0], [f"{prefix}_lora", 1])


def latents(comfy, history) -> dict[str, torch.Tensor]:
    found = {}
    for path in comfy.output_files(history):
        if path.suffix == ".latent":
            found[path.name.rsplit("_", 2)[0]] = safetensors.torch.load_file(str(path))["latent_tensor"].float()
    return found


def not_loaded(log: str) -> list[str]:
    return re.findall(r"lora key not loaded: (\S+)", log)


# The real models' UNet configs as ComfyUI's model detection writes them (comfy/supported_models.py).
REAL_CONFIGS = {
    "sd1": {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1},
    "sdxl": {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10},
}
COMFY_NAMES = """
import json, sys
import comfy.utils
for family, config in json.loads(sys.argv[1]).items():
    names = comfy.utils.unet_to_diffusers(config)
    print(json.dumps({family: {d[:-7]: l[:-7] for d, l in names.items() if d.endswith(".weight")}}))
"""


def test_layer_names_agree_with_comfyuis_own_table(comfy_host):
    """ComfyUI maps `lora_unet_<diffusers name>` through comfy.utils.unet_to_diffusers: ours must agree."""
    from tunekit.trainer.convert.arch import SD1_ARCH, SDXL_ARCH
    from tunekit.trainer.convert.unet_names import diffusers_to_ldm

    out = subprocess.run([str(comfy_host.python), "-c", COMFY_NAMES, json.dumps(REAL_CONFIGS)], cwd=comfy_host.comfy_dir,
                         env=comfy_host.env(), capture_output=True, text=True, check=True, timeout=120)
    tables = {family: table for line in out.stdout.splitlines() if line.startswith("{") for family, table in json.loads(line).items()}
    for family, arch in (("sd1", SD1_ARCH), ("sdxl", SDXL_ARCH)):
        real = set(real_unet_modules(family))  # ComfyUI's table also names layers the model does not have
        table = {d: ldm for d, ldm in tables[family].items() if ldm in real}
        assert set(table.values()) == real
        wrong = {d: (ldm, diffusers_to_ldm(d, arch.layout)) for d, ldm in table.items() if diffusers_to_ldm(d, arch.layout) != ldm}
        assert wrong == {}, f"{family}: {len(wrong)} names differ, e.g. {list(wrong.items())[:3]}"


@pytest.mark.every_host  # "lora key not loaded" is ComfyUI's behaviour: checked on each host users run
def test_converted_loras_load_with_no_key_left_behind_and_act_like_the_original(comfy, sd15, loras):
    stamp = uuid.uuid4().hex[:6]
    convert = {
        f"c{index}": {"class_type": "TuneKitConvertLoRA", "inputs": {
            "lora_name": loras[source], "to": "kohya", "family": "auto", "filename": f"tkconv_{source}_kohya_{stamp}"}}
        for index, source in enumerate(("native", "peft"))
    }
    comfy.run(convert)
    folder = comfy.models_dir / "loras"
    converted = {source: f"tkconv_{source}_kohya_{stamp}.safetensors" for source in ("native", "peft")}
    assert all((folder / name).exists() for name in converted.values())

    graph = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15}}}
    sample(graph, "base", ["ckpt", 0], ["ckpt", 1])
    # The diffusers file itself rides along as the control: ComfyUI maps `unet.<diffusers name>` but not the
    # attention projections in their PEFT form (it expects `attn1.processor.to_q`, FORMATS.md), so exactly
    # those must be reported, and nothing from the converted files.
    files = {"native": loras["native"], "peft_raw": loras["peft"], **{f"{k}_kohya": v for k, v in converted.items()}}
    for name, lora in files.items():
        graph[f"{name}_lora"] = {"class_type": "LoraLoader", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": lora, "strength_model": 1.0, "strength_clip": 1.0}}
        sample(graph, name, [f"{name}_lora", 0], [f"{name}_lora", 1])
    mark = comfy.log_mark()
    results = latents(comfy, comfy.run(graph))
    missing = not_loaded(comfy.log_text(mark))
    peft_attention = sorted(key for key in safetensors.torch.load_file(str(folder / loras["peft"]))
                            if key.startswith("unet.") and re.search(r"\.attn[12]\.to_", key))
    assert peft_attention and sorted(missing) == peft_attention, sorted(set(missing) ^ set(peft_attention))[:3]
    assert not torch.allclose(results["base"], results["native"], atol=1e-3), "the LoRA changed nothing: the test proves nothing"
    assert torch.equal(results["native_kohya"], results["native"])
    assert torch.equal(results["peft_kohya"], results["native"])


def test_a_merged_checkpoint_samples_like_the_base_plus_the_lora(comfy, sd15, loras):
    name = f"tkconv_merged_{uuid.uuid4().hex[:6]}"
    graph = {"merge": {"class_type": "TuneKitMergeLoRA", "inputs": {
        "ckpt_name": sd15, "lora_name": loras["native"], "strength_model": 0.8, "strength_clip": 0.6,
        "lora_name_2": "none", "strength_model_2": 1.0, "strength_clip_2": 1.0, "precision": "keep", "filename": name}}}
    sample(graph, "merged_node", ["merge", 0], ["merge", 1])
    with_lora(graph, "runtime", sd15, loras["native"], 0.8, 0.6)
    results = latents(comfy, comfy.run(graph))
    results.update(latents(comfy, comfy.run(sample({"m_ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {
        "ckpt_name": f"{name}.safetensors"}}}, "merged_file", ["m_ckpt", 0], ["m_ckpt", 1]))))
    # The same float32 arithmetic on the same stored dtypes: not close, equal.
    assert torch.equal(results["merged_node"], results["runtime"])
    assert torch.equal(results["merged_file"], results["runtime"])


def test_a_lora_for_another_model_is_refused_with_a_clear_message_and_no_file(comfy, sd15):
    safetensors.torch.save_file({
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 2),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 1280),
    }, str(comfy.models_dir / "loras" / "tkconv_sdxl_only.safetensors"))
    name = f"tkconv_bad_{uuid.uuid4().hex[:6]}"
    with pytest.raises(harness.WorkflowFailed, match="is a SDXL LoRA but the checkpoint is SD 1.x"):
        comfy.run({"merge": {"class_type": "TuneKitMergeLoRA", "inputs": {
            "ckpt_name": sd15, "lora_name": "tkconv_sdxl_only.safetensors", "strength_model": 1.0, "strength_clip": 1.0,
            "lora_name_2": "none", "strength_model_2": 1.0, "strength_clip_2": 1.0, "precision": "keep", "filename": name}}})
    assert not list((comfy.models_dir / "checkpoints").glob(f"{name}*")) and not list((comfy.models_dir / "checkpoints").glob(".*tmp"))


# ----- diffusers folders -----

UNETS_AGREE = """
import json, sys
args = sys.argv[1:]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import safetensors.torch, torch
import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding
from diffusers import UNet2DConditionModel

def compare(checkpoint, folder, config):
    weights = safetensors.torch.load_file(checkpoint)
    prefix = "model.diffusion_model."
    comfy_unet = UNetModel(**config, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    comfy_unet.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)
    theirs = UNet2DConditionModel.from_pretrained(folder + "/unet", local_files_only=True).eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 31.0])
    context = torch.randn(2, 77, config["context_dim"], generator=g)
    y, extra = None, {}
    if config.get("adm_in_channels"):  # SDXL: pooled text + size/crop ids, embedded the way ComfyUI's SDXL does
        pooled = torch.randn(2, 1280, generator=g)
        ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512.0, 768, 16, 0, 512, 768]])
        y = torch.cat([pooled, timestep_embedding(ids.flatten(), 256).reshape(2, -1)], dim=1)
        extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
    with torch.no_grad():
        ours = comfy_unet(x, timesteps=t, context=context, y=y)
        out = theirs(x, t, encoder_hidden_states=context, **extra).sample
    return {"max_abs_diff": (ours - out).abs().max().item(), "mean_abs": ours.abs().mean().item()}


print(json.dumps({family: compare(*job) for family, job in json.loads(args[0]).items()}))
"""


def test_the_diffusers_unet_computes_what_comfyuis_computes(comfy_host, tmp_path):
    """Each converted folder's UNet, run by diffusers, against ComfyUI's own UNet class on the original weights."""
    jobs = {}
    for family, unet in SMALL_UNETS.items():
        checkpoint = tmp_path / f"{family}.safetensors"
        safetensors.torch.save_file(small_checkpoint(family), str(checkpoint))
        single_file_to_diffusers(checkpoint, tmp_path / family)
        heads = {"num_heads": 8, "num_head_channels": -1} if family == "sd1" else {"num_heads": -1, "num_head_channels": 64}
        config = {**unet, **heads, "in_channels": 4, "out_channels": 4, "image_size": 32, "use_spatial_transformer": True,
                  "legacy": False, **({"num_classes": "sequential"} if unet["adm_in_channels"] else {})}
        jobs[family] = [str(checkpoint), str(tmp_path / family), config]
    # Without the host's import-only torchvision stand-in (transformers would take it for the real one).
    env = {**comfy_host.env(), "PYTHONPATH": str(comfy_host.comfy_dir)}
    out = subprocess.run([str(comfy_host.python), "-c", UNETS_AGREE, json.dumps(jobs)], cwd=comfy_host.comfy_dir,
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.splitlines()[-1])
    assert sorted(results) == ["sd1", "sd2", "sdxl"]
    for family, result in results.items():
        assert result["mean_abs"] > 0.1 and result["max_abs_diff"] < 1e-4, (family, result)


def test_checkpoint_to_diffusers_and_back_through_the_nodes(comfy):
    name = f"tkconv_kl_{uuid.uuid4().hex[:6]}"
    source = comfy.models_dir / "checkpoints" / f"{name}.safetensors"
    tiny_models.make_sd15(source, vae="kl", te_dtype="fp16")  # diffusers needs a KL VAE, not TAESD
    comfy.run({"to": {"class_type": "TuneKitCheckpointToDiffusers", "inputs": {
        "ckpt_name": source.name, "prediction_type": "auto", "folder_name": name}}})
    folder = comfy.models_dir / "diffusers" / name
    assert (folder / "model_index.json").exists() and (folder / "tokenizer" / "vocab.json").exists()
    comfy.run({"back": {"class_type": "TuneKitDiffusersToCheckpoint", "inputs": {"folder": name, "filename": f"{name}_back"}}})
    original = safetensors.torch.load_file(str(source))
    back = safetensors.torch.load_file(str(comfy.models_dir / "checkpoints" / f"{name}_back.safetensors"))
    assert sorted(back) == sorted(original) and all(torch.equal(back[key], value) for key, value in original.items())
