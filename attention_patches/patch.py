"""The one identity-attention patch object per model clone.

:class:`IdentityAttentionPatch` is installed with ModelPatcher's own API on every cross-attention site
(``set_model_attn2_replace`` per site key, ``set_model_attn2_patch`` for the reference-capture tap) plus
one APPLY_MODEL wrapper. It holds an ordered list of injectors, so several techniques stack on one model
(decoupled and joint injectors at the same site: the joint blocks join the text softmax, the decoupled
outputs are added afterwards).

Clone safety and cost: ``ModelPatcher.clone()`` deep-copies ``model_options``. The patch's
``__deepcopy__`` makes ONE new patch per clone (the deepcopy memo maps all site entries to it) that
shares the injectors (which own the heavy tensors and modules) and starts with empty per-clone caches;
nothing heavy is copied. Adding an injector to a clone never changes its parent.

Per UNet call the wrapper reads sigma to the host once, picks the injectors active at that sigma,
runs a reference capture if an injector asks for one (:mod:`.capture`), and passes a
:class:`PassContext` down in ``transformer_options``; attention calls compare only host floats.
Without the wrapper (e.g. another caller invoking the diffusion model directly) the patch still works
from ``extra_options["sigmas"]`` (one host read per new sigma tensor) but cannot capture references.
"""
from __future__ import annotations

import collections
import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from .capture import (
    CaptureComplete,
    CapturedStates,
    CaptureRecorder,
    CaptureRequest,
    ReferenceKeyDownsampling,
    reference_input,
    slice_extra_conds,
)
from .injectors import AttentionCall, ChunkLayout, Injector, KeyGroup, row_index, take_rows
from .kernels import attention_with_lse, joint_attention_concat, merge_heads, merge_into, sdpa, split_heads
from .sites import AttentionSite, find_sites, sites_by_key

logger = logging.getLogger("likeness")

PASS_KEY = "likeness_identity_pass"
WRAPPER_KEY = "likeness_identity_attention"
APPLY_MODEL = "apply_model"  # comfy.patcher_extension.WrappersMP.APPLY_MODEL
ON_CLEANUP = "on_cleanup"    # comfy.patcher_extension.CallbacksMP.ON_CLEANUP

# How joint (Face Fusion) attention is computed without autograd: "merge" = one attention per key block
# merged by log-sum-exp (exact; rows without identity skip the face keys; masks without an [Nq, Nk]
# tensor); "concat" = one SDPA over [K_c; K_f...] on the identity rows (Eq. 3 literally; falls back to
# "merge" for per-query masks). Measured in benchmarks/attention_overhead.py.
JOINT_STRATEGY = "merge"
# References per reference pass (more are captured in several passes: bounded activation memory).
CAPTURE_BATCH = 4
# Per-step capture: append the references to the real batch instead of a separate pass (True, "auto" =
# on CPU only, False). Exact, but measured no faster than the separate pass on the 2-core CPU
# (benchmarks/attention_overhead.py rows per-step / per-step-batched), so off by default. Never with a
# request's key_downsample > 1 (that pooling is a patch of the separate reference pass).
CAPTURE_IN_BATCH: bool | str = False
# Reference passes with the all-zero text context: attn2's output is exactly to_out's bias at every token
# (K = V = 0), so the capture tap hands ComfyUI a single query token and ``x + n`` broadcasts it; this
# skips to_q and to_out on every token of every site (~5 % of a reference pass at 512 px). Only when
# every other attn2 input/output patch in the options declares itself token-count agnostic.
TRIM_REFERENCE_TEXT_ATTENTION = True
TOKEN_SAFE_ATTR = "likeness_token_safe"

BaseAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, dict], torch.Tensor]


def torch_base_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         extra_options: dict) -> torch.Tensor:
    """Default text attention when the host's optimized attention is not available (plain tests)."""
    return sdpa(q, k, v, heads)


@dataclass
class PassContext:
    """State of one UNet call, passed to every site in ``transformer_options[PASS_KEY]``."""

    sigma: float
    model_sampling: Any = None
    active: tuple[Injector, ...] = ()
    captures: dict = field(default_factory=dict)
    recorder: CaptureRecorder | None = None      # a separate reference pass: record, inject nothing
    main_rows: int | None = None                 # in-batch capture: rows >= main_rows are the reference
    inbatch: CaptureRecorder | None = None       # ... and their recorder

    def __deepcopy__(self, memo):  # never copied with the options it travels in
        return self


