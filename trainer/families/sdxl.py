"""Stable Diffusion XL. kohya keeps SDXL UNet modules under their original ldm names."""

from dataclasses import dataclass

from .base import Family, kohya_name


@dataclass(frozen=True)
class SDXLFamily(Family):
    def kohya_unet_name(self, ldm_path: str, unet_levels: list[int]) -> str:
        return kohya_name("lora_unet", ldm_path)


SDXL = SDXLFamily(
    name="sdxl",
    title="SDXL",
    base_model_version="sdxl_base_v1-0",
    modelspec_architecture="stable-diffusion-xl-v1-base",
    default_resolution=1024,
    size_conditioning=True,
)
