"""The one identity-attention patch object per model clone.

:class:`IdentityAttentionPatch` is installed with ModelPatcher's own API on every cross-attention site
(``set_model_attn2_replace`` per site key, ``set_model_attn2_patch`` for the reference-capture tap) plus
one APPLY_MODEL wrapper. It holds an ordered list of injectors, so several techniques stack on one model
(decoupled and joint injectors at the same site: the joint blocks join the text softmax, see
:mod:`.joint`, the decoupled outputs are added afterwards).

Clone safety and cost: ``ModelPatcher.clone()`` deep-copies ``model_options``. The patch's
``__deepcopy__`` makes ONE new patch per clone (the deepcopy memo maps all site entries to it) that
shares the injectors (which own the heavy tensors and modules) and starts with empty per-clone caches;
nothing heavy is copied. Adding an injector to a clone never changes its parent.

Devices: the patch implements ComfyUI's model-patch protocol. ``ModelPatcher.model_patches_to(device)``
calls :meth:`IdentityAttentionPatch.to` when the model is loaded (load device) or detached (offload
device), and ``model_patches_models()`` collects :meth:`IdentityAttentionPatch.models` (ModelPatchers the
injectors hold) for ``load_models_gpu``. ``to`` moves every injector's tensors, the cached reference
captures and forwards to another pack's replaced attn2 patch, so the attention path never copies a
tensor between devices.

Per UNet call the wrapper reads sigma to the host once, picks the injectors active at that sigma,
runs a reference capture if an injector asks for one (:mod:`.capture`), and passes a
:class:`PassContext` down in ``transformer_options``; attention calls compare only host floats.
Without the wrapper (e.g. another caller invoking the diffusion model directly) the patch still works
from ``extra_options["sigmas"]`` (one host read per new sigma tensor) but cannot capture references.
"""
from __future__ import annotations

import copy
import logging
import math
import time
import weakref
from typing import Any, Callable, Iterable

import torch

from ..errors import UnsupportedModelError
from .capture import (
    CapturedStates,
    CaptureRequest,
    PassContext,
    ReferenceBatch,
    add_key_downsampling,
    reference_batch,
    run_reference_passes,
    token_safe_patches,
)
from .dit import DitBlockEntry, run_block, token_grid
from .injectors import AttentionCall, ChunkLayout, Injector, KeyGroup, row_index
from .joint import joint_attention
from .kernels import sdpa
from .placement import place
from .sites import AttentionSite, dit_model_of, find_sites, is_dit_sites, sites_by_key
from .stats import EngineStats

__all__ = ["PASS_KEY", "IdentityAttentionPatch", "PassContext", "add_injector", "attach_stats", "find_patch",
           "identity_attention_wrapper", "install"]

logger = logging.getLogger("likeness")

PASS_KEY = "likeness_identity_pass"
WRAPPER_KEY = "likeness_identity_attention"
APPLY_MODEL = "apply_model"  # comfy.patcher_extension.WrappersMP.APPLY_MODEL
ON_CLEANUP = "on_cleanup"    # comfy.patcher_extension.CallbacksMP.ON_CLEANUP

BaseAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, dict], torch.Tensor]


def torch_base_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         extra_options: dict) -> torch.Tensor:
    """Default text attention when the host's optimized attention is not available (plain tests)."""
    return sdpa(q, k, v, heads)


