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

    def encode_prompts(self, captions: Sequence[str]) -> list[PromptEmbedding]:
        """Inside `training(..., text=True)` through the training text encoders, with grad where enabled."""

    def text_encoder_modules(self) -> dict[str, dict[str, torch.nn.Module]]:
        """Each text encoder's modules by transformers path ('text_model.encoder.layers.0.mlp.fc1'), keyed by
        the encoder's name ('clip_l', 'clip_g'), in the model's order (SDXL: CLIP-L first)."""

    def token_vectors(self, text: str) -> dict[str, torch.Tensor]:
        """The input embeddings of `text`'s tokens, [tokens, dim] per encoder, keyed as embedding files key
        them ('clip_l', 'clip_g')."""

    def use_embeddings(self, embeddings: dict[str, dict[str, torch.Tensor]]) -> None:
        """From now on `embedding:<name>` in a caption stands for these vectors (name -> encoder key ->
        [vectors, dim]), gradients included, instead of a file of that name."""

    def predict(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompts: Sequence[PromptEmbedding],
        sizes: Sequence[SizeInfo],
    ) -> torch.Tensor:
        """The denoiser's raw output (epsilon or v) for discrete DDPM timesteps."""

    def training(self, attach, detach, text: bool = False, gradient_checkpointing: bool = False) -> AbstractContextManager[None]:
        """Make the base weights usable by autograd and call attach()/detach() around training. With `text`
        the text encoders train too (their weights aliased, prompts encoded with grad) and each model's
        branches are attached on their own: attach('lora_unet'), attach('lora_te'). With
        `gradient_checkpointing` the denoiser's blocks recompute their activations in backward."""

    def set_clip_skip(self, layers: int) -> None:
        """Encode captions from the `layers`-th last text-encoder layer (1: the last), without changing the
        host's own text encoder."""