@dataclass
class _ReferenceBatch:
    """The reference rows of one capture: noised latents, sigmas, text, concat and extra conds."""

    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor | None
    concat: torch.Tensor | None
    kwargs: dict


class IdentityAttentionPatch:
    """attn2 replacement for every site + capture tap + ordered injector list. See module doc."""

    _likeness_identity_attention = 1  # duck-typed marker (the pack may be imported under any name)

    def __init__(self, sites: Iterable[AttentionSite], base_attention: BaseAttention | None = None,
                 model_sampling: Any = None):
        self.sites: tuple[AttentionSite, ...] = tuple(sites)
        self.table = sites_by_key(self.sites)
        self.base_attention: BaseAttention = base_attention or torch_base_attention
        self.model_sampling = model_sampling
        self.injectors: list[Injector] = []
        self.joint_strategy = JOINT_STRATEGY
        self.capture_batch = CAPTURE_BATCH
        self.capture_in_batch: bool | str = CAPTURE_IN_BATCH
        self.trim_reference_text_attention = TRIM_REFERENCE_TEXT_ATTENTION
        self.previous: dict[int, Callable] = {}   # another pack's attn2 replace found at a site
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self.captures: dict[int, CapturedStates] = {}
        self.site_calls: collections.Counter = collections.Counter()   # joint/decoupled work done per site
        self.capture_passes = 0                                         # reference passes run
        self._fallback: tuple[Any, PassContext] | None = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ injectors
    def add(self, injector: Injector) -> None:
        """Append ``injector``; one with the same name is replaced in place (re-applying a technique)."""
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
        new.sites, new.table = self.sites, self.table
        new.base_attention, new.model_sampling = self.base_attention, self.model_sampling
        new.injectors = list(self.injectors)
        new.joint_strategy = self.joint_strategy
        new.capture_batch = self.capture_batch
        new.capture_in_batch = self.capture_in_batch
        new.trim_reference_text_attention = self.trim_reference_text_attention
        new.previous = copy.deepcopy(self.previous, memo)
        new._reset_runtime()
        return new

    # ------------------------------------------------------------------ per UNet call
    def active_at(self, sigma: float, model_sampling: Any) -> tuple[Injector, ...]:
        return tuple(i for i in self.injectors if i.is_active(sigma, model_sampling))

    def run_pass(self, executor: Callable, x: torch.Tensor, t: torch.Tensor, c_concat, c_crossattn, control,
                 transformer_options: dict, base_model: Any = None, **kwargs) -> torch.Tensor:
        """Body of the APPLY_MODEL wrapper: gate, capture references if asked, then run the real call."""
        model_sampling = getattr(base_model, "model_sampling", None) or self.model_sampling
        sigma = float(t.max())  # the one host read per UNet call
        ctx = PassContext(sigma, model_sampling, self.active_at(sigma, model_sampling))
        inbatch = None
        if any(i.needs_capture for i in ctx.active):
            layout = ChunkLayout.from_options(transformer_options, x.shape[0])
            for injector in ctx.active:
                if not injector.needs_capture:
                    continue
                request = injector.capture_request(t, sigma, layout, model_sampling)
                if request is None:
                    continue
                if request.sites is None:
                    request.sites = frozenset(s.index for s in self.sites if injector.weight_at(s) != 0.0)
                stored = self.captures.get(injector.uid)
                if stored is not None and stored.key == request.key:
                    ctx.captures[injector.uid] = stored
                    continue
                self.captures.pop(injector.uid, None)  # free the previous step's states first
                if inbatch is None and self._can_capture_in_batch(request, x, control, c_crossattn,
                                                                  transformer_options):
                    inbatch = (request, injector)
                    continue
                states = self._capture(executor, request, injector, x, c_concat, c_crossattn,
                                       transformer_options, kwargs, base_model, model_sampling)
                ctx.captures[injector.uid] = states
        options = dict(transformer_options)
        options[PASS_KEY] = ctx
        if inbatch is None:
            return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        return self._run_with_reference_rows(executor, ctx, inbatch, x, t, c_concat, c_crossattn, options,
                                             kwargs, base_model, model_sampling)

    # ------------------------------------------------------------------ reference capture
    def _can_capture_in_batch(self, request: CaptureRequest, x, control, c_crossattn, transformer_options) -> bool:
        """Whether the references may ride in the real batch (see ``CAPTURE_IN_BATCH``): only when nothing
        else could be confused by the extra rows: no ControlNet, no other pack's patches or UNet wrappers,
        references of the latent's size, no autograd, the zero text context."""
        mode = self.capture_in_batch
        if mode is False or (mode == "auto" and x.device.type != "cpu"):
            return False
        if request.cached or control is not None or request.context is not None or c_crossattn is None:
            return False
        if request.key_downsample > 1:
            return False   # the pooling applies to the reference pass only
        if request.latents.count > self.capture_batch or torch.is_grad_enabled():
            return False
        if tuple(request.latents.latents.shape[1:]) != tuple(x.shape[1:]):
            return False   # a reference of another size (or channel count) cannot share the batch
        if self.previous:
            return False
        to = transformer_options
        for fns in to.get("patches", {}).values():
            if any(isinstance(fn, tuple) or not _batch_safe(fn) for fn in fns):
                return False
        replaces = to.get("patches_replace", {})
        if any(name != "attn2" for name, table in replaces.items() if table):
            return False
        if any(not is_identity_patch(p) for p in replaces.get("attn2", {}).values()):
            return False
        wrappers = to.get("wrappers", {})
        for kind, by_key in wrappers.items():
            if any(fns and key != WRAPPER_KEY for key, fns in by_key.items()) and kind in (APPLY_MODEL,
                                                                                         "diffusion_model"):
                return False
        return True

    def _run_with_reference_rows(self, executor, ctx: PassContext, inbatch, x, t, c_concat, c_crossattn, options,
                                 kwargs, base_model, model_sampling) -> torch.Tensor:
        request, injector = inbatch
        ref = self._reference_inputs(request, x, c_concat, c_crossattn, kwargs, base_model, model_sampling)
        recorder = CaptureRecorder(request.sites, stop_when_done=False)
        recorder.zero_context = True
        states = CapturedStates(request.key, recorder.states, cached=False)   # filled live, site by site
        ctx.captures[injector.uid] = states
        ctx.main_rows, ctx.inbatch = x.shape[0], recorder
        self.capture_passes += 1
        batch = x.shape[0]
        extra = {}
        for name, value in kwargs.items():
            ref_value = ref.kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
                extra[name] = torch.cat([value, ref_value.to(value.dtype)])
            else:
                extra[name] = value
        out = executor(torch.cat([x, ref.x]), torch.cat([t, ref.t.to(t.dtype)]),
                       None if ref.concat is None else torch.cat([c_concat, ref.concat.to(c_concat.dtype)]),
                       torch.cat([c_crossattn, ref.context.to(c_crossattn.dtype)]), None, options, **extra)
        self._finish_capture(request, injector, states)
        return out[:batch]

    def _capture(self, executor, request: CaptureRequest, injector, x, c_concat, c_crossattn, transformer_options,
                 kwargs, base_model, model_sampling) -> CapturedStates:
        ref = self._reference_inputs(request, x, c_concat, c_crossattn, kwargs, base_model, model_sampling)
        return self._capture_passes(executor, request, injector, ref, transformer_options, model_sampling)

    def _reference_inputs(self, request: CaptureRequest, x, c_concat, c_crossattn, kwargs, base_model,
                          model_sampling) -> "_ReferenceBatch":
        process_in = getattr(base_model, "process_latent_in", None)
        ref_x = reference_input(request, model_sampling, process_in, x.device, x.dtype)
        count = ref_x.shape[0]
        sigma = request.sigma.to(device=x.device, dtype=torch.float32)
        ref_t = sigma.expand(count) if sigma.numel() == 1 else sigma
        context = request.context
        if context is None and c_crossattn is not None:
            context = torch.zeros((1,) + tuple(c_crossattn.shape[1:]), device=c_crossattn.device,
                                  dtype=c_crossattn.dtype)
        if context is not None:
            context = context.to(device=x.device).expand(count, *context.shape[1:])
        batch = x.shape[0]
        ref_concat = None
        if isinstance(c_concat, torch.Tensor) and c_concat.shape[0] == batch:
            ref_concat = c_concat[request.template_row:request.template_row + 1].expand(count, *c_concat.shape[1:])
        return _ReferenceBatch(ref_x, ref_t, context, ref_concat,
                               slice_extra_conds(kwargs, batch, request.template_row, count))

    def _capture_passes(self, executor, request: CaptureRequest, injector, ref: "_ReferenceBatch",
                        transformer_options: dict, model_sampling) -> CapturedStates:
        """Separate reference pass(es), at most ``capture_batch`` references each, stopped after the last site."""
        count = ref.x.shape[0]
        options = dict(transformer_options)
        options["cond_or_uncond"] = [0]
        options["uuids"] = []
        parts: list[dict[int, torch.Tensor]] = []
        step = max(1, self.capture_batch)
        trim = self.trim_reference_text_attention and _token_safe_patches(transformer_options, self)
        self._add_key_downsampling(options, request, ref.x)
        for start in range(0, count, step):  # bounded activation memory
            stop = min(count, start + step)
            recorder = CaptureRecorder(request.sites)
            recorder.zero_context = request.context is None
            recorder.trim_text_attention = recorder.zero_context and trim
            options[PASS_KEY] = PassContext(0.0, model_sampling, (), {}, recorder)
            self.capture_passes += 1
            try:
                with torch.no_grad():
                    executor(ref.x[start:stop], ref.t[start:stop],
                             None if ref.concat is None else ref.concat[start:stop],
                             None if ref.context is None else ref.context[start:stop], None, options,
                             **slice_extra_conds(ref.kwargs, count, start, stop - start, offset=True))
            except CaptureComplete:
                pass
            parts.append(recorder.states)
        recorded = parts[0] if len(parts) == 1 else {
            site: torch.cat([p[site] for p in parts]) for site in parts[0] if all(site in p for p in parts)}
        states = CapturedStates(request.key, recorded, cached=request.cached)
        self._finish_capture(request, injector, states)
        return states

    def _add_key_downsampling(self, options: dict, request: CaptureRequest, ref_x: torch.Tensor) -> None:
        """Append the reference pass's self-attention key pooling (see capture.py) to its own copy of the
        options, unless another pack replaces attn1 (its kernel might not expect fewer keys)."""
        if request.key_downsample <= 1:
            return
        if any(options.get("patches_replace", {}).get("attn1", {}).values()):
            self._warn_once("attn1", "another patch replaces self-attention: the reference pass keeps every "
                            "self-attention key (reference_downsample ignored)")
            return
        patches = dict(options.get("patches", {}))
        tokens = int(ref_x.shape[-2] * ref_x.shape[-1])
        patches["attn1_patch"] = list(patches.get("attn1_patch", ())) + [
            ReferenceKeyDownsampling(request.key_downsample, tokens)]
        options["patches"] = patches

    def _finish_capture(self, request: CaptureRequest, injector, states: CapturedStates) -> None:
        missing = request.sites - set(states.states)
        if missing:
            self._warn_once("missing", "reference capture did not reach %d site(s) %s; they get no reference "
                            "keys (is another patch replacing the UNet forward?)", len(missing), sorted(missing))
        injector.on_captured(states, self)
        self.captures[injector.uid] = states

    def _fallback_pass(self, extra_options: dict) -> PassContext:
        """No wrapper ran: derive sigma from ``extra_options["sigmas"]`` (one host read per tensor)."""
        sigmas = extra_options.get("sigmas")
        if self._fallback is not None and self._fallback[0] is sigmas:
            return self._fallback[1]
        sigma = float(sigmas.max()) if isinstance(sigmas, torch.Tensor) else math.inf
        ctx = PassContext(sigma, self.model_sampling, self.active_at(sigma, self.model_sampling),
                          {uid: c for uid, c in self.captures.items() if getattr(c, "cached", False)})
        if any(i.needs_capture for i in ctx.active) and not ctx.captures:
            self._warn_once("nowrapper", "identity attention ran without its sampling wrapper: reference "
                            "capture is unavailable for this call, so Face Fusion keys are skipped")
        self._fallback = (sigmas, ctx)
        return ctx

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("Likeness: " + message, *args)

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
        if ctx is not None:
            if ctx.recorder is not None:
                site = self._site(extra_options)
                if site is not None:
                    ctx.recorder.record(site, n)   # raises CaptureComplete after the last needed site
                    if ctx.recorder.trim_text_attention and site.index not in self.previous:
                        return n[:, :1], context, value   # see TRIM_REFERENCE_TEXT_ATTENTION
            elif ctx.inbatch is not None:
                site = self._site(extra_options)
                if site is not None:
                    ctx.inbatch.record(site, n[ctx.main_rows:])
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
        if ctx.inbatch is not None:  # reference rows ride along: zero context -> exactly zero output
            rows = ctx.main_rows
            main = self._inject(q[:rows], k[:rows], v[:rows], extra_options, site, ctx)
            return torch.cat([main, q.new_zeros((q.shape[0] - rows,) + tuple(q.shape[1:]))])
        return self._inject(q, k, v, extra_options, site, ctx)

    def _inject(self, q, k, v, extra_options: dict, site: AttentionSite, ctx: PassContext) -> torch.Tensor:
        self.site_calls[site.index] += 1
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
        q, k, v, heads = call.q, call.k_text, call.v_text, call.heads
        previous = self.previous.get(call.site.index)
        if torch.is_grad_enabled() and (q.requires_grad or any(g.k is not None and g.k.requires_grad for g in groups)):
            out = _joint_concat(call, groups)
            text_only = sdpa(q, k, v, heads) if previous is not None else None
        elif self.joint_strategy == "concat" and previous is None and _concat_friendly(groups):
            out = self._base(q, k, v, call.extra_options, call.site)
            index = row_index(groups[0].rows, q.shape[0], q.device)
            rows_n = len(groups[0].rows)
            keys = torch.cat([take_rows(k, index)] + [g.k.to(q.dtype).expand(rows_n, -1, -1) for g in groups], 1)
            values = torch.cat([take_rows(v, index)] + [g.v.to(q.dtype).expand(rows_n, -1, -1) for g in groups], 1)
            bias = None
            if any(g.log_weight for g in groups):
                bias = torch.cat([q.new_zeros(k.shape[1])] + [q.new_full((g.k.shape[1],), g.log_weight) for g in groups])
                bias = bias.view(1, 1, 1, -1)
            out[index] = sdpa(take_rows(q, index), keys, values, heads, bias)
            return out
        else:
            o, lse = attention_with_lse(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
            text_only = merge_heads(o).clone() if previous is not None else None  # o is updated in place below
            q4 = split_heads(q, heads)
            for group in groups:
                index = row_index(group.rows, q.shape[0], q.device)
                if group.zero_keys:
                    rows_n = len(group.rows)
                    o_g = torch.zeros((rows_n,) + tuple(o.shape[1:]), dtype=o.dtype, device=o.device)
                    l_g = torch.full((rows_n,) + tuple(lse.shape[1:]), math.log(group.zero_keys),
                                     dtype=lse.dtype, device=lse.device)
                else:
                    o_g, l_g = attention_with_lse(take_rows(q4, index), split_heads(group.k.to(q.dtype), heads),
                                                  split_heads(group.v.to(q.dtype), heads))
                if group.log_weight:
                    l_g = l_g + group.log_weight
                if group.query_bias is not None:
                    l_g = l_g + group.query_bias.to(l_g.dtype).unsqueeze(1)
                merged_o, merged_l = merge_into(take_rows(o, index), take_rows(lse, index), o_g, l_g)
                o[index], lse[index] = merged_o, merged_l
            out = merge_heads(o)
        if previous is not None:  # keep another pack's patch: add what it adds on top of plain text attention
            out = out + (previous(q, k, v, call.extra_options) - text_only)
        return out


def _concat_friendly(groups: list[KeyGroup]) -> bool:
    """The concatenated-keys strategy handles groups that share their rows and carry no per-query bias."""
    rows = groups[0].rows
    return all(g.rows == rows and g.query_bias is None and not g.zero_keys and g.k is not None for g in groups)


def _joint_concat(call: AttentionCall, groups: list[KeyGroup]) -> torch.Tensor:
    """Differentiable joint attention: every block scattered to all rows, rows outside a block masked."""
    q = call.q
    batch, n_q = q.shape[0], q.shape[1]
    k_blocks, v_blocks, biases = [call.k_text], [call.v_text], [None]
    for group in groups:
        index = torch.tensor(group.rows, dtype=torch.long, device=q.device)
        if group.zero_keys:
            k_g = q.new_zeros(1, group.zero_keys, q.shape[2])
            v_g = k_g
        else:
            k_g, v_g = group.k.to(q.dtype), group.v.to(q.dtype)
        n_k = k_g.shape[1]
        k_full = q.new_zeros(batch, n_k, q.shape[2]).index_copy(0, index, k_g.expand(len(group.rows), -1, -1))
        v_full = q.new_zeros(batch, n_k, q.shape[2]).index_copy(0, index, v_g.expand(len(group.rows), -1, -1))
        row_bias = torch.full((batch, n_q), float("-inf"), dtype=torch.float32, device=q.device)
        inside = torch.full((len(group.rows), n_q), float(group.log_weight), dtype=torch.float32, device=q.device)
        if group.query_bias is not None:
            inside = inside + group.query_bias.to(torch.float32)
        biases.append(row_bias.index_copy(0, index, inside))
        k_blocks.append(k_full)
        v_blocks.append(v_full)
    return joint_attention_concat(q, k_blocks, v_blocks, call.heads, biases)


def _token_safe_patches(transformer_options: dict, patch: "IdentityAttentionPatch") -> bool:
    """Whether every attn2 input/output patch besides ``patch``'s own tap accepts a one-token ``n``."""
    patches = transformer_options.get("patches", {})
    for name in ("attn2_patch", "attn2_output_patch"):
        for fn in patches.get(name, ()):
            if getattr(fn, "__self__", None) is patch or getattr(fn, TOKEN_SAFE_ATTR, False):
                continue
            return False
    return True


def _batch_safe(fn: Any) -> bool:
    """Our own tap, or a callable that declares it does not care about extra batch rows."""
    return is_identity_patch(getattr(fn, "__self__", None)) or bool(getattr(fn, "likeness_batch_safe", False))


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
    """The patch object among ``transformer_options["patches_replace"]["attn2"]`` (or None)."""
    replaces = transformer_options.get("patches_replace", {}).get("attn2", {})
    for value in replaces.values():
        if is_identity_patch(value):
            return value
    return None


def find_patch(model: Any) -> IdentityAttentionPatch | None:
    """The patch installed on a ModelPatcher (or in a ``model_options`` dict), or None."""
    options = model if isinstance(model, dict) else getattr(model, "model_options", {})
    return find_patch_in_options(options.get("transformer_options", {}))


def identity_attention_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                               transformer_options={}, **kwargs):
    """APPLY_MODEL wrapper registered once per model: hands the call to the clone's patch object."""
    patch = find_patch_in_options(transformer_options)
    if patch is None or PASS_KEY in transformer_options:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    return patch.run_pass(executor, x, t, c_concat, c_crossattn, control, transformer_options,
                          base_model=getattr(executor, "class_obj", None), **kwargs)


