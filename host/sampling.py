"""Host side of sampling: every image the pack generates itself (FaceA-Net inpainting, training previews)
goes through ComfyUI's own sampler, so samplers, schedulers, model patches and noise match a KSampler node.
"""
from __future__ import annotations

from typing import Any

import torch

from . import comfy_available

FALLBACK_SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_sde", "ddim", "uni_pc"]
FALLBACK_SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"]


def sampler_names() -> tuple[list[str], list[str]]:
    """ComfyUI's sampler and scheduler names (a fixed common list outside ComfyUI, so node inputs still build)."""
    if comfy_available():
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    return list(FALLBACK_SAMPLERS), list(FALLBACK_SCHEDULERS)


def conditioning(context: torch.Tensor, **values: Any) -> list:
    """A CONDITIONING (ComfyUI's list of ``[tensor, dict]``) from a text-encoder context ``[B, T, C]``."""
    return [[context, dict(values)]]


def sample_latent(model: Any, positive: list, negative: list, latent: torch.Tensor, *, seed: int, steps: int,
                  cfg: float, sampler_name: str, scheduler: str, denoise: float = 1.0,
                  noise_mask: torch.Tensor | None = None, cond_values: dict | None = None) -> torch.Tensor:
    """Sample ``latent`` ``[B, C, h, w]`` with ComfyUI's sampler exactly as a KSampler node with these settings.

    ``cond_values`` are set on both conditionings (e.g. ``concat_latent_image`` / ``concat_mask`` for an
    inpainting model, as InpaintModelConditioning does); ``noise_mask`` ``[B, 1, H, W]`` keeps the latent
    outside it, as a latent noise mask does. Returns the sampled latent (not decoded).
    """
    import comfy.sample
    import node_helpers

    if cond_values:
        positive = node_helpers.conditioning_set_values(positive, cond_values)
        negative = node_helpers.conditioning_set_values(negative, cond_values)
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, int(seed))
    return comfy.sample.sample(model, noise, int(steps), float(cfg), sampler_name, scheduler, positive, negative,
                               latent, denoise=float(denoise), noise_mask=noise_mask, seed=int(seed),
                               disable_pbar=True)
