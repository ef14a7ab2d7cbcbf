"""The seam between the core and whatever runs it (ComfyUI nodes, the CLI, tests).

A `Host` receives events and says when to stop. A `ModelBridge` exposes the host's already
loaded models: the core never loads, copies or mutates base weights itself.
"""

import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from .events import Event
from .families import Family

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptEmbedding:
    """A caption encoded once by the frozen text encoder(s)."""

    context: torch.Tensor  # [tokens, dim]
    pooled: torch.Tensor | None = None  # [dim] (SDXL's CLIP-G pooled output)


@dataclass(frozen=True)
class SizeInfo:
    """SDXL's micro-conditioning for one training image (pixels)."""

    original: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    target: tuple[int, int]  # (height, width) trained at


class Host(Protocol):
    def emit(self, event: Event) -> None: ...

    def should_stop(self) -> bool: ...


class NullHost:
    """Runs headless: events go to the log, nothing ever asks to stop."""

    def emit(self, event: Event) -> None:
        log.info("%s", event)

    def should_stop(self) -> bool:
        return False


class ModelBridge(Protocol):
    family: Family
    device: torch.device
    prediction_type: str  # "epsilon" or "v_prediction"

    def alphas_cumprod(self) -> torch.Tensor: ...

    def denoiser_modules(self) -> dict[str, torch.nn.Module]:
        """Every module of the denoiser by its original (ldm) path, e.g. 'input_blocks.1.1.proj_in'."""

    def unet_levels(self) -> list[int]:
        """Residual blocks per resolution level (names SD1 modules the diffusers way)."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, H, W, 3] in 0..1 -> latents in the denoiser's (scaled) space."""

    def vae_identity(self) -> str:
        """A string that changes whenever `encode_images` would give other latents for the same pixels
        (other VAE weights or dtype, another latent scale): part of every cached latent's key."""

    def encode_prompts(self, captions: Sequence[str]) -> list[PromptEmbedding]: ...

    def predict(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompts: Sequence[PromptEmbedding],
        sizes: Sequence[SizeInfo],
    ) -> torch.Tensor:
        """The denoiser's raw output (epsilon or v) for discrete DDPM timesteps."""

    def training(self, attach, detach) -> AbstractContextManager[None]:
        """Make the base weights usable by autograd and call attach()/detach() around training."""