def install(model_patcher: Any) -> IdentityAttentionPatch:
    """The patch object of ``model_patcher``, installing it on every site first if needed.

    Call on a clone (``m = model.clone()``): this edits ``m``'s options copy-on-write. Another pack's
    attn2 replace already at a site is kept and still applied (see ``IdentityAttentionPatch.previous``).
    """
    patch = find_patch(model_patcher)
    if patch is not None:
        _ensure_wrapper(model_patcher)
        return patch
    from ..host.attention import host_base_attention  # comfy's optimized attention, if running in the host

    sites = find_sites(model_patcher)
    model_sampling = None
    if hasattr(model_patcher, "get_model_object"):
        try:
            model_sampling = model_patcher.get_model_object("model_sampling")
        except (AttributeError, KeyError):
            model_sampling = None
    patch = IdentityAttentionPatch(sites, host_base_attention(), model_sampling)
    replaces = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for site in sites:
        previous = replaces.get(site.key) or replaces.get(site.block)
        if previous is not None and not is_identity_patch(previous):
            patch.previous[site.index] = previous
            logger.info("Likeness: keeping another pack's attention patch at %s", site.key)
        model_patcher.set_model_attn2_replace(patch, site.block[0], site.block[1], site.block_index)
    model_patcher.set_model_attn2_patch(patch.attn2_input)
    _ensure_wrapper(model_patcher)
    return patch


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
