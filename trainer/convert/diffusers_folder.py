"""Single-file checkpoint <-> diffusers folder for SD1, SD2 (incl. v-prediction) and SDXL, offline.

The folder gets every config from the weights (diffusers_configs), each model's tensors in
safetensors (streamed, one tensor at a time), and `tunekit_extra.safetensors` with what diffusers'
models cannot hold, so the way back is exact. The folder appears only when complete (written beside it,
then renamed).
"""

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files import atomic_write
from .arch import ARCHS, UNET_PREFIX, Arch, arch_from_checkpoint_keys
from .diffusers_configs import (
    clip_config,
    diffusers_layers,
    scheduler_config,
    tokenizer_config,
    unet_config,
    vae_config,
)
from .diffusers_keys import (
    SIDECAR,
    VAE_PREFIX,
    Recipe,
    hf_to_openclip,
    text_encoder_keys,
    unet_from_diffusers,
    unet_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
)
from .errors import ConversionError
from .io import guarded_write, refuse_existing
from .tensor_files import TensorSource, TensorSpec, write_streaming
from .unet_names import UNetLayout, layout_from_keys

log = logging.getLogger("tunekit.convert")
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
           "text_encoder_2": "model"}
TOKENIZER_FILES = ("vocab.json", "merges.txt")


@dataclass
class FolderReport:
    destination: Path
    tensors: dict[str, int]
    extra: int  # tensors kept in the sidecar (or, on the way back, filled in)
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = ", ".join(f"{name} {count}" for name, count in self.tensors.items())
        return (f"Wrote {self.destination.name}: {parts} tensors, {self.extra} kept aside, {self.seconds:.1f} s"
                + ("; " + "; ".join(self.notes) if self.notes else ""))


def _encoder_component(component: str) -> str:
    return "text_encoder" if component == "te1" else "text_encoder_2"


def _is_v_prediction(source: TensorSource, arch: Arch, prediction_type: str | None) -> bool:
    if prediction_type:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConversionError(f"prediction_type '{prediction_type}' is not 'epsilon' or 'v_prediction'.")
        return prediction_type == "v_prediction"
    # ComfyUI reads SDXL v-prediction from these keys; SD2-v is announced by metadata when at all.
    return "v_pred" in source.specs or source.metadata.get("modelspec.prediction_type", "").startswith("v")


def plan_to_diffusers(source: TensorSource, arch: Arch, layout: UNetLayout) -> dict[str, dict[str, Recipe]]:
    """{component: {key in its file: recipe over single-file keys}}; the rest goes to the sidecar."""
    plan: dict[str, dict[str, Recipe]] = {"unet": {}, "vae": {}}
    used: set[str] = set()
    vae_levels = len({key.split(".")[3] for key in source.specs if key.startswith(VAE_PREFIX + "decoder.up.")})
    for key in source.specs:
        if key.startswith(UNET_PREFIX) and (name := unet_to_diffusers(key, layout)):
            plan["unet"][name] = Recipe((key,))
        elif key.startswith(VAE_PREFIX) and (mapped := vae_to_diffusers(key[len(VAE_PREFIX):], vae_levels)):
            plan["vae"][mapped[0]] = Recipe((key,), mapped[1])
    for encoder in arch.text_encoders:
        keys = [key for key in source.specs if key.startswith(encoder.checkpoint_prefix)]
        layers = diffusers_layers(source.specs, encoder, arch.name)
        plan[_encoder_component(encoder.component)] = text_encoder_keys(encoder, keys, layers, encoder.component == "te2")
    for recipes in plan.values():
        for recipe in recipes.values():
            used.update(recipe.sources)
    plan[SIDECAR] = {key: Recipe((key,)) for key in source.specs if key not in used}
    return plan


def _specs(source: TensorSource, recipes: dict[str, Recipe]) -> dict[str, TensorSpec]:
    """Output shapes without reading data: build each recipe on meta tensors."""
    specs = {}
    for name, recipe in recipes.items():
        metas = [torch.empty(source.specs[key].shape, dtype=source.specs[key].dtype, device="meta") for key in recipe.sources]
        out = recipe.build(metas)
        specs[name] = TensorSpec(out.dtype, tuple(out.shape))
    return specs


