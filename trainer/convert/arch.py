"""What conversion needs to know about SD1, SD2 and SDXL files: where each part lives in a single-file
checkpoint, what each LoRA format calls its text encoders, and the metadata other UIs read (FORMATS.md)."""

from dataclasses import dataclass

from ..families import SD1, SDXL
from .errors import UnknownArchitectureError
from .unet_names import UNetLayout

UNET_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class TextEncoder:
    component: str  # "te1" or "te2": TuneKit's own name, the same in every format
    kohya_prefix: str  # lora_te (SD1/SD2), lora_te1 / lora_te2 (SDXL)
    peft_prefix: str  # diffusers pipeline attribute: text_encoder / text_encoder_2
    comfy_name: str  # ComfyUI's CLIP submodule: clip_l / clip_h / clip_g
    checkpoint_prefix: str  # where its weights live in a single-file checkpoint
    openclip: bool  # stored in OpenCLIP layout there (fused q/k/v `in_proj`), HF layout otherwise
    width: int
    layers: int


@dataclass(frozen=True)
class Arch:
    name: str
    title: str
    base_model_version: str  # kohya `ss_base_model_version`
    v2: bool  # kohya `ss_v2`
    modelspec_architecture: str
    layout: UNetLayout  # the real model's; tiny test models pass their own
    kohya_unet_diffusers_names: bool  # kohya names SD1/SD2 UNet layers the diffusers way, SDXL the ldm way
    context_dim: int  # cross-attention input width: tells the families apart by a LoRA's shapes
    text_encoders: tuple[TextEncoder, ...]

    def text_encoder(self, component: str) -> TextEncoder:
        for encoder in self.text_encoders:
            if encoder.component == component:
                return encoder
        raise UnknownArchitectureError(
            f"{self.title} has no text encoder '{component}': this LoRA was made for another model family."
        )


_CLIP_L = {"width": 768, "layers": 12}
SD1_ARCH = Arch(
    name="sd1", title="SD 1.x", base_model_version=SD1.base_model_version, v2=False,
    modelspec_architecture=SD1.modelspec_architecture, layout=UNetLayout((2, 2, 2, 2), (True, True, True, False)),
    kohya_unet_diffusers_names=True, context_dim=768,
    text_encoders=(TextEncoder("te1", "lora_te", "text_encoder", "clip_l", "cond_stage_model.transformer.", False, **_CLIP_L),),
)
SD2_ARCH = Arch(
    name="sd2", title="SD 2.x", base_model_version="sd_v2", v2=True,
    modelspec_architecture="stable-diffusion-v2-512", layout=SD1_ARCH.layout,
    kohya_unet_diffusers_names=True, context_dim=1024,
    text_encoders=(TextEncoder("te1", "lora_te", "text_encoder", "clip_h", "cond_stage_model.model.", True,
                               width=1024, layers=24),),
)
SDXL_ARCH = Arch(
    name="sdxl", title="SDXL", base_model_version=SDXL.base_model_version, v2=False,
    modelspec_architecture=SDXL.modelspec_architecture, layout=UNetLayout((2, 2, 2), (False, True, True)),
    kohya_unet_diffusers_names=False, context_dim=2048,
    text_encoders=(
        TextEncoder("te1", "lora_te1", "text_encoder", "clip_l", "conditioner.embedders.0.transformer.", False, **_CLIP_L),
        TextEncoder("te2", "lora_te2", "text_encoder_2", "clip_g", "conditioner.embedders.1.model.", True,
                    width=1280, layers=32),
    ),
)
ARCHS = {arch.name: arch for arch in (SD1_ARCH, SD2_ARCH, SDXL_ARCH)}


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise UnknownArchitectureError(
            f"Unknown model family '{name}'. Choose one of: {', '.join(ARCHS)}."
        ) from None


def arch_from_metadata(metadata: dict[str, str]) -> Arch | None:
    """The family kohya/SAI metadata names, or None when it names none (A1111 reads the same keys)."""
    version = metadata.get("ss_base_model_version", "")
    spec = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or spec.startswith("stable-diffusion-xl"):
        return SDXL_ARCH
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True" or spec.startswith("stable-diffusion-v2"):
        return SD2_ARCH
    if version.startswith("sd_v1") or spec.startswith("stable-diffusion-v1"):
        return SD1_ARCH
    return None


def arch_from_checkpoint_keys(keys) -> Arch:
    """A single-file checkpoint's family from where its text encoders live."""
    keys = list(keys)
    has = lambda prefix: any(key.startswith(prefix) for key in keys)
    if has(SDXL_ARCH.text_encoders[1].checkpoint_prefix):
        return SDXL_ARCH
    if has(SD2_ARCH.text_encoders[0].checkpoint_prefix):
        return SD2_ARCH
    if has(SD1_ARCH.text_encoders[0].checkpoint_prefix):
        return SD1_ARCH
    if has("conditioner.embedders.0.model."):  # OpenCLIP-G alone: the SDXL refiner's layout
        raise UnknownArchitectureError(
            "This is an SDXL refiner checkpoint (one OpenCLIP-G text encoder at 'conditioner.embedders.0.model.'): "
            "TuneKit converts SD1.x, SD2.x and SDXL base checkpoints, not the refiner yet."
        )
    if not has(UNET_PREFIX):
        raise UnknownArchitectureError(
            f"This file has no '{UNET_PREFIX}*' keys (first keys: {keys[:3]}): it is not an SD1/SD2/SDXL "
            "single-file checkpoint. Pick a Stable Diffusion checkpoint."
        )
    raise UnknownArchitectureError(
        "This checkpoint has a UNet but no text encoder TuneKit recognises (SD1 'cond_stage_model.transformer.', "
        "SD2 'cond_stage_model.model.', SDXL 'conditioner.embedders.'); pass the family explicitly."
    )
