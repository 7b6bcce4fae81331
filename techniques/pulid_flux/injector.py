"""PuLID-FLUX on a Flux-family DiT through the engine: after every 2nd double block and every 4th single block,
``img = img + id_weight * ca_k(id_tokens, img)`` with ``k`` counting the scheduled blocks in call order (double
blocks 0, 2, .., 18 use ``pulid_ca.0..9``, single blocks 0, 4, .., 36 ``pulid_ca.10..19``; the release's
``flux/model.py``).

What the engine adds around it: start/end as a sigma range, one region MASK per person (tokens outside it get no
residual; chaining two Apply nodes with two masks = two people), cond/uncond rows. The official app gives the
negative pass of true CFG the IDFormer's output for all-zero inputs (``uncond="zero_id"``, the default here);
``"none"`` leaves the negative rows without ID.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ...attention_patches import (
    NEGATIVE,
    POSITIVE,
    BlockCall,
    ResidualInjector,
    SigmaRange,
    install,
)
from ...attention_patches.injectors import row_index, stacking_name, take_rows
from ...attention_patches.placement import place
from ...errors import IncompatibleEmbedsError, InvalidInputError, UnsupportedModelError
from ...host import comfy_available
from .checkpoint import PulidFluxModel
from .embeds import PulidFluxEmbeds
from .folded import FoldedIDAttention, fold, folded_residual

logger = logging.getLogger("likeness")

INJECTOR_NAME = "pulid_flux"
DOUBLE_INTERVAL = 2   # the release's pulid_double_interval
SINGLE_INTERVAL = 4   # the release's pulid_single_interval
UNCOND_MODES = ("zero_id", "none")


def ca_schedule(sites, double_interval: int = DOUBLE_INTERVAL, single_interval: int = SINGLE_INTERVAL
                ) -> dict[int, int]:
    """``{site.index: cross-attention index}`` for the scheduled blocks, numbered in call order."""
    schedule: dict[int, int] = {}
    for site in sorted(sites, key=lambda s: s.index):
        interval = double_interval if site.kind == "double" else single_interval
        if site.block_id % interval == 0:
            schedule[site.index] = len(schedule)
    return schedule


class PulidFluxInjector(ResidualInjector):
    """One person's PuLID-FLUX ID on a DiT.

    ``PulidFluxInjector(model, embeds, schedule, weight=1.0, sigma_range=None, region=None, uncond="zero_id",
    name="pulid_flux")``: ``model`` a :class:`~.checkpoint.PulidFluxModel` (its cross-attentions are used),
    ``embeds`` a :class:`~.embeds.PulidFluxEmbeds` (or a ``[1, T, C]`` tensor: positive tokens, zero-ID uncond
    then means "none"), ``schedule`` ``{site.index: ca index}`` from :func:`ca_schedule`.
    """

    def __init__(self, model: PulidFluxModel, embeds: PulidFluxEmbeds | torch.Tensor, schedule: dict[int, int],
                 uncond: str = "zero_id", name: str = INJECTOR_NAME, **kw):
        super().__init__(name, **kw)
        if uncond not in UNCOND_MODES:
            raise InvalidInputError(f"uncond must be one of {UNCOND_MODES}, got {uncond!r}")
        self.model = model
        self.schedule = dict(schedule)
        if isinstance(embeds, PulidFluxEmbeds):
            tokens = {POSITIVE: embeds.tokens, NEGATIVE: embeds.uncond_tokens if uncond == "zero_id" else None}
        else:
            tokens = {POSITIVE: embeds, NEGATIVE: None}
        self.tokens = tokens
        self._folded: dict[tuple, FoldedIDAttention] = {}

    # ------------------------------------------------------------------ devices
    def to(self, device) -> "PulidFluxInjector":
        super().to(device)
        if isinstance(device, torch.device | str):   # dtypes are followed per call (an fp8 model computes in bf16)
            # the cross-attentions may serve other injectors (another Apply node, another model): one holder's
            # offload must not pull them from under a holder still on the GPU
            modules = self.model.cross_attentions
            modules.to(place(modules, self, torch.device(device)))
            self._folded.clear()
        return self

    def models(self) -> list:
        """The cross-attentions' ModelPatcher (when running in ComfyUI), so they load and offload with the model
        and count in ComfyUI's memory budget."""
        return [self.model.patcher] if self.model.patcher is not None else []

    def _cross_attention(self, index: int, like: torch.Tensor) -> torch.nn.Module:
        modules = self.model.cross_attentions
        first = next(modules.parameters())
        if first.dtype != like.dtype or first.device != like.device:
            modules.to(like.device, like.dtype)   # once per model load (shared by every injector of this file)
        return modules[index]

    # ------------------------------------------------------------------ the residual
    def weight_at(self, site) -> float:
        """0 off the schedule: the engine then runs those blocks untouched, without a residual call."""
        return super().weight_at(site) if site.index in self.schedule else 0.0

    def residual(self, call: BlockCall, weight: float) -> list[tuple[list[int], torch.Tensor]]:
        index = self.schedule.get(call.site.index)
        if index is None:
            return []
        layout = call.layout
        per_kind = [(kind, layout.rows_of_kind(kind)) for kind in layout.kinds()]
        per_kind = [(kind, rows) for kind, rows in per_kind if self.tokens.get(kind) is not None and rows]
        if not per_kind:
            return []
        ca = self._cross_attention(index, call.img)
        # each ID folded into the projections once (folded.py): the same values as ca(tokens, img), 4x less work;
        # the image tokens keep their gradient (a trainer stacked on the model), the fixed ID side needs none
        return [(rows, self._folded_delta(index, kind, ca, call, rows, weight)) for kind, rows in per_kind]

    def _folded_delta(self, index: int, kind: int, ca, call: BlockCall, rows: list[int], weight: float):
        key = (index, kind, call.img.dtype, call.img.device)
        folded = self._folded.get(key)
        if folded is None:
            folded = self._folded[key] = fold(ca, self.tokens[kind], call.img.dtype)
        return self._delta(call, rows, weight, lambda img: folded_residual(ca, folded, img))

    @staticmethod
    def _delta(call: BlockCall, rows: list[int], weight: float, attend) -> torch.Tensor:
        """``weight * attend(image tokens of rows)``; Kontext reference tokens after the image get no residual."""
        grid_tokens = call.grid[0] * call.grid[1]
        img = take_rows(call.img, row_index(rows, call.layout.batch, call.img.device))
        extra = img.shape[1] - grid_tokens
        if extra > 0:   # Kontext reference tokens after the generated image keep their content
            img = img[:, :grid_tokens]
        delta = attend(img)
        if weight != 1.0:
            delta = delta * weight
        if extra > 0:
            delta = torch.cat((delta, delta.new_zeros(delta.shape[0], extra, delta.shape[2])), dim=1)
        return delta


