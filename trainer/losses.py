"""Per-sample diffusion losses and their weights.

Min-SNR-gamma: Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy" (2023), in the
form of diffusers' `compute_snr` recipe and kohya's `apply_snr_weight`: min(SNR, gamma) / SNR for epsilon,
min(SNR, gamma) / (SNR + 1) for v-prediction.
"""

import torch


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_t / (1 - alpha_t) at each timestep."""
    alpha = alphas_cumprod[timesteps].double()
    return (alpha / (1 - alpha)).float()


def min_snr_weights(signal_to_noise: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    clipped = torch.clamp(signal_to_noise, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (signal_to_noise + 1)
    return clipped / signal_to_noise


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of each sample; with masks, kohya's form: the mean of (error * mask)."""
    errors = (prediction.float() - target.float()) ** 2
    if masks is not None:
        errors = errors * masks.to(errors.device, errors.dtype)
    return errors.mean(dim=tuple(range(1, errors.ndim)))
