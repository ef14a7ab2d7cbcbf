"""Which timesteps a step trains: uniform, or biased the way diffusers' SDXL recipe does
(`train_text_to_image_sdxl.py` `generate_timestep_weights`: strategies earlier / later / range)."""

import torch

from .config import TrainConfig


def timestep_weights(config: TrainConfig, num_timesteps: int) -> torch.Tensor | None:
    """Sampling probabilities over [0, num_timesteps), or None for uniform sampling.

    'earlier' / 'later' multiply the first / last `portion` of the timesteps by `multiplier`;
    'range' multiplies [begin, end). Weights are normalised to sum to 1."""
    strategy = config.timestep_bias_strategy
    if strategy == "none" or config.timestep_bias_multiplier == 1.0:
        return None
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    biased = round(config.timestep_bias_portion * num_timesteps)
    if strategy == "earlier":
        weights[:biased] *= config.timestep_bias_multiplier
    elif strategy == "later":
        weights[num_timesteps - biased:] *= config.timestep_bias_multiplier
    else:
        weights[config.timestep_bias_begin:config.timestep_bias_end] *= config.timestep_bias_multiplier
    return weights / weights.sum()


def sample_timesteps(batch: int, num_timesteps: int, generator: torch.Generator,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """Integer timesteps in [0, num_timesteps): uniform, or drawn from `weights`."""
    if weights is None:
        return torch.randint(0, num_timesteps, (batch,), generator=generator)
    return torch.multinomial(weights, batch, replacement=True, generator=generator)
