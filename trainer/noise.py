"""The DDPM forward process and training targets.

Ho et al., "Denoising Diffusion Probabilistic Models" (2020) for epsilon; Salimans & Ho,
"Progressive Distillation for Fast Sampling of Diffusion Models" (2022) for v-prediction; noise offset
from Guttenberg, "Diffusion with Offset Noise" (2023), as kohya applies it; zero terminal SNR from Lin et
al., "Common Diffusion Noise Schedules and Sample Steps are Flawed" (2024), Algorithm 1.
"""

import torch

# ComfyUI's rescale_zero_terminal_snr_sigmas keeps the last alpha this far from 0 (a finite sigma).
TERMINAL_ALPHA = 4.8973451890853435e-08


def draw_noise(latents: torch.Tensor, generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise; with an offset, plus offset * N(0, 1) per sample and channel (lets the model
    learn very dark and very bright images)."""
    noise = torch.randn(latents.shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
    return noise


def add_noise(latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""
    alpha = _per_sample(alphas_cumprod[timesteps], latents)
    return alpha.sqrt() * latents + (1 - alpha).sqrt() * noise


def training_target(
    prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha = _per_sample(alphas_cumprod[timesteps], latents)
        return alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    raise ValueError(f"unknown prediction type '{prediction_type}' (expected 'epsilon' or 'v_prediction')")


def is_zero_terminal(alphas_cumprod: torch.Tensor) -> bool:
    """Whether the schedule already ends at (almost) pure noise, e.g. ComfyUI's ModelSamplingDiscrete zsnr."""
    return float(alphas_cumprod[-1]) < 1e-6


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last timestep has SNR 0 and the first keeps its value
    (the last alpha is kept at TERMINAL_ALPHA, as ComfyUI does, so sigma stays finite)."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    rescaled = root**2
    rescaled[-1] = TERMINAL_ALPHA
    return rescaled.to(alphas_cumprod.dtype)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
