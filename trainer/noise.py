"""The DDPM forward process and training targets.

Ho et al., "Denoising Diffusion Probabilistic Models" (2020) for epsilon; Salimans & Ho,
"Progressive Distillation for Fast Sampling of Diffusion Models" (2022) for v-prediction.
"""

import torch


def sample_timesteps(batch: int, num_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform integer timesteps in [0, num_timesteps)."""
    return torch.randint(0, num_timesteps, (batch,), generator=generator)


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


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
