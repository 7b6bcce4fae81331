"""Diffusion training losses through the host model's own sampling object (no ``comfy`` import).

``model_sampling`` is duck-typed: anything with ComfyUI's ``percent_to_sigma``, ``noise_scaling`` and
``calculate_denoised`` (EPS, V-prediction, EDM, flow/CONST all work). The model is called the way
ComfyUI calls it, returning the *denoised* latent; the loss is then taken in the model's native output
space (the noise ε for EPS models, v for V-prediction, the velocity for flow models) by mapping both the
prediction and the clean latent through the same affine map that ``calculate_denoised`` inverts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_sigmas(model_sampling, count: int, generator: torch.Generator,
                  percent_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """``count`` training sigmas, uniform in the schedule's percent (= uniform timesteps for SD), float32 CPU.

    ``percent_range`` (0 = the noisiest end, 1 = clean) restricts training to part of the schedule.
    """
    lo, hi = percent_range
    lo, hi = max(lo, 1e-4), min(hi, 1.0 - 1e-4)  # the end points are "infinite" and zero sigma
    u = torch.rand(count, generator=generator, dtype=torch.float64) * (hi - lo) + lo
    sigmas = [float(model_sampling.percent_to_sigma(float(p))) for p in u]
    return torch.tensor(sigmas, dtype=torch.float32)


def noised(model_sampling, sigma: torch.Tensor, noise: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """The model input ``x_t`` for ``clean`` latents at ``sigma`` (the host's own noise scaling)."""
    return model_sampling.noise_scaling(sigma, noise, clean, max_denoise=False)


def native_space(model_sampling, sigma: torch.Tensor, x_t: torch.Tensor,
                 denoised: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, target) in the model's output space.

    ``calculate_denoised(σ, out, x_t)`` is affine in ``out`` (``a + b·out``), so ``out = (denoised - a) / b``
    and the target is the same map applied to the clean latent: ε for EPS, v for V-prediction.
    """
    with torch.no_grad():
        zeros = torch.zeros_like(x_t)
        offset = model_sampling.calculate_denoised(sigma, zeros, x_t)
        scale = model_sampling.calculate_denoised(sigma, torch.ones_like(x_t), x_t) - offset
    prediction = (denoised - offset) / scale
    target = (clean - offset) / scale
    return prediction, target


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error; with ``weight`` (broadcast to the latent, e.g. ``[B, 1, h, w]``) a weighted mean.

    A 0/1 weight is a masked MSE (the mean over the masked elements only).
    """
    error = (prediction.float() - target.float()) ** 2
    if weight is None:
        return error.mean()
    weight = weight.to(error.dtype).expand_as(error)
    return (error * weight).sum() / weight.sum().clamp_min(1e-8)


def region_weight(mask: torch.Tensor, latent_shape: torch.Size | tuple, inside: float,
                  outside: float = 1.0) -> torch.Tensor:
    """A ``[B, 1, h, w]`` loss weight from an image-space mask ``[B, H, W]`` (or ``[B, 1, H, W]``):
    ``inside`` where the mask is 1, ``outside`` where it is 0, bilinear in between."""
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    mask = F.interpolate(mask.float(), size=tuple(latent_shape[-2:]), mode="bilinear", align_corners=False,
                         antialias=mask.shape[-1] > latent_shape[-1])
    return outside + (inside - outside) * mask.clamp(0.0, 1.0)


def noise_prediction_loss(model_sampling, sigma: torch.Tensor, x_t: torch.Tensor, denoised: torch.Tensor,
                          clean: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The standard diffusion loss (ε-MSE for EPS models), optionally region weighted."""
    prediction, target = native_space(model_sampling, sigma, x_t, denoised, clean)
    return weighted_mse(prediction, target, weight)