def check_model(sites, pulid: PulidFluxModel, schedule: dict[int, int]) -> None:
    """UnsupportedModelError when the DiT's width or block count does not fit the file's cross-attentions."""
    widths = {s.hidden for s in sites}
    if widths != {pulid.dim}:
        raise UnsupportedModelError(
            f"{pulid.source} was trained for a Flux DiT of width {pulid.dim}; this MODEL's blocks are "
            f"{sorted(widths)} wide. Use PuLID-FLUX with FLUX.1 dev / schnell (or a fine-tune of them).")
    needed = len(schedule)
    if needed > len(pulid.cross_attentions):
        raise UnsupportedModelError(
            f"this MODEL has {needed} blocks on PuLID's schedule (every {DOUBLE_INTERVAL}nd double, every "
            f"{SINGLE_INTERVAL}th single block) but {pulid.source} has {len(pulid.cross_attentions)} ID "
            "cross-attentions: it fits FLUX.1's 19 double + 38 single blocks.")
    if needed < len(pulid.cross_attentions):
        logger.warning("PuLID-FLUX: this MODEL has fewer blocks than FLUX.1 (%d scheduled of %d); the first %d ID "
                       "cross-attentions are used", needed, len(pulid.cross_attentions), needed)


def manage_cross_attentions(pulid: PulidFluxModel) -> None:
    """Inside ComfyUI: one ModelPatcher around the file's cross-attentions (made once per loaded file)."""
    if pulid.patcher is None and comfy_available():
        from ...host.devices import offload_device, torch_device
        from ...host.diffusers_models import managed_module

        pulid.patcher = managed_module(pulid.cross_attentions, torch_device(), offload_device())


def apply_pulid_flux(model: Any, pulid: PulidFluxModel, embeds: PulidFluxEmbeds, weight: float = 1.0,
                     start_at: float = 0.0, end_at: float = 1.0, mask: torch.Tensor | None = None,
                     uncond: str = "zero_id") -> Any:
    """A clone of ``model`` (a Flux-family DiT) with PuLID-FLUX for one person. Applied again (another person, with
    another ``mask``), both act: each application is its own injector."""
    if not isinstance(pulid, PulidFluxModel):
        raise InvalidInputError("'pulid_flux' must come from a PuLID-FLUX Loader node")
    if not isinstance(embeds, PulidFluxEmbeds):
        raise InvalidInputError("'embeds' must come from a PuLID-FLUX Embed or Load PuLID-FLUX Embeds node")
    if not math.isfinite(weight):
        raise InvalidInputError(f"'weight' must be a finite number, got {weight}")
    if embeds.width != pulid.ca_config.id_dim:
        raise IncompatibleEmbedsError(
            f"{embeds.describe()} do not fit {pulid.source} (its ID cross-attentions read {pulid.ca_config.id_dim}-"
            "wide tokens); make the embeds with this PuLID-FLUX file.")
    if embeds.encoder and embeds.encoder != pulid.source:
        logger.warning("PuLID-FLUX: the embeds were made with %s, the model is %s", embeds.encoder, pulid.source)
    clone = model.clone()
    patch = install(clone)
    if not patch.dit:
        raise UnsupportedModelError("PuLID-FLUX runs on Flux-family DiTs (FLUX.1 dev / schnell); this MODEL is a "
                                    "UNet (SD1.5/SDXL): use the FaceID / InstantID nodes for it")
    schedule = ca_schedule(patch.sites)
    check_model(patch.sites, pulid, schedule)
    manage_cross_attentions(pulid)
    patch.add(PulidFluxInjector(pulid, embeds, schedule, uncond=uncond, name=stacking_name(patch.injectors,
                                INJECTOR_NAME), weight=weight, sigma_range=SigmaRange(start_at, end_at), region=mask))
    return clone