class IdentityAttentionPatch:
    """attn2 replacement for every site + capture tap + ordered injector list. See module doc.

    Options (fixed per patch, copied to its clones): ``capture_batch`` references per reference UNet pass
    (more are captured in several passes: bounded activation memory); ``trim_reference_text_attention``:
    a reference pass with the all-zero text runs attn2 on one query token (see :mod:`.capture`).
    ``device``: where the model is (None: unknown until ComfyUI loads it); injectors added later are
    moved there. ``stats``: an :class:`EngineStats` to count into (tests, benchmarks), or None.
    """

    _likeness_identity_attention = 1  # duck-typed marker (the pack may be imported under any name)

    def __init__(self, sites: Iterable[AttentionSite], base_attention: BaseAttention | None = None,
                 model_sampling: Any = None, *, capture_batch: int = 4, trim_reference_text_attention: bool = True,
                 device: torch.device | None = None, stats: EngineStats | None = None):
        self.sites: tuple = tuple(sites)
        self.dit = is_dit_sites(self.sites)   # Flux-family blocks (see .dit) instead of UNet attn2 sites
        self.patch_size = 2                   # DiT latent patch size (install reads the model's)
        self.dit_ref: Callable[[], Any] = lambda: None   # weakref to the DiT (install sets it): blocks by site
        self.table = {} if self.dit else sites_by_key(self.sites)
        self.base_attention: BaseAttention = base_attention or torch_base_attention
        self.model_sampling = model_sampling
        self.capture_batch = int(capture_batch)
        self.trim_reference_text_attention = bool(trim_reference_text_attention)
        self.device = device
        self.stats = stats
        self.injectors: list[Injector] = []
        self.previous: dict[int, Callable] = {}   # another pack's attn2 replace found at a site
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self.captures: dict[int, CapturedStates] = {}
        self._fallback: tuple[Any, PassContext] | None = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ injectors
    def add(self, injector: Injector) -> None:
        """Append ``injector``; one with the same name is replaced in place (re-applying a technique)."""
        check_injector_kind(injector, self.dit)
        if self.device is not None:
            injector.to(self.device)
        for i, old in enumerate(self.injectors):
            if old.name == injector.name:
                self.injectors[i] = injector
                self.captures.pop(old.uid, None)
                return
        self.injectors.append(injector)

    def remove(self, name: str) -> bool:
        before = len(self.injectors)
        self.injectors = [i for i in self.injectors if i.name != name]
        return len(self.injectors) != before

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update({name: value for name, value in self.__dict__.items()
                             if name not in ("injectors", "previous")})
        new.injectors = list(self.injectors)
        new.previous = copy.deepcopy(self.previous, memo)
        new._reset_runtime()
        return new

    # ------------------------------------------------------------------ ComfyUI's model-patch protocol
    def to(self, device_or_dtype: torch.device | torch.dtype) -> "IdentityAttentionPatch":
        """Follow the model: ComfyUI calls this (once per site entry) with the load device when it loads the
        model and the offload device when it detaches it. Moves this clone's cached captures and another
        pack's replaced patch there, and each injector (shared with sibling clones) where
        :func:`.placement.place` says. The model dtype (also passed here) is ignored: injectors keep their
        precision and cast to the query's dtype per call."""
        self.previous = {index: previous.to(device_or_dtype) if hasattr(previous, "to") else previous
                         for index, previous in self.previous.items()}
        if isinstance(device_or_dtype, torch.dtype):
            return self
        self.device = torch.device(device_or_dtype)
        for injector in self.injectors:
            injector.to(place(injector, self, self.device))
        for states in self.captures.values():
            states.to(self.device)
        self._fallback = None
        return self

    def models(self) -> list:
        """The ModelPatchers the injectors (and another pack's replaced patch) hold, for ComfyUI to load with
        the model; each once."""
        found: list = []
        holders = list(self.injectors) + [p for p in self.previous.values() if hasattr(p, "models")]
        for holder in holders:
            found += [m for m in holder.models() if not any(m is f for f in found)]
        return found

    # ------------------------------------------------------------------ per UNet call
    def active_at(self, sigma: float, model_sampling: Any) -> tuple[Injector, ...]:
        return tuple(i for i in self.injectors if i.is_active(sigma, model_sampling))

    def run_pass(self, executor: Callable, x: torch.Tensor, t: torch.Tensor, c_concat, c_crossattn, control,
                 transformer_options: dict, base_model: Any = None, **kwargs) -> torch.Tensor:
        """Body of the APPLY_MODEL wrapper: gate, capture references if asked, then run the real call."""
        model_sampling = getattr(base_model, "model_sampling", None) or self.model_sampling
        sigma = float(t.max())  # the one host read per UNet call
        ctx = PassContext(sigma, model_sampling, self.active_at(sigma, model_sampling))
        if self.dit:
            ctx.grid = token_grid(x.shape, self.patch_size)
            ctx.txt_tokens = int(c_crossattn.shape[1]) if isinstance(c_crossattn, torch.Tensor) else 0
        if any(i.needs_capture for i in ctx.active):
            layout = ChunkLayout.from_options(transformer_options, x.shape[0])
            for injector in ctx.active:
                if not injector.needs_capture:
                    continue
                request = injector.capture_request(t, sigma, layout, model_sampling)
                if request is None:
                    continue
                stored = self.captures.get(injector.uid)
                if stored is None or stored.key != request.key:
                    self.captures.pop(injector.uid, None)  # free the previous step's states first
                    ref = reference_batch(request, x, c_concat, c_crossattn, self._reference_kwargs(kwargs), base_model,
                                          model_sampling, zero_text_tokens=1 if self.dit else None)
                    stored = self._capture(executor, request, injector, ref, transformer_options, model_sampling)
                ctx.captures[injector.uid] = stored
        options = dict(transformer_options)
        options[PASS_KEY] = ctx
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    # ------------------------------------------------------------------ reference capture
    def _reference_kwargs(self, kwargs: dict) -> dict:
        """The real call's extra conds a reference pass keeps (a DiT's Kontext images are not the reference's)."""
        return {k: v for k, v in kwargs.items() if k != "ref_latents"} if self.dit else kwargs

    def _capture(self, executor: Callable, request: CaptureRequest, injector: Injector, ref: ReferenceBatch,
                 transformer_options: dict, model_sampling: Any) -> CapturedStates:
        """The reference pass(es) of ``request`` (see :func:`.capture.run_reference_passes`), handed to the
        injector and stored for reuse by later calls with the same key."""
        start = time.perf_counter() if self.stats is not None else 0.0
        if request.sites is None:
            request.sites = frozenset(s.index for s in self.sites if injector.weight_at(s) != 0.0)
        options = dict(transformer_options)
        options["cond_or_uncond"] = [0]
        options["uuids"] = []
        trim = False
        if not self.dit:   # UNet-only savings: pooled top-level self-attention keys, one-token attn2
            top_level = min((s.level for s in self.sites if s.index in request.sites), default=0)
            if not add_key_downsampling(options, request, ref.x, top_level):
                self._warn_once("attn1", "another patch replaces self-attention: the reference pass keeps every "
                                "self-attention key (reference_downsample ignored)")
            trim = self.trim_reference_text_attention and token_safe_patches(transformer_options, self.attn2_input)
        recorded, passes = run_reference_passes(executor, request, ref, options, model_sampling, self.capture_batch,
                                                trim, PASS_KEY, token_grid(ref.x.shape, self.patch_size) if self.dit
                                                else None)
        states = CapturedStates(request.key, recorded, cached=request.cached)
        missing = request.sites - set(states.states)
        if missing:
            self._warn_once("missing", "reference capture did not reach %d site(s) %s; they get no reference "
                            "keys (is another patch replacing the UNet forward?)", len(missing), sorted(missing))
        injector.on_captured(states, self)
        self.captures[injector.uid] = states
        if self.stats is not None:
            self.stats.capture_passes += passes
            self.stats.capture_seconds += time.perf_counter() - start
        return states

    def _fallback_pass(self, extra_options: dict) -> PassContext:
        """No wrapper ran: derive sigma from ``extra_options["sigmas"]`` (one host read per tensor)."""
        sigmas = extra_options.get("sigmas")
        if self._fallback is not None and self._fallback[0] is sigmas:
            return self._fallback[1]
        sigma = float(sigmas.max()) if isinstance(sigmas, torch.Tensor) else math.inf
        ctx = PassContext(sigma, self.model_sampling, self.active_at(sigma, self.model_sampling),
                          {uid: c for uid, c in self.captures.items() if c.cached})
        if any(i.needs_capture for i in ctx.active) and not ctx.captures:
            self._warn_once("nowrapper", "identity attention ran without its sampling wrapper: reference "
                            "capture is unavailable for this call, so Face Fusion keys are skipped")
        self._fallback = (sigmas, ctx)
        return ctx

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("Likeness: " + message, *args)

    # ------------------------------------------------------------------ DiT block calls (see .dit)
    def dit_block(self, site: Any) -> torch.nn.Module:
        dit = self.dit_ref()
        if dit is None:
            raise RuntimeError("the DiT this identity patch was installed on no longer exists")
        return getattr(dit, f"{site.kind}_blocks")[site.block_id]

    def run_block(self, entry: DitBlockEntry, args: dict, extra: dict) -> dict:
        options = args.get("transformer_options") or extra.get("transformer_options") or {}
        ctx = options.get(PASS_KEY)
        if ctx is None:
            ctx = self._fallback_pass(options)
        return run_block(self, entry, args, extra, ctx)

    # ------------------------------------------------------------------ site calls
    def _site(self, extra_options: dict) -> AttentionSite | None:
        block = extra_options.get("block")
        if block is None:
            return None
        return self.table.get((block[0], block[1], extra_options.get("block_index", 0))) or self.table.get(tuple(block))

    def _base(self, q, k, v, extra_options: dict, site: AttentionSite | None) -> torch.Tensor:
        previous = self.previous.get(site.index) if site is not None else None
        if previous is not None:
            return previous(q, k, v, extra_options)
        return self.base_attention(q, k, v, extra_options["n_heads"], extra_options)

    def attn2_input(self, n: torch.Tensor, context, value, extra_options: dict):
        """attn2_patch tap: records the reference stream's ``h_f`` during a capture pass; else a no-op."""
        ctx = extra_options.get(PASS_KEY)
        if ctx is not None and ctx.recorder is not None:
            site = self._site(extra_options)
            if site is not None:
                ctx.recorder.record(site, n)   # raises CaptureComplete after the last needed site
                if ctx.recorder.trim_text_attention and site.index not in self.previous:
                    return n[:, :1], context, value   # zero text: attn2's output is to_out's bias everywhere
        return n, context, value

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        site = self._site(extra_options)
        ctx = extra_options.get(PASS_KEY)
        if ctx is None:
            ctx = self._fallback_pass(extra_options)
        if ctx.recorder is not None and ctx.recorder.zero_context and site is not None \
                and site.index not in self.previous:
            # reference pass with the all-zero text context: to_k/to_v have no bias, so K = V = 0 and the
            # attention output is exactly 0 (uniform weights over zero values); skip computing it
            return torch.zeros_like(q)
        if site is None or ctx.recorder is not None or not ctx.active:
            return self._base(q, k, v, extra_options, site)
        return self._inject(q, k, v, extra_options, site, ctx)

    def _inject(self, q, k, v, extra_options: dict, site: AttentionSite, ctx: PassContext) -> torch.Tensor:
        if self.stats is not None:
            self.stats.site_calls[site.index] += 1
        heads = extra_options["n_heads"]
        shape = extra_options.get("activations_shape")
        grid = (int(shape[-2]), int(shape[-1])) if shape is not None else _square_grid(q.shape[1])
        call = AttentionCall(q, k, v, site, ChunkLayout.from_options(extra_options, q.shape[0]), ctx.sigma,
                             heads, grid, extra_options, ctx.captures)
        groups: list[KeyGroup] = []
        extras: list[tuple[list[int], torch.Tensor]] = []
        for injector in ctx.active:
            weight = injector.weight_at(site)
            if weight == 0.0:
                continue
            if injector.kind == "joint":
                groups += injector.key_groups(call, weight)
            elif injector.kind == "decoupled":
                extras += injector.contributions(call, weight)
        groups = [g for g in groups if g.rows and g.log_weight != -math.inf]
        out = self._joint(call, groups) if groups else self._base(q, k, v, extra_options, site)
        for rows, extra in extras:
            out = add_rows(out, rows, extra.to(out.dtype))
        return out

    def _joint(self, call: AttentionCall, groups: list[KeyGroup]) -> torch.Tensor:
        previous = self.previous.get(call.site.index)
        out, text_only = joint_attention(call, groups, keep_text=previous is not None)
        if previous is not None:  # keep another pack's patch: add what it adds on top of plain text attention
            out = out + (previous(call.q, call.k_text, call.v_text, call.extra_options) - text_only)
        return out


