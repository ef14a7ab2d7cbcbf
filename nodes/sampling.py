"""Sampling through ComfyUI's own KSampler path (comfy.sample), as the KSampler node does, without its
preview callback or progress bar (they would report as the calling node's progress)."""

from dataclasses import dataclass

import comfy.sample
import numpy as np
import torch


@dataclass(frozen=True)
class SampleSettings:
    seed: int = 0
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "euler"
    scheduler: str = "normal"
    width: int = 512
    height: int = 512


def encode_text(clip, text: str):
    """CONDITIONING, as CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sample_image(model, vae, positive, negative, settings: SampleSettings, seed: int, callback=None) -> np.ndarray:
    """One image [H, W, 3] uint8 from an empty latent. comfy.sample.prepare_noise reseeds torch's global
    generator: callers that must keep global RNG state wrap this in torch.random.fork_rng."""
    empty = torch.zeros([1, 4, settings.height // 8, settings.width // 8])
    latent = comfy.sample.fix_empty_latent_channels(model, empty)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(
        model, noise, settings.steps, settings.cfg, settings.sampler, settings.scheduler, positive, negative,
        latent, denoise=1.0, callback=callback, disable_pbar=True, seed=seed,
    )
    image = vae.decode(samples)
    image = image.reshape(-1, *image.shape[-3:])[0, ..., :3]
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