def _write_component(folder: Path, name: str, source, recipes: dict[str, Recipe], config: dict | None) -> int:
    if not recipes:
        return 0
    target = folder if name == SIDECAR else folder / name
    target.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    file = target / f"{WEIGHTS.get(name, SIDECAR)}.safetensors"
    write_streaming(file, _specs(source, recipes), lambda key: recipes[key].build([source.get(k) for k in recipes[key].sources]))
    return len(recipes)


def _write_tokenizer(folder: Path, name: str, tokenizer_dir: Path, openclip: bool) -> None:
    (folder / name).mkdir(parents=True, exist_ok=True)
    for file in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / file, folder / name / file)
    config = tokenizer_config(openclip)
    (folder / name / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {key: config[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / name / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def _model_index(arch: Arch, tokenizers: bool) -> dict:
    index = {"_class_name": "StableDiffusionXLPipeline" if arch.name == "sdxl" else "StableDiffusionPipeline",
             "_diffusers_version": "0.30.0", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"] if tokenizers else [None, None]}
    if arch.name == "sdxl":
        index.update({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"] if tokenizers else [None, None],
                      "force_zeros_for_empty_prompt": True})
    else:
        index.update({"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False})
    return index


def single_file_to_diffusers(source_path: Path, destination: Path, prediction_type: str | None = None,
                             tokenizer_dir: Path | None = None, overwrite: bool = False) -> FolderReport:
    """`tokenizer_dir`: a folder with CLIP's vocab.json and merges.txt (ComfyUI ships one in comfy/sd1_tokenizer)."""
    destination = refuse_existing(Path(destination), overwrite)
    began, notes = time.monotonic(), []
    with TensorSource(source_path) as source:
        arch, layout = arch_from_checkpoint_keys(source.specs), layout_from_keys(source.specs)
        v_prediction = _is_v_prediction(source, arch, prediction_type)
        plan = plan_to_diffusers(source, arch, layout)
        configs = {"unet": unet_config(source.specs, arch, layout, v_prediction),
                   "vae": vae_config(source.specs, arch, VAE_PREFIX)}
        for encoder in arch.text_encoders:
            layers = diffusers_layers(source.specs, encoder, arch.name)
            configs[_encoder_component(encoder.component)] = clip_config(source.specs, encoder, layers, encoder.component == "te2")
        temp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
        try:
            counts = guarded_write(destination, lambda: {
                name: _write_component(temp, name, source, recipes, configs.get(name)) for name, recipes in plan.items()})
            (temp / "scheduler").mkdir()
            (temp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(v_prediction), indent=2))
            if tokenizer_dir:
                for encoder in arch.text_encoders:
                    _write_tokenizer(temp, "tokenizer" if encoder.component == "te1" else "tokenizer_2", Path(tokenizer_dir),
                                     encoder.openclip)
            else:
                notes.append("no tokenizer written (give a folder with CLIP's vocab.json and merges.txt)")
            (temp / "model_index.json").write_text(json.dumps(_model_index(arch, bool(tokenizer_dir)), indent=2))
            if destination.exists() and overwrite:
                shutil.rmtree(destination)
            os.replace(temp, destination)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    extra = counts.pop(SIDECAR, 0)
    if extra:
        notes.append(f"{extra} tensors diffusers has no place for are in {SIDECAR}.safetensors")
    report = FolderReport(destination, counts, extra, time.monotonic() - began, notes)
    log.info("TuneKit: %s", report.summary())
    return report


# ----- back to a single file -----

class FolderSource:
    """Every tensor of a diffusers folder, by `<component>/<key>`, read one at a time."""

    def __init__(self, folder: Path, components: list[str]):
        self.sources: dict[str, TensorSource] = {}
        self.specs: dict[str, TensorSpec] = {}
        self._owner: dict[str, tuple[TensorSource, str]] = {}
        for component in components:
            for file in _weight_files(folder, component):
                source = self.sources[str(file)] = TensorSource(file)
                for key, spec in source.specs.items():
                    name = f"{component}/{key}"
                    self.specs[name], self._owner[name] = spec, (source, key)

    def get(self, name: str) -> torch.Tensor:
        source, key = self._owner[name]
        return source.get(key)

    def close(self) -> None:
        for source in self.sources.values():
            source.close()


def _weight_files(folder: Path, component: str) -> list[Path]:
    if component == SIDECAR:
        return [folder / f"{SIDECAR}.safetensors"] if (folder / f"{SIDECAR}.safetensors").exists() else []
    base = folder / component / WEIGHTS[component]
    index = base.with_name(base.name + ".safetensors.index.json")
    if index.exists():  # sharded
        return sorted({folder / component / name for name in json.loads(index.read_text())["weight_map"].values()})
    for suffix in (".safetensors", ".bin"):
        if base.with_suffix(suffix).exists():
            return [base.with_suffix(suffix)]
    raise ConversionError(f"'{folder.name}' has no weights for {component} ({base.name}.safetensors): is it a complete "
                          "diffusers folder?")


def _folder_arch(folder: Path) -> tuple[Arch, UNetLayout, dict]:
    try:
        index = json.loads((folder / "model_index.json").read_text())
        unet = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"'{folder}' is not a diffusers pipeline folder (model_index.json, unet/config.json): {error}") from None
    if "text_encoder_2" in index:
        arch = ARCHS["sdxl"]
    elif unet.get("cross_attention_dim") == 1024:
        arch = ARCHS["sd2"]
    elif unet.get("cross_attention_dim") == 768:
        arch = ARCHS["sd1"]
    else:
        raise ConversionError(f"'{folder.name}' is a {index.get('_class_name')} with cross_attention_dim "
                              f"{unet.get('cross_attention_dim')}: not SD1, SD2 or SDXL.")
    per_level = unet["layers_per_block"]
    levels = len(unet["down_block_types"])
    res_blocks = tuple(per_level if isinstance(per_level, list) else [per_level] * levels)
    attention = tuple("CrossAttn" in kind for kind in unet["down_block_types"])
    return arch, UNetLayout(res_blocks, attention), index


def plan_from_diffusers(source: FolderSource, arch: Arch, layout: UNetLayout, vae_levels: int) -> dict[str, Recipe]:
    plan: dict[str, Recipe] = {}
    for name in source.specs:
        component, _, key = name.partition("/")
        if component == "unet":
            target = unet_from_diffusers(key, layout)
            recipe = Recipe((name,))
        elif component == "vae":
            mapped = vae_from_diffusers(key, vae_levels)
            target, recipe = (VAE_PREFIX + mapped[0], Recipe((name,), mapped[1])) if mapped else (None, None)
        elif component == SIDECAR:
            target, recipe = key, Recipe((name,))
        else:
            target, recipe = _encoder_key(arch, component, key, name)
            if target == "":
                continue  # k/v of a fused q/k/v: written with q
        if target is None:
            raise ConversionError(f"'{name}' has no place in an {arch.title} single-file checkpoint: the folder holds a "
                                  "model TuneKit does not know.")
        plan[target] = recipe
    return plan


def _encoder_key(arch: Arch, component: str, key: str, name: str) -> tuple[str | None, Recipe | None]:
    encoder = arch.text_encoder("te1" if component == "text_encoder" else "te2")
    if not encoder.openclip:
        return encoder.checkpoint_prefix + key, Recipe((name,))
    if key == "text_projection.weight":
        return encoder.checkpoint_prefix + "text_projection", Recipe((name,), lambda tensors: tensors[0].t().contiguous())
    mapped = hf_to_openclip(key)
    if mapped is None:
        return ("" if key.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")) else None), None
    target, recipe = mapped
    return encoder.checkpoint_prefix + target, Recipe(tuple(f"{component}/{source}" for source in recipe.sources), recipe.build)


def _constant(tensor: torch.Tensor) -> Recipe:
    return Recipe((), lambda _: tensor)


def fill_openclip_gaps(plan: dict[str, Recipe], specs: dict[str, TensorSpec], arch: Arch, notes: list[str]) -> None:
    """A folder diffusers made (no sidecar) lacks what SD2/SDXL single files carry for OpenCLIP: SD2's last
    layer, the text projection, the logit scale. ComfyUI conditions SD2 on the penultimate layer, so the
    missing last layer is filled as an identity layer (zero output projections: the residual passes through),
    which keeps "penultimate" pointing at the layer diffusers kept; the projection gets the identity."""
    for encoder in (e for e in arch.text_encoders if e.openclip):
        p = encoder.checkpoint_prefix
        if f"{p}logit_scale" in plan:
            continue
        width = specs[f"{p}token_embedding.weight"].shape[1]
        dtype = specs[f"{p}token_embedding.weight"].dtype
        mlp = specs[f"{p}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        filled = {f"{p}logit_scale": torch.tensor(4.6052, dtype=dtype)}
        if f"{p}text_projection" not in plan:
            filled[f"{p}text_projection"] = torch.eye(width, dtype=dtype)
        if arch.name == "sd2":
            layer = 1 + max(int(m.group(1)) for key in plan
                            if (m := re.match(re.escape(p) + r"transformer\.resblocks\.(\d+)\.", key)))
            q = f"{p}transformer.resblocks.{layer}."
            filled.update({f"{q}ln_1.weight": torch.ones(width, dtype=dtype), f"{q}ln_1.bias": torch.zeros(width, dtype=dtype),
                           f"{q}attn.in_proj_weight": torch.zeros(3 * width, width, dtype=dtype),
                           f"{q}attn.in_proj_bias": torch.zeros(3 * width, dtype=dtype),
                           f"{q}attn.out_proj.weight": torch.zeros(width, width, dtype=dtype),
                           f"{q}attn.out_proj.bias": torch.zeros(width, dtype=dtype),
                           f"{q}ln_2.weight": torch.ones(width, dtype=dtype), f"{q}ln_2.bias": torch.zeros(width, dtype=dtype),
                           f"{q}mlp.c_fc.weight": torch.zeros(mlp, width, dtype=dtype), f"{q}mlp.c_fc.bias": torch.zeros(mlp, dtype=dtype),
                           f"{q}mlp.c_proj.weight": torch.zeros(width, mlp, dtype=dtype),
                           f"{q}mlp.c_proj.bias": torch.zeros(width, dtype=dtype)})
        plan.update({key: _constant(value) for key, value in filled.items()})
        specs.update({key: TensorSpec(value.dtype, tuple(value.shape)) for key, value in filled.items()})
        what = ["an identity last layer"] * (arch.name == "sd2") + ["the text projection"] * (f"{p}text_projection" in filled)
        notes.append(f"{encoder.comfy_name}: filled {len(filled)} tensors a diffusers folder does not keep "
                     f"({', '.join([*what, 'the logit scale'])})")


def diffusers_to_single_file(folder: Path, destination: Path, overwrite: bool = False) -> FolderReport:
    folder, destination = Path(folder), refuse_existing(Path(destination), overwrite)
    began = time.monotonic()
    arch, layout, _ = _folder_arch(folder)
    components = ["unet", "vae", "text_encoder", *(["text_encoder_2"] if arch.name == "sdxl" else []), SIDECAR]
    vae_levels = len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"])
    source = FolderSource(folder, components)
    try:
        plan = plan_from_diffusers(source, arch, layout, vae_levels)
        metas = {key: torch.empty(spec.shape, dtype=spec.dtype, device="meta") for key, spec in source.specs.items()}
        specs = {key: TensorSpec(out.dtype, tuple(out.shape)) for key, recipe in plan.items()
                 for out in [recipe.build([metas[name] for name in recipe.sources])]}
        notes: list[str] = []
        fill_openclip_gaps(plan, specs, arch, notes)
        guarded_write(destination, lambda: atomic_write(destination, lambda temp: write_streaming(
            temp, specs, lambda key: plan[key].build([source.get(name) for name in plan[key].sources]),
            {"tunekit_conversion": json.dumps({"from": "diffusers", "source": folder.name})})))
    finally:
        source.close()
    counts: dict[str, int] = {}
    for key in plan:
        counts[key.split(".")[0]] = counts.get(key.split(".")[0], 0) + 1
    report = FolderReport(destination, counts, sum(1 for name in source.specs if name.startswith(SIDECAR)),
                          time.monotonic() - began, notes)
    log.info("TuneKit: %s", report.summary())
    return report