def add_rows(out: torch.Tensor, rows: list[int], extra: torch.Tensor) -> torch.Tensor:
    """``out[rows] += extra``; in place when autograd is not recording (``out`` is a fresh attention
    output owned by the patch), else on a copy so autograd keeps what it saved."""
    if torch.is_grad_enabled() and (out.requires_grad or extra.requires_grad):
        out = out.clone()
    index = row_index(rows, out.shape[0], out.device)
    if isinstance(index, slice):
        out[index] += extra
    else:
        out.index_add_(0, index, extra)
    return out


def _square_grid(tokens: int) -> tuple[int, int]:
    side = int(round(math.sqrt(tokens)))
    return (side, side) if side * side == tokens else (1, tokens)


# ---------------------------------------------------------------------- installing on a ModelPatcher
def is_identity_patch(obj: Any) -> bool:
    return getattr(obj, "_likeness_identity_attention", None) is not None and callable(obj)


def find_patch_in_options(transformer_options: dict) -> IdentityAttentionPatch | None:
    """The patch object among ``transformer_options["patches_replace"]["attn2"]`` (UNet) or ``["dit"]`` (or None)."""
    replaces = transformer_options.get("patches_replace", {})
    for value in replaces.get("attn2", {}).values():
        if is_identity_patch(value):
            return value
    for value in replaces.get("dit", {}).values():
        if getattr(value, "_likeness_dit_entry", None) is not None:
            return value.patch
    return None


