"""The engine on Flux-family DiT blocks (FLUX.1 dev / schnell / Kontext, Chroma): joint attention, residuals.

A DiT has no cross-attention: text and image tokens meet in one joint attention per block. ComfyUI lets a pack
replace a whole block (``transformer_options["patches_replace"]["dit"][("double_block", i)]``, called with the
block's inputs and ``{"original_block": ...}``) and route every attention call through
``transformer_options["optimized_attention_override"]`` (``wrap_attn``). The engine uses exactly those, never a
rebound model method, so other packs' patches keep working:

- one :class:`DitBlockEntry` per block holds the clone's patch object and the :class:`~.sites.DitSite`. When no
  injector is active at the call's sigma (or its weight at the block is 0) it calls the block untouched, so an
  unweighted model computes exactly what the unpatched one computes. Another pack's replacement found at the same
  key is kept and run in place of the bare block (it receives the engine's options, so both apply).
- joint injectors (Face Fusion) get an attention override on the entry's own copy of the options:
  :class:`DitAttention` joins their key groups to the block's joint softmax (:func:`.joint.joint_attention`, the
  UNet engine's code: log-sum-exp merge outside autograd, one softmax under it). Another override already in the
  options is chained: it computes the base attention and the engine adds what the identity keys change.
- residual injectors (PuLID) add ``delta`` to the block's output image tokens; the engine masks it per person on
  the token grid (tokens outside the mask, text and Kontext reference tokens get nothing).
- a reference pass (Face Fusion's capture) records the image tokens' keys and values per block through the same
  override and stops the DiT after the last block it needs.
- while autograd records (a trainer), every block's stream additions are made out of place (Flux's blocks add in
  place to a tensor a LayerNorm saved for backward, which autograd refuses), and by default the block runs under
  gradient checkpointing (recomputed in the backward pass: a DiT's activations are what bounds a trainer's memory);
  ``transformer_options[DIT_CHECKPOINT_KEY] = False`` keeps the activations instead (faster, more memory).

Token layout (``comfy.ldm.flux.model.Flux.forward_orig``): double blocks see ``txt`` and ``img`` streams and
attend over ``cat(txt, img)``; single blocks run on ``cat(txt, img)``. The text length comes from the double
blocks' ``txt`` stream (recorded on the pass context), the image token grid from the latent's size.
"""
from __future__ import annotations

import copy
import functools
import logging
import math
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

from .injectors import AttentionCall, BlockCall, ChunkLayout, KeyGroup
from .joint import joint_attention
from .kernels import merge_heads, split_heads
from .masks import rows_for
from .sites import DitSite

__all__ = ["DIT_CHECKPOINT_KEY", "DitAttention", "DitBlockEntry", "dit_query_bias", "token_grid"]

logger = logging.getLogger("likeness")

OVERRIDE_KEY = "optimized_attention_override"
DIT_CHECKPOINT_KEY = "likeness_dit_checkpoint"   # False: a trainer keeps activations instead of recomputing


