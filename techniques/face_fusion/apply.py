"""Apply Face Fusion to a model: the joint injector and the core apply function the node calls.

At every site the generated image's queries attend, in ONE softmax, to the text keys and to the
reference face keys ``K_f = Linear_kf(h_f)`` (paper Eq. 3-5); several references of one identity are
concatenated (Eq. 6, in the given order); several identities each get their own key block and the
Eq. 7 mask keeps identity i's keys away from queries inside another identity's face mask.

On a Flux-family DiT the same injector runs inside every block's joint attention (the engine's DiT path): the
reference latents go through the same DiT with a one-token all-zero text, each block records the reference image
tokens' keys/values, the :class:`~.flux_adapter.FluxFusionAdapter` maps them (identity when untrained) and they join
the block's ``[text; image]`` keys. The reference's image tokens sit where FLUX.1 Kontext puts a reference image
(index 1 on the first RoPE axis, the generation's rows and columns), so an untrained adapter joins exactly the keys
Kontext would give that latent at the first block. Masks apply on the image-token grid; text queries count as
outside every mask (a masked identity is invisible to them, an unmasked one is seen by every query).
``reference_downsample`` is a UNet-only saving (the DiT reference pass keeps every key); the modes, uncond rows,
budget and Eq. 7 are the same.

Choices the paper leaves open (made here, used identically by the trainer):
- ``weight`` multiplies the attention mass of the face keys (a logit bias ``log w``): 1 = the paper,
  0 = off (exactly the unpatched model), >1 strengthens.
- uncond (the CFG negative): ``none`` (default: the negative sees text only, so CFG pushes towards the
  face), ``zeros`` (the negative sees as many all-zero face keys), ``same`` (the negative sees the face too).
- the reference stream's text: all zeros unless a reference prompt is given; SDXL's other conds (``y``:
  pooled text and size/crop conds) are copied from the first positive row (per-row references, the
  trainer's: reference i from row i, so training and sampling give the reference pass the same ``y``).
- capture: ``per_step`` (paper: the reference noised to the current sigma with fixed noise),
  ``cached_clean`` / ``cached_sigma`` (one pass per model clone, K/V projected once: much faster).
- one identity with a mask: its keys are visible only to queries inside the mask.
- ``reference_budget`` (default 2): an identity with more references than this keeps each layer's face
  keys at about this many references' worth: every reference's keys and values are average-pooled over
  its token grid (windows 1x2, 2x2, 2x4, ...) and the pooled block gets a ``log(window)`` logit bias, so
  each pooled key carries the attention mass of the keys it stands for (ToDo's key downsampling with
  ToMe's proportional attention). One or two references stay exact (Eq. 6 literally); 8 references cost
  about what 2 do instead of 4x more. 0 = no limit (exact for any number).
- ``reference_downsample`` (default 2): the reference pass's highest-resolution self-attention attends to
  keys pooled 2x2 (ToDo; see ``attention_patches/capture.py``): ~15 % less time per reference pass at
  512 px, the captured ``h_f`` keep every token. 1 = the exact reference stream. The trainer uses the same default,
  so an adapter is trained with the reference stream it is applied with.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ...attention_patches import (
    NEGATIVE,
    POSITIVE,
    AttentionCall,
    CapturedStates,
    CaptureRequest,
    ChunkLayout,
    JointInjector,
    KeyGroup,
    ReferenceLatents,
    RegionMask,
    SigmaRange,
    SiteWeights,
    install,
)
from ...attention_patches.capture import CAPTURE_MODES
from ...attention_patches.dit import dit_query_bias
from ...attention_patches.injectors import stacking_name
from ...attention_patches.kernels import pool_key_grid, pooling_window, reference_grid
from ...attention_patches.masks import eq7_bias, rows_for
from ...attention_patches.placement import place
from ...attention_patches.sigma import DIT_SITE_WEIGHT_MODES
from ...errors import InvalidInputError
from .adapter import FusionAdapterBase

logger = logging.getLogger("likeness")

UNCOND_MODES = ("none", "zeros", "same")
DEFAULT_REFERENCE_BUDGET = 2.0
DEFAULT_REFERENCE_DOWNSAMPLE = 2
DIT_REFERENCE_INDEX = 1   # a DiT reference's image tokens at FLUX.1 Kontext's reference index (see the module doc)
INJECTOR_NAME = "face_fusion"


@dataclass
class FusionIdentityLatents:
    """One identity: its reference latents ``[n, C, h, w]`` (VAE space; n > 1 = multi-reference, Eq. 6)
    and an optional image-space face MASK (multi-identity, Eq. 7)."""

    latents: torch.Tensor
    mask: torch.Tensor | RegionMask | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.latents, torch.Tensor) or self.latents.ndim != 4 or self.latents.shape[0] < 1:
            raise InvalidInputError("reference latents must be [n, C, h, w] with n >= 1")
        if self.mask is not None and not isinstance(self.mask, RegionMask):
            self.mask = RegionMask(self.mask)


class FusionInjector(JointInjector):
    """The joint injector of Face Fusion (see the module doc for every option)."""

    needs_capture = True

    def __init__(self, adapter: FusionAdapterBase, identities: Sequence[FusionIdentityLatents],
                 capture_mode: str = "per_step", capture_percent: float = 0.5, uncond: str = "none",
                 reference_context: torch.Tensor | None = None, per_row: bool = False, noise_seed: int = 0,
                 name: str = INJECTOR_NAME, weight: float = 1.0, sigma_range: SigmaRange | None = None,
                 site_weights: SiteWeights | None = None, reference_budget: float = DEFAULT_REFERENCE_BUDGET,
                 reference_downsample: int = DEFAULT_REFERENCE_DOWNSAMPLE):
        super().__init__(name, weight=weight, sigma_range=sigma_range, site_weights=site_weights)
        if capture_mode not in CAPTURE_MODES:
            raise InvalidInputError(f"capture mode must be one of {CAPTURE_MODES}, got {capture_mode!r}")
        if uncond not in UNCOND_MODES:
            raise InvalidInputError(f"uncond must be one of {UNCOND_MODES}, got {uncond!r}")
        if not 0.0 <= capture_percent <= 1.0:
            raise InvalidInputError("capture_percent must lie in 0..1")
        self.adapter = adapter
        self.capture_mode = capture_mode
        self.capture_percent = float(capture_percent)
        self.uncond = uncond
        self.reference_context = reference_context
        self.per_row = per_row
        if reference_budget < 0:
            raise InvalidInputError(f"reference_budget must be >= 0 (0 = no limit), got {reference_budget}")
        self.reference_budget = float(reference_budget)
        if int(reference_downsample) != reference_downsample or reference_downsample < 1:
            raise InvalidInputError(f"reference_downsample must be a whole number >= 1 (1 = exact), "
                                    f"got {reference_downsample}")
        self.reference_downsample = int(reference_downsample)
        self.noise_seed = noise_seed
        self.device: torch.device | None = None   # where to() last put it (None: where it was made)
        self._version = 0
        self.set_identities(identities)

    def set_identities(self, identities: Sequence[FusionIdentityLatents], noise_seed: int | None = None) -> None:
        """Swap the references (e.g. every training step); captures of the old ones are never reused."""
        if not identities:
            raise InvalidInputError("Face Fusion needs at least one reference identity")
        shapes = {tuple(i.latents.shape[1:]) for i in identities}
        if len(shapes) != 1:
            raise InvalidInputError(f"all reference latents must have one size, got {sorted(shapes)}; "
                                    "encode every reference at the same reference size")
        if self.per_row and len(identities) != 1:
            raise InvalidInputError("per-row references take exactly one identity (one reference per batch row)")
        if noise_seed is not None:
            self.noise_seed = noise_seed
        self.masks = [identity.mask for identity in identities]
        self.offsets: list[tuple[int, int]] = []
        start = 0
        for identity in identities:
            self.offsets.append((start, int(identity.latents.shape[0])))
            start += int(identity.latents.shape[0])
        self.references = ReferenceLatents(torch.cat([i.latents.float() for i in identities]), self.noise_seed)
        if self.device is not None:
            self.references.to(self.device)
            for mask in self.masks:
                if mask is not None:
                    mask.to(self.device)
        self._bias_cache: dict[tuple, list | None] = {}
        self._version += 1

    def to(self, device: torch.device) -> "FusionInjector":
        """Follow the model (see ``Injector.to``): the adapter, the references and their noise, the reference
        text and the identities' masks. The adapter may be shared with other models' injectors: it goes where
        ``place`` says (another model still sampling with it keeps it)."""
        super().to(device)
        self.device = device
        adapter_device = place(self.adapter, self, device)
        if any(p.device != adapter_device for p in self.adapter.parameters()):   # asked once per site entry
            self.adapter.to(adapter_device)
        self.references.to(device)
        if self.reference_context is not None:
            self.reference_context = self.reference_context.to(device)
        for mask in self.masks:
            if mask is not None:
                mask.to(device)
        self._bias_cache = {}
        return self

    # ------------------------------------------------------------------ capture
    def training(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.adapter.parameters())

    def capture_request(self, t: torch.Tensor, sigma: float, layout: ChunkLayout,
                        model_sampling: Any) -> CaptureRequest | None:
        positives = layout.rows_of_kind(POSITIVE)
        template = positives[0] if positives else 0
        count = self.references.count
        template_rows = None
        if self.per_row:   # reference i copies row i's extra conds (SDXL y), as one reference copies its positive's
            template_rows = tuple(layout.chunk_rows(layout.cond_or_uncond.index(POSITIVE) if positives else 0))
            if len(template_rows) != count:
                raise InvalidInputError(f"per-row references: {count} references for a batch of {len(template_rows)}")
        if self.capture_mode == "per_step":
            if self.per_row:
                rows = template_rows
                ref_sigma = t[rows[0]:rows[0] + len(rows)].float()
                key = ("rows", tuple(ref_sigma.tolist()))
            else:
                ref_sigma = t[template:template + 1].float().expand(count)
                key = ("step", sigma)
        elif self.capture_mode == "cached_clean":
            ref_sigma = torch.zeros(count, device=t.device)
            key = ("clean",)
        else:
            value = float(model_sampling.percent_to_sigma(self.capture_percent)) if model_sampling is not None else 1.0
            ref_sigma = torch.full((count,), value, device=t.device)
            key = ("sigma", self.capture_percent, value)
        return CaptureRequest(self.references, ref_sigma, (self._version,) + key, cached=self.capture_mode != "per_step",
                              context=self.reference_context, template_row=template,
                              key_downsample=self.reference_downsample, template_rows=template_rows,
                              dit_position_index=DIT_REFERENCE_INDEX)

    def on_captured(self, states: CapturedStates, patch: Any) -> None:
        if not states.cached or self.training():
            return
        for site in patch.sites:  # cached: project once, keep K/V only
            if site.index in states.states:
                states.derive(site, "kv", lambda h, s=site: self.adapter.project(s, h))
        states.drop_states()

    # ------------------------------------------------------------------ attention
    def key_groups(self, call: AttentionCall, weight: float) -> list[KeyGroup]:
        states = call.captured(self)
        site = call.site
        if states is None or (site.index not in states.states and (site.index, "kv") not in states.derived):
            return []
        k_all, v_all = states.derive(site, "kv", lambda h: self.adapter.project(site, h), memo=not self.training())
        layout = call.layout
        positives = layout.rows_of_kind(POSITIVE)
        negatives = layout.rows_of_kind(NEGATIVE) if NEGATIVE in layout.kinds() else []
        rows = sorted(positives + negatives) if self.uncond == "same" else positives
        log_w = self.log_weight(weight)
        groups: list[KeyGroup] = []
        if rows and self.per_row:
            k, v = k_all, v_all
            if k.shape[0] != len(rows):
                index = torch.tensor([r % layout.chunk_size for r in rows], device=k.device)
                k, v = k.index_select(0, index), v.index_select(0, index)
            groups.append(KeyGroup(k, v, rows, log_w, None, tag="fusion:per_row"))
        elif rows:
            biases = self._query_biases(call, rows)
            for i in range(len(self.offsets)):
                k_i, v_i, log_multiplicity = self._identity_keys(states, site, i, k_all, v_all)
                groups.append(KeyGroup(k_i, v_i, rows, log_w + log_multiplicity, biases[i] if biases else None,
                                       tag=f"fusion:{i}"))
        if self.uncond == "zeros" and negatives:
            total = k_all.shape[1] * (1 if self.per_row else k_all.shape[0])
            groups.append(KeyGroup(None, None, negatives, log_w, zero_keys=total, tag="fusion:uncond-zeros"))
        return groups

    def _identity_keys(self, states: CapturedStates, site: Any, index: int, k_all: torch.Tensor,
                       v_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Identity ``index``'s keys/values ``[1, N, C]`` at ``site`` (its references in order, Eq. 6), pooled
        to the reference budget (see the module doc), and the log-multiplicity bias of each key."""
        start, count = self.offsets[index]
        width = k_all.shape[-1]
        window, grid = (1, 1), None
        if 0 < self.reference_budget < count:
            grid = reference_grid(int(k_all.shape[1]), tuple(self.references.latents.shape[-2:]))
            if grid is None:
                logger.warning("Likeness Face Fusion: no token grid for %d reference tokens at site %d; its keys "
                               "are not pooled", k_all.shape[1], site.index)
            else:
                window = pooling_window(count, self.reference_budget, grid)
        if window == (1, 1):   # views of the projected K/V, nothing to memoise
            return (k_all[start:start + count].reshape(1, -1, width), v_all[start:start + count].reshape(1, -1, width),
                    0.0)
        slot = (site.index, "pooled", index, window)
        pooled = states.derived.get(slot)
        if pooled is None:
            pooled = tuple(pool_key_grid(x[start:start + count], grid, window).reshape(1, -1, width)
                           for x in (k_all, v_all))
            if not self.training():
                states.derived[slot] = pooled
        return pooled[0], pooled[1], math.log(window[0] * window[1])

    def _query_biases(self, call: AttentionCall, rows: list[int]) -> list[torch.Tensor] | None:
        masks = self.masks
        if all(m is None for m in masks):
            return None
        h, w = call.grid
        device = call.q.device
        key = (h, w, str(device), tuple(rows), call.layout.chunk_size, call.image_span, int(call.q.shape[1]))
        if key in self._bias_cache:
            return self._bias_cache[key]
        inside = [rows_for(m.inside(h, w), rows, call.layout.chunk_size) if m is not None
                  else torch.zeros(1, h * w, dtype=torch.bool, device=device) for m in masks]
        if len(inside) == 1:  # one identity: its keys only inside its mask
            biases = [torch.zeros(inside[0].shape, device=device).masked_fill(~inside[0], float("-inf"))]
        else:  # Eq. 7
            batch = max(x.shape[0] for x in inside)
            stacked = torch.stack([x.expand(batch, -1) for x in inside])
            biases = list(eq7_bias(stacked))
        if call.image_span is not None:   # DiT: text queries (and tokens past the grid) are outside every mask
            biases = [dit_query_bias(call, bias, masked=mask is not None) for bias, mask in zip(biases, masks,
                                                                                                strict=True)]
        if len(self._bias_cache) > 64:
            self._bias_cache.clear()
        self._bias_cache[key] = biases
        return biases