def check_injector_kind(injector: Injector, dit: bool) -> None:
    """Decoupled injectors need a UNet's cross-attention, residual ones a DiT's blocks."""
    if dit and injector.kind == "decoupled":
        raise UnsupportedModelError(f"{injector.name} is an SD1.5/SDXL (UNet) technique; the MODEL is a "
                                    "Flux-family DiT: use PuLID-FLUX or Face Fusion on Flux")
    if not dit and injector.kind == "residual":
        raise UnsupportedModelError(f"{injector.name} runs on Flux-family DiT blocks; the MODEL is a UNet "
                                    "(SD1.5/SDXL)")


def find_patch(model: Any) -> IdentityAttentionPatch | None:
    """The patch installed on a ModelPatcher (or in a ``model_options`` dict), or None."""
    options = model if isinstance(model, dict) else getattr(model, "model_options", {})
    return find_patch_in_options(options.get("transformer_options", {}))


def identity_attention_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                               transformer_options=None, **kwargs):
    """APPLY_MODEL wrapper registered once per model: hands the call to the clone's patch object."""
    transformer_options = transformer_options if transformer_options is not None else {}
    patch = find_patch_in_options(transformer_options)
    if patch is None or PASS_KEY in transformer_options:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    return patch.run_pass(executor, x, t, c_concat, c_crossattn, control, transformer_options,
                          base_model=getattr(executor, "class_obj", None), **kwargs)