def token_grid(latent_shape: tuple[int, ...], patch_size: int = 2) -> tuple[int, int]:
    """The image token grid ``(h, w)`` of a latent ``[..., H, W]`` (Flux's ``process_img`` rounding)."""
    h, w = int(latent_shape[-2]), int(latent_shape[-1])
    return (h + patch_size // 2) // patch_size, (w + patch_size // 2) // patch_size


def dit_query_bias(call: AttentionCall, grid_bias: torch.Tensor | None, masked: bool) -> torch.Tensor | None:
    """Widen a per-person grid bias ``[R, h*w]`` to every query of a DiT joint attention ``[R, N]``.

    Text queries and tokens past the grid (Kontext references) lie outside every person's mask: they get
    ``-inf`` for a masked identity and 0 for an unmasked one (``grid_bias`` None)."""
    if grid_bias is None and not masked:
        return None
    start, stop = call.image_span
    rows = grid_bias.shape[0] if grid_bias is not None else 1
    outside = float("-inf") if masked else 0.0
    bias = torch.full((rows, call.q.shape[1]), outside, dtype=torch.float32, device=call.q.device)
    if grid_bias is not None:
        bias[:, start:stop] = grid_bias.to(torch.float32)
    return bias


class DitBlockEntry:
    """``patches_replace["dit"][site.key]``: the clone's patch object at one block (see module doc)."""

    _likeness_dit_entry = 1   # duck-typed marker (the pack may be imported under any name)

    def __init__(self, patch: Any, site: DitSite, previous: Callable | None = None):
        self.patch = patch
        self.site = site
        self.previous = previous   # another pack's replacement of this block, run in place of the bare block

    def __call__(self, args: dict, extra: dict) -> dict:
        return self.patch.run_block(self, args, extra)

    def inner(self, extra: dict, recompute: bool = False) -> Callable[[dict], dict]:
        """The block as the engine runs it: another pack's replacement (given the bare block) or the bare block.

        ``recompute``: the call is replayed in the backward pass, so the bare block is bound to this entry's module
        here; ComfyUI's ``original_block`` closes over its loop variable and would by then run the last block."""
        if recompute:
            extra = dict(extra, original_block=functools.partial(call_block, self.patch.dit_block(self.site)))
        if self.previous is None:
            return extra["original_block"]
        return lambda args: self.previous(args, extra)

    # ComfyUI's model-patch protocol: forwarded to the patch object (and the kept replacement)
    def to(self, device_or_dtype) -> "DitBlockEntry":
        self.patch.to(device_or_dtype)
        if hasattr(self.previous, "to"):
            self.previous = self.previous.to(device_or_dtype)
        return self

    def models(self) -> list:
        found = list(self.patch.models())
        if hasattr(self.previous, "models"):
            found += [m for m in self.previous.models() if not any(m is f for f in found)]
        return found

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.patch = copy.deepcopy(self.patch, memo)   # the clone's one patch object (memoised)
        new.site = self.site
        new.previous = copy.deepcopy(self.previous, memo)
        return new


def call_block(block: torch.nn.Module, args: dict) -> dict:
    """Run one Flux-family block on the arguments ComfyUI hands a ``dit`` replacement (as ``forward_orig`` does)."""
    common = dict(vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"),
                  transformer_options=args.get("transformer_options"))
    if "txt" in args:
        img, txt = block(img=args["img"], txt=args["txt"], **common)
        return {"img": img, "txt": txt}
    return {"img": block(args["img"], **common)}


def run_block(patch: Any, entry: DitBlockEntry, args: dict, extra: dict, ctx: Any) -> dict:
    """One block call: untouched when nothing is active, else with the override and/or residuals."""
    site = entry.site
    if site.kind == "double" and isinstance(args.get("txt"), torch.Tensor):
        ctx.txt_tokens = int(args["txt"].shape[1])
    options = args.get("transformer_options") or {}
    if ctx.recorder is not None and ctx.recorder.position_index:
        args = dict(args, pe=reference_positions(patch, ctx.recorder, args))
    training = torch.is_grad_enabled()
    recompute = training and options.get(DIT_CHECKPOINT_KEY, True)
    inner = entry.inner(extra, recompute)
    joint = ctx.recorder is not None or any(
        i.kind == "joint" and i.weight_at(site) != 0.0 for i in ctx.active)
    residual = [] if ctx.recorder is not None else [
        (i, w) for i in ctx.active if i.kind == "residual" and (w := i.weight_at(site)) != 0.0]
    if not joint and not residual and not training:
        return inner(args)
    if patch.stats is not None and (joint or residual):
        patch.stats.site_calls[site.index] += 1
    if joint:
        options = dict(options)
        options[OVERRIDE_KEY] = DitAttention(patch, site, ctx, options.get(OVERRIDE_KEY))
        args = dict(args, transformer_options=options)
    if recompute:
        out = run_recomputed(inner, args)
    elif training:
        out = plain_stream_outputs(inner(stream_args(args)))
    else:
        out = inner(args)
    if residual:
        out = add_residuals(out, site, ctx, residual, options)
    return out


def reference_positions(patch: Any, recorder: Any, args: dict) -> torch.Tensor:
    """The rotary embedding of a reference pass whose image tokens sit at ``recorder.position_index`` on the first
    axis (Kontext's reference index; rows and columns as the generation's), text at 0 as ``forward_orig`` puts it;
    made once per pass with the DiT's own ``pe_embedder`` from the ids ``process_img`` would give."""
    if recorder.positions is not None:
        return recorder.positions
    pe = args["pe"]
    embedder = getattr(patch.dit_ref(), "pe_embedder", None)
    image = int(args["img"].shape[1])
    tokens = image + (int(args["txt"].shape[1]) if "txt" in args else 0)
    grid = recorder.grid if recorder.grid and recorder.grid[0] * recorder.grid[1] == image else None
    if embedder is None or grid is None or pe.shape[2] != tokens:
        patch._warn_once("refpos", "this DiT's reference tokens keep the generation's positions (no pe_embedder or an "
                         "unexpected token layout)")
        recorder.positions = pe
        return pe
    ids = torch.zeros(1, tokens, 3, dtype=torch.float32, device=pe.device)
    rows = torch.arange(grid[0], dtype=torch.float32, device=pe.device)
    cols = torch.arange(grid[1], dtype=torch.float32, device=pe.device)
    ids[0, tokens - image:, 0] = float(recorder.position_index)
    ids[0, tokens - image:, 1] = rows.repeat_interleave(grid[1])
    ids[0, tokens - image:, 2] = cols.repeat(grid[0])
    recorder.positions = embedder(ids).to(pe.dtype)
    return recorder.positions


class OutOfPlaceStream(torch.Tensor):
    """A stream tensor whose ``+=`` makes a new tensor: Flux's blocks write ``txt += ...`` / ``x += ...`` after a
    LayerNorm saved that same tensor for its backward pass, which autograd refuses and which a checkpoint's
    recomputation would silently differentiate through the wrong values."""

    def __iadd__(self, other):
        return self + other


def stream_args(args: dict) -> dict:
    """``args`` with the ``img`` / ``txt`` streams as :class:`OutOfPlaceStream`."""
    return {name: value.as_subclass(OutOfPlaceStream) if name in ("img", "txt") and isinstance(value, torch.Tensor)
            else value for name, value in args.items()}


def plain_stream_outputs(out: dict) -> dict:
    return {name: value.as_subclass(torch.Tensor) for name, value in out.items()}


def run_recomputed(inner: Callable[[dict], dict], args: dict) -> dict:
    """``inner(args)`` under gradient checkpointing (activations recomputed in the backward pass), its ``img`` and
    ``txt`` streams as :class:`OutOfPlaceStream` so the block's in-place additions leave saved tensors intact."""
    names = [name for name, value in args.items() if isinstance(value, torch.Tensor)]

    def block(*values):
        out = inner(stream_args(dict(args, **dict(zip(names, values, strict=True)))))
        return tuple(plain_stream_outputs(out)[k] for k in sorted(out))

    keys = sorted(("img", "txt") if "txt" in args else ("img",))
    results = checkpoint(block, *(args[n] for n in names), use_reentrant=False)
    return dict(zip(keys, results, strict=True))


def _grid(ctx: Any, image_tokens: int) -> tuple[int, int]:
    grid = getattr(ctx, "grid", None)
    if grid is not None and grid[0] * grid[1] <= image_tokens:
        return grid
    side = int(round(math.sqrt(image_tokens)))
    return (side, side) if side * side == image_tokens else (1, image_tokens)


def add_residuals(out: dict, site: DitSite, ctx: Any, residual: list, options: dict) -> dict:
    """Add each residual injector's (masked) delta to the block's output image tokens."""
    from .patch import add_rows

    stream = out["img"]
    txt = 0 if site.kind == "double" else int(ctx.txt_tokens)
    img = stream[:, txt:] if txt else stream
    layout = ChunkLayout.from_options(options, img.shape[0])
    call = BlockCall(img, site, layout, ctx.sigma, _grid(ctx, img.shape[1]), int(ctx.txt_tokens), options,
                     ctx.captures)
    updated = img
    for injector, weight in residual:
        for rows, delta in injector.residual(call, weight):
            if injector.region is not None:
                delta = delta * region_factor(injector.region, call, rows, delta.dtype)
            updated = add_rows(updated, rows, delta.to(updated.dtype))
    if updated is img:   # added in place (no autograd): the stream already holds the result
        return out
    out = dict(out)
    out["img"] = torch.cat((stream[:, :txt], updated), dim=1) if txt else updated
    return out


def region_factor(region: Any, call: BlockCall, rows: list[int], dtype: torch.dtype) -> torch.Tensor:
    """``[len(rows), N_img, 1]``: the region mask on the generated image's token grid, 0 on tokens past it."""
    h, w = call.grid
    inside = rows_for(region.tokens(h, w, dtype=dtype), rows, call.layout.chunk_size)
    extra = call.img.shape[1] - h * w
    if extra:
        inside = torch.cat((inside, inside.new_zeros(inside.shape[0], extra)), dim=1)
    return inside.unsqueeze(-1)


class DitAttention:
    """``optimized_attention_override`` for one block call: records a reference pass's keys/values, or joins the
    joint injectors' key groups to the block's attention (see module doc)."""

    def __init__(self, patch: Any, site: DitSite, ctx: Any, previous: Callable | None):
        self.patch, self.site, self.ctx, self.previous = patch, site, ctx, previous

    def base(self, func: Callable, q, k, v, heads: int, args: tuple, kwargs: dict) -> torch.Tensor:
        if self.previous is not None:
            return self.previous(func, q, k, v, heads, *args, **kwargs)
        return func(q, k, v, heads, *args, **kwargs)

    def __call__(self, func: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *args,
                 **kwargs) -> torch.Tensor:
        q4, k4, v4 = (q, k, v) if kwargs.get("skip_reshape") else (split_heads(t, heads) for t in (q, k, v))
        txt = int(self.ctx.txt_tokens)
        if self.ctx.recorder is not None:
            # keys/values of the reference's image tokens; raises CaptureComplete after the last block needed
            self.ctx.recorder.record(self.site, (merge_heads(k4[:, :, txt:]), merge_heads(v4[:, :, txt:])))
            return self.base(func, q, k, v, heads, args, kwargs)
        grid = _grid(self.ctx, q4.shape[2] - txt)
        options = kwargs.get("transformer_options") or {}
        call = AttentionCall(merge_heads(q4), merge_heads(k4), merge_heads(v4), self.site,
                             ChunkLayout.from_options(options, q4.shape[0]), self.ctx.sigma, heads, grid, options,
                             self.ctx.captures, image_span=(txt, txt + grid[0] * grid[1]))
        groups = self.key_groups(call)
        if not groups:
            return self.base(func, q, k, v, heads, args, kwargs)
        if kwargs.get("mask") is not None:
            self.patch._warn_once("ditmask", "a DiT attention mask is set (e.g. a text padding mask): identity "
                                  "keys are left out of the blocks that use it")
            return self.base(func, q, k, v, heads, args, kwargs)
        out, text_only = joint_attention(call, groups, keep_text=self.previous is not None)
        if self.previous is not None:   # keep what the other override changes on plain attention
            out = out + (self.base(func, q, k, v, heads, args, kwargs) - text_only)
        return split_heads(out, heads) if kwargs.get("skip_output_reshape") else out

    def key_groups(self, call: AttentionCall) -> list[KeyGroup]:
        groups: list[KeyGroup] = []
        for injector in self.ctx.active:
            weight = injector.weight_at(self.site)
            if injector.kind == "joint" and weight != 0.0:
                groups += injector.key_groups(call, weight)
        return [g for g in groups if g.rows and g.log_weight != -math.inf]