def encode_reference_images(vae: Any, images: torch.Tensor, size: int = 512) -> torch.Tensor:
    """IMAGE ``[n,H,W,C]`` → VAE latents ``[n,C,size/8,size/8]``: center-cropped square, resized."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1:
        raise InvalidInputError("reference images must be an IMAGE batch [n, H, W, C]")
    if size % 64 != 0 or size < 64:
        raise InvalidInputError(f"reference size must be a multiple of 64, got {size}")
    pixels = images[..., :3].movedim(-1, 1).float()
    h, w = pixels.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    pixels = pixels[:, :, top:top + side, left:left + side]
    if side != size:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=side > size).clamp(0.0, 1.0)
    return vae.encode(pixels.movedim(1, -1))


def apply_face_fusion(model: Any, adapter: FusionAdapterBase, identities: Sequence[FusionIdentityLatents],
                      weight: float = 1.0, start_at: float = 0.0, end_at: float = 1.0,
                      capture_mode: str = "per_step", capture_percent: float = 0.5, uncond: str = "none",
                      site_weights: SiteWeights | None = None, reference_context: torch.Tensor | None = None,
                      noise_seed: int = 0, per_row: bool = False,
                      reference_budget: float = DEFAULT_REFERENCE_BUDGET,
                      reference_downsample: int = DEFAULT_REFERENCE_DOWNSAMPLE) -> Any:
    """A clone of ``model`` with Face Fusion installed (other identity techniques on it keep working). Applied to a
    model that already has Face Fusion, both apply: each application is its own injector (own references, own
    capture pass, own key block in the joint softmax), as stacked FaceID adapters are.

    ``per_row=True`` (training): one identity whose i-th reference belongs to batch row i (per chunk),
    captured at that row's sigma. ``reference_budget``, ``reference_downsample``: see the module doc. The
    injector is ``find_patch(clone).injectors[-1]``; swap references with its ``set_identities``.
    """
    clone = model.clone()
    patch = install(clone)
    adapter.check_sites(patch.sites)
    check_site_weights(site_weights, patch.dit)
    patch.add(FusionInjector(adapter, identities, capture_mode=capture_mode, capture_percent=capture_percent,
                             uncond=uncond, reference_context=reference_context, noise_seed=noise_seed,
                             per_row=per_row, name=stacking_name(patch.injectors, INJECTOR_NAME), weight=weight, sigma_range=SigmaRange(start_at, end_at),
                             site_weights=site_weights, reference_budget=reference_budget,
                             reference_downsample=reference_downsample))
    return clone


def check_site_weights(site_weights: SiteWeights | None, dit: bool) -> None:
    """The ``layers`` choice must name parts of this model: UNet parts (input/middle/output) on a UNet, block kinds
    (double/single) on a DiT."""
    if site_weights is None or site_weights.mode in ("all", "custom"):
        return
    if dit != (site_weights.mode in DIT_SITE_WEIGHT_MODES):
        choices = "all, double, single or custom" if dit else "all, input, middle, output or custom"
        raise InvalidInputError(f"layers={site_weights.mode!r} names a part of another kind of model; this MODEL is "
                                f"{'a Flux-family DiT' if dit else 'an SD1.5/SDXL UNet'}: use {choices}")


@dataclass(frozen=True)
class FusionIdentityImages:
    """One identity as the Fusion Identity node carries it (encoded later, with the Apply node's VAE)."""

    images: torch.Tensor                 # IMAGE [n, H, W, C]: n > 1 = several references of this person
    mask: torch.Tensor | None = None     # MASK [B, H, W] or [H, W]: where this person's face goes


def chain_identity(previous: Sequence[FusionIdentityImages] | None, images: torch.Tensor,
                   mask: torch.Tensor | None) -> tuple[FusionIdentityImages, ...]:
    """Append one identity to a FUSION_IDENTITIES list (immutable, so cached node outputs stay valid)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise InvalidInputError("the identity's reference must be an IMAGE batch [n, H, W, C]")
    if previous is not None and not all(isinstance(i, FusionIdentityImages) for i in previous):
        raise InvalidInputError("'identities' must come from another Fusion Identity node")
    return tuple(previous or ()) + (FusionIdentityImages(images, mask),)


def identities_from_images(vae: Any, identities: Sequence[FusionIdentityImages],
                           size: int = 512) -> list[FusionIdentityLatents]:
    """Encode every identity's reference images with ``vae`` at ``size`` (square center crop)."""
    return [FusionIdentityLatents(encode_reference_images(vae, i.images, size), i.mask) for i in identities]


def apply_face_fusion_images(model: Any, adapter: FusionAdapterBase, vae: Any,
                             identities: Sequence[FusionIdentityImages], reference_size: int = 512,
                             reference_conditioning: Any = None, **options) -> Any:
    """The node's core: encode references, then :func:`apply_face_fusion`."""
    if not isinstance(adapter, FusionAdapterBase):
        raise InvalidInputError("'fusion_adapter' must come from a Fusion Adapter Loader / New node")
    if not identities:
        raise InvalidInputError("give a reference IMAGE or an identities list from Fusion Identity nodes")
    context = None
    if reference_conditioning is not None:
        try:
            context = reference_conditioning[0][0][:1]
        except (TypeError, IndexError, KeyError) as exc:
            raise InvalidInputError("'reference_prompt' must be a CONDITIONING") from exc
    latents = identities_from_images(vae, identities, reference_size)
    return apply_face_fusion(model, adapter, latents, reference_context=context, **options)