def install(model_patcher: Any, **options) -> IdentityAttentionPatch:
    """The patch object of ``model_patcher``, installing it on every site first if needed.

    Call on a clone (``m = model.clone()``): this edits ``m``'s options copy-on-write. Another pack's
    attn2 replace already at a site is kept and still applied (see ``IdentityAttentionPatch.previous``).
    ``options`` (``capture_batch``, ``trim_reference_text_attention``, ``stats``) configure a new patch;
    clones made later inherit them.
    """
    patch = find_patch(model_patcher)
    if patch is not None:
        if options:
            raise TypeError(f"the identity-attention patch of this model exists already; options {sorted(options)} "
                            "are set when it is installed")
        _ensure_wrapper(model_patcher)
        return patch
    from ..host.attention import host_base_attention  # comfy's optimized attention, if running in the host

    sites = find_sites(model_patcher)
    patch = IdentityAttentionPatch(sites, host_base_attention(), _model_object(model_patcher, "model_sampling"),
                                   device=_current_device(model_patcher), **options)
    if patch.dit:
        _install_dit(model_patcher, patch)
    else:
        _install_unet(model_patcher, patch)
    _ensure_wrapper(model_patcher)
    return patch


def _install_dit(model_patcher: Any, patch: IdentityAttentionPatch) -> None:
    """One :class:`~.dit.DitBlockEntry` per block, keeping another pack's block replacement found there."""
    dit = dit_model_of(model_patcher)
    patch.patch_size = int(getattr(dit, "patch_size", 2))
    patch.dit_ref = weakref.ref(dit)
    replaces = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for site in patch.sites:
        previous = replaces.get(site.key)
        if previous is not None:
            logger.info("Likeness: keeping another pack's block patch at %s", site.key)
        model_patcher.set_model_patch_replace(DitBlockEntry(patch, site, previous), "dit", site.key[0], site.block_id)


