"""Train a Face Fusion adapter on a frozen Flux-family DiT (FLUX.1 dev / schnell) with the shared loop.

The step is :class:`~.training.FusionTask`'s (per row: a sigma from the model's schedule, its noise, the reference
pass through the same DiT at that sigma, the generation with the reference keys in every block's joint attention),
with FLUX.1's objective: ComfyUI's Flux ``model_sampling`` (CONST, rectified flow) noises ``x_t = (1 - t) x0 + t ε``
and the loss is taken in the model's output space, the velocity, so the target is ``ε - x0``
(:func:`...trainers.losses.noise_prediction_loss` derives it from ``calculate_denoised``). Training sigmas are uniform
in the schedule's percent through the model's own (shifted) ``percent_to_sigma``, as sampling spaces them.

What differs from the UNet trainer: the adapter is a :class:`~.flux_adapter.FluxFusionAdapter` (``rank``; identity
at the start); the model takes the caption's pooled CLIP-L embedding (``y``) and, FLUX.1 dev, a ``guidance`` value
per row (the distilled guidance the adapter is trained under; sample with the same); ``precision`` (``auto`` / ``bf16``
/ ``fp32``, :mod:`...trainers.precision`: autocast with fp32 trainables) and ``gradient_checkpointing`` (each block
recomputed in the backward pass: the engine's ``DIT_CHECKPOINT_KEY``, on by default).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from ...attention_patches import DIT_CHECKPOINT_KEY, dit_model_of
from ...errors import InvalidInputError, UnsupportedModelError
from ...trainers.loop import TrainResult
from ...trainers.precision import check_precision, compute_dtype, compute_precision
from ...trainers.task import run_field
from .adapter import FusionAdapterBase
from .flux_adapter import DEFAULT_RANK, FluxFusionAdapter
from .training import FusionTask, FusionTrainingData, FusionTrainSettings

logger = logging.getLogger("likeness")


@dataclass
class FluxFusionTrainSettings(FusionTrainSettings):
    """:class:`~.training.FusionTrainSettings` plus what a Flux run needs."""

    guidance: float = 3.5                  # FLUX.1 dev's distilled guidance per row (schnell ignores it)
    precision: str = "auto"                # "auto" (bf16 where native, else fp32), "bf16", "fp32"
    # recompute each block in the backward pass (less memory, ~1.3x time); the same gradients, so a run may resume
    # with the other choice (a run field, not part of the fingerprint)
    gradient_checkpointing: bool = run_field(True)
    rank: int = DEFAULT_RANK               # a new adapter's rank (a given adapter keeps its own)
    reference_downsample: int = 1          # UNet only: a DiT's reference pass keeps every key

    def check(self) -> None:
        super().check()
        check_precision(self.precision)
        if self.guidance < 0:
            raise InvalidInputError(f"guidance must be >= 0, got {self.guidance}")
        if self.rank < 1:
            raise InvalidInputError(f"rank must be >= 1, got {self.rank}")
        if self.reference_downsample != 1:
            raise InvalidInputError("reference downsample is a UNet setting; on Flux the reference pass keeps every "
                                    "key (leave it at 1)")


class FluxFusionTask(FusionTask):
    """The Face Fusion task on a Flux-family DiT (see the module doc)."""

    technique = "face_fusion_flux"
    label = "Face Fusion training (Flux)"

    def __init__(self, model_patcher, data: FusionTrainingData, settings: FluxFusionTrainSettings,
                 adapter: FusionAdapterBase | None = None):
        if dit_model_of(model_patcher) is None:
            raise UnsupportedModelError("Flux Face Fusion training needs a Flux-family DiT MODEL; for SD1.5/SDXL the "
                                        "UNet trainer runs (train_face_fusion picks it)")
        if not isinstance(settings, FluxFusionTrainSettings):
            raise InvalidInputError("a Flux Fusion run takes FluxFusionTrainSettings (training.make_settings builds "
                                    "the right settings for a model)")
        super().__init__(model_patcher, data, settings, adapter)
        self.compute_dtype: torch.dtype | None = None

    def new_adapter(self, model_patcher) -> FluxFusionAdapter:
        return FluxFusionAdapter.from_model(model_patcher, rank=self.settings.rank, seed=self.settings.seed)

    @contextlib.contextmanager
    def session(self):
        with super().session():
            self.options[DIT_CHECKPOINT_KEY] = bool(self.settings.gradient_checkpointing)
            self.compute_dtype = compute_dtype(self.settings.precision, self.device)
            logger.info("%s: computing in %s (precision %s), %s", self.label,
                        "bf16 mixed precision" if self.compute_dtype else "fp32", self.settings.precision,
                        "blocks recomputed in backward" if self.settings.gradient_checkpointing else "activations kept")
            yield self

    def denoise(self, x_t: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, extra: dict) -> torch.Tensor:
        with compute_precision(self.compute_dtype, self.device):
            return super().denoise(x_t, sigma, context, extra)

    def _extra_conds(self, pooled: torch.Tensor | None, count: int) -> dict:
        """FLUX.1's ``y`` (the pooled CLIP-L caption embedding) and ``guidance`` per row, as the sampler passes
        them (``model_base.Flux.extra_conds``)."""
        dit = dit_model_of(self.clone)
        extra: dict = {}
        if getattr(dit, "vector_in", None) is not None:
            if pooled is None:
                raise InvalidInputError("this Flux model needs the captions' pooled CLIP-L embedding; encode the "
                                        "training data with the model's CLIP (both FLUX text encoders)")
            extra["y"] = pooled.to(self.device, self.dtype)
        if getattr(getattr(dit, "params", None), "guidance_embed", False):
            extra["guidance"] = torch.full((count,), float(self.settings.guidance), device=self.device,
                                           dtype=torch.float32)
        return extra

    def finish(self, result: TrainResult) -> FluxFusionAdapter:
        adapter = super().finish(result)
        s = self.settings
        adapter.metadata.update({"guidance": str(s.guidance), "precision": "bf16" if self.compute_dtype else "fp32",
                                 "gradient_checkpointing": str(bool(s.gradient_checkpointing)).lower()})
        return adapter
