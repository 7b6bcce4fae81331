"""The identity-attention engine shared by every technique of the pack.

Public API (import from here):

Sites
    ``find_sites(model) -> tuple[AttentionSite, ...]``: every text cross-attention site, walked from the
    model (SD1.5: 16, SDXL: 70). ``AttentionSite`` has ``key`` (ComfyUI's attn2 patch key),
    ``channels``/``heads``/``dim_head``/``context_dim``, ``order`` and ``processor_index`` (``2k+1``, the
    IP-Adapter/diffusers state-dict index), ``transformer_index``, ``level``.

    On a Flux-family DiT (FLUX.1 dev / schnell / Kontext, Chroma) ``find_sites`` returns one ``DitSite`` per
    block (``kind`` double/single, ``block_id``, ``key`` = ComfyUI's ``patches_replace["dit"]`` key); see
    :mod:`.dit`. ``find_unet_sites`` is for the UNet-only techniques (a DiT raises ``UnsupportedModelError``).

Installing on a model (always on a clone you own: ``m = model.clone()``)
    ``add_injector(m, injector) -> IdentityAttentionPatch``: installs the one patch object of ``m`` on
    every site (if not there yet) and appends ``injector``. ``find_patch(m)`` returns it or None.
    Injectors with the same ``name`` replace each other (re-applying a technique).
    ``install(m, capture_batch=4, trim_reference_text_attention=True)``: the patch with non-default options.
    The patch implements ComfyUI's model-patch protocol (``to(device)``, ``models()``): injector tensors follow
    the model when ComfyUI loads or offloads it.

Statistics (tests, benchmarks)
    ``attach_stats(m) -> EngineStats`` (``site_calls``, ``capture_passes``, ``capture_seconds``); nothing is
    counted without it.

Injectors
    ``DecoupledInjector(name, provider, weight=, sigma_range=, site_weights=, region=)``:
    ``out = Attn(q,K_c,V_c) + w * mask * Attn(q,K_id,V_id)``. ``provider(site, kind)`` returns
    ``(k, v)`` projected for that site, ``[1 | chunk_size, N_id, C]``, for chunk kind 0 (positive) or
    1 (negative); None = nothing for that kind (uncond "none"). Memoise per site in the provider; a provider
    owning tensors implements ``to(device)``. ``Injector.to(device)`` / ``models()``: extend them in a
    subclass that owns more tensors or holds ModelPatchers.
    ``JointInjector``: subclass, return ``KeyGroup`` s from ``key_groups(call, weight)`` (Face Fusion; on a DiT
    the keys join the block's joint attention, ``call.image_span`` locates the image queries, ``dit_query_bias``
    widens a per-person grid bias to every query).
    ``ResidualInjector`` (DiT): subclass, return ``[(rows, delta)]`` from ``residual(call: BlockCall, weight)``,
    added to a block's output image tokens; the engine applies the region mask (PuLID-FLUX).

When and where
    ``SigmaRange(start_percent, end_percent)`` (resolved to sigmas once per model sampling),
    ``SiteWeights.parse(mode, custom, others)`` (all / input / middle / output / custom),
    ``RegionMask(mask)`` (an image-space MASK; resized per site from ``activations_shape``),
    ``eq7_bias`` / ``eq7_additive_mask`` (Face Fusion's multi-identity mask).

Reference capture (:mod:`.capture`)
    ``ReferenceLatents``, ``CaptureRequest``, ``CapturedStates``; modes ``per_step``, ``cached_clean``,
    ``cached_sigma``. An injector with ``needs_capture = True`` returns a request from
    ``capture_request(t, layout, model_sampling)``; the engine runs the reference pass inside its
    APPLY_MODEL wrapper and hands the states to ``AttentionCall.captured(injector)``.
"""
from __future__ import annotations

from .capture import CAPTURE_MODES, CapturedStates, CaptureRequest, PassContext, ReferenceLatents
from .dit import DIT_CHECKPOINT_KEY, DitBlockEntry, dit_query_bias, token_grid
from .injectors import (
                        NEGATIVE,
                        POSITIVE,
                        AttentionCall,
                        BlockCall,
                        ChunkLayout,
                        DecoupledInjector,
                        Injector,
                        JointInjector,
                        KeyGroup,
                        ResidualInjector,
)
from .masks import RegionMask, eq7_additive_mask, eq7_allowed, eq7_bias, resize_to_grid
from .patch import (
                        PASS_KEY,
                        IdentityAttentionPatch,
                        add_injector,
                        attach_stats,
                        find_patch,
                        identity_attention_wrapper,
                        install,
)
from .sigma import SigmaRange, SiteWeights
from .sites import (
                        AttentionSite,
                        DitSite,
                        describe_sites,
                        diffusion_model_of,
                        dit_model_of,
                        find_dit_sites,
                        find_sites,
                        find_unet_sites,
)
from .stats import EngineStats

__all__ = [
    "AttentionCall", "AttentionSite", "BlockCall", "CAPTURE_MODES", "DIT_CHECKPOINT_KEY", "DitBlockEntry", "DitSite",
    "ResidualInjector", "dit_model_of", "dit_query_bias", "find_dit_sites", "find_unet_sites", "token_grid", "CaptureRequest", "CapturedStates", "ChunkLayout",
    "DecoupledInjector", "EngineStats", "IdentityAttentionPatch", "Injector", "JointInjector", "KeyGroup", "NEGATIVE",
    "PASS_KEY", "POSITIVE", "PassContext", "ReferenceLatents", "RegionMask", "SigmaRange", "SiteWeights",
    "add_injector", "attach_stats", "describe_sites", "diffusion_model_of", "eq7_additive_mask", "eq7_allowed",
    "eq7_bias", "find_patch", "find_sites", "identity_attention_wrapper", "install", "resize_to_grid",
]