def _install_unet(model_patcher: Any, patch: IdentityAttentionPatch) -> None:
    sites = patch.sites
    replaces = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for site in sites:
        previous = replaces.get(site.key) or replaces.get(site.block)
        if previous is not None and not is_identity_patch(previous):
            patch.previous[site.index] = previous
            logger.info("Likeness: keeping another pack's attention patch at %s", site.key)
        model_patcher.set_model_attn2_replace(patch, site.block[0], site.block[1], site.block_index)
    model_patcher.set_model_attn2_patch(patch.attn2_input)


def _model_object(model_patcher: Any, name: str) -> Any:
    if not hasattr(model_patcher, "get_model_object"):
        return None
    try:
        return model_patcher.get_model_object(name)
    except (AttributeError, KeyError):
        return None


def _current_device(model_patcher: Any) -> torch.device | None:
    """Where ComfyUI has the model now (its next load or offload calls ``to`` again), or None."""
    current = getattr(model_patcher, "current_loaded_device", None)
    return torch.device(current()) if callable(current) else None


def release_step_captures(model_patcher: Any) -> None:
    """ON_CLEANUP callback: after sampling, free per-step reference states (cached ones are kept)."""
    patch = find_patch(model_patcher)
    if patch is not None:
        patch.captures = {uid: c for uid, c in patch.captures.items() if c.cached}


def _ensure_wrapper(model_patcher: Any) -> None:
    if not hasattr(model_patcher, "add_wrapper_with_key"):
        return
    if not model_patcher.get_wrappers(APPLY_MODEL, WRAPPER_KEY):
        model_patcher.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, identity_attention_wrapper)
    if hasattr(model_patcher, "add_callback_with_key") and not model_patcher.get_callbacks(ON_CLEANUP, WRAPPER_KEY):
        model_patcher.add_callback_with_key(ON_CLEANUP, WRAPPER_KEY, release_step_captures)


def add_injector(model_patcher: Any, injector: Injector) -> IdentityAttentionPatch:
    """Install the patch on ``model_patcher`` (a clone you own) if needed and append ``injector``."""
    patch = install(model_patcher)
    patch.add(injector)
    return patch


def attach_stats(model_patcher: Any) -> EngineStats:
    """Count the engine's work on ``model_patcher`` (a clone you own) from now on, installing the patch if
    needed (tests and benchmarks; nothing is counted without it)."""
    patch = install(model_patcher)
    patch.stats = EngineStats()
    return patch.stats
