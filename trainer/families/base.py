"""What the core needs to know about a model family, and nothing about how a host loads it."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    base_model_version: str  # kohya `ss_base_model_version`
    modelspec_architecture: str  # SAI model spec, without the `/lora` suffix
    default_resolution: int
    size_conditioning: bool  # SDXL's original/crop/target size inputs

    def kohya_unet_name(self, ldm_path: str, unet_levels: list[int]) -> str:
        """The kohya key prefix of a denoiser module given by its ldm path."""
        raise NotImplementedError


def kohya_name(prefix: str, module_path: str) -> str:
    return f"{prefix}_{module_path.replace('.', '_')}"
