"""Reference capture: run the UNet on reference latents and record each site's cross-attention input.

Face Fusion's reference stream: the reference face latent goes through the same frozen UNet and at every
cross-attention site the hidden state entering ``attn2`` (``norm2`` output, ``[n, N_h, C]``) is kept as
``h_f`` for that site. The engine's attn2 *input* patch records it while the patch runs in capture mode;
the pass stops (a private exception) as soon as the last needed site was recorded, so the tail of the
UNet (last feed-forward, SDXL's attention-free high-resolution output blocks, the output conv) is skipped.

Modes (:data:`CAPTURE_MODES`):
- ``per_step`` (the paper): the reference is noised to the current sigma every step (fixed noise), one
  extra UNet pass per step (batch = number of references), reused by every chunk of that step.
- ``cached_clean``: one pass on the clean latent (sigma 0) per model clone; K/V are projected once.
- ``cached_sigma``: one pass at a fixed point of the schedule (``sigma_percent``), K/V projected once.

Reference self-attention downsampling (``CaptureRequest.key_downsample``, Face Fusion's default 2): in the
reference pass, the self-attention (attn1) of the highest-resolution level attends to keys and values
average-pooled over ``k x k`` windows of its token grid (ToDo, Smith et al. 2024: SD's high-resolution
self-attention keys are spatially redundant). The level is the highest-resolution one that has attention
(SD1.5: the latent grid; SDXL, whose first level is convolution only: latent / 2). The queries keep every token, so every ``h_f`` keeps its
shape; the keys of one window are near-equal, and when they are equal the result is exact (a uniform
``log(k*k)`` logit bias on all keys cancels in the softmax). At 512 px that level's attention is ~20 % of
a reference pass (4096 x 4096 tokens at five sites); 2x2 pooling cuts it to a quarter.

The reference pass itself (:func:`reference_batch`, :func:`run_reference_passes`) runs at most
``batch_size`` references per UNet call (bounded activation memory), with ``cond_or_uncond = [0]`` and
its own copy of the options. With the all-zero text context attn2's output is exactly ``to_out``'s bias
at every token (K = V = 0), so the capture tap may hand ComfyUI a single query token
(``trim_text_attention``; only when every other attn2 input/output patch is token-count agnostic, see
:func:`token_safe_patches`), skipping ``to_q`` and ``to_out`` on every token of every site.

Devices: reference latents, their noise, the reference text and the captured states follow the model
through ``to(device)`` (ComfyUI's model-patch protocol, driven by the patch object), so a reference pass
copies nothing between devices.

Memory: only the sites' ``h_f`` are kept (SD1.5 at 64x64: 5.7 M floats per reference, 22 MiB fp32),
one capture per injector (a new step replaces the previous one); cached modes keep the projected
K/V instead (twice that) and drop ``h_f``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch

from ..errors import InvalidInputError
from .kernels import pool_key_grid
from .sites import AttentionSite

CAPTURE_MODES = ("per_step", "cached_clean", "cached_sigma")
# Attribute an attn2 input/output patch sets to say it accepts a one-token ``n`` (see trim_text_attention).
TOKEN_SAFE_ATTR = "likeness_token_safe"


class CaptureComplete(Exception):
    """Raised inside the reference pass once every needed site was recorded (stops the UNet early)."""


@dataclass
class ReferenceLatents:
    """Reference latents in the VAE's latent space (``[n, C, h, w]``, before ``process_latent_in``)
    with a fixed noise used to noise them to a sigma: ``noise`` when given (a trainer's per-row draw), else
    drawn on the CPU once from ``noise_seed``."""

    latents: torch.Tensor
    noise_seed: int = 0
    noise: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.latents, torch.Tensor) or self.latents.ndim != 4:
            raise InvalidInputError("reference latents must be a [n, C, h, w] tensor")
        self.latents = self.latents.detach()
        if self.noise is None:
            gen = torch.Generator(device="cpu").manual_seed(int(self.noise_seed))
            self.noise = torch.randn(self.latents.shape, generator=gen, dtype=torch.float32)
        elif self.noise.shape != self.latents.shape:
            raise InvalidInputError(f"reference noise {tuple(self.noise.shape)} does not match the reference latents "
                                    f"{tuple(self.latents.shape)}")
        self.noise = self.noise.to(self.latents.device)

    @property
    def count(self) -> int:
        return int(self.latents.shape[0])

    def to(self, device: torch.device) -> "ReferenceLatents":
        self.latents, self.noise = self.latents.to(device), self.noise.to(device)
        return self

    def __deepcopy__(self, memo):
        return self


@dataclass
class CaptureRequest:
    """What an injector asks the engine to capture before this UNet call.

    ``sigma``: ``[n]`` tensor (model device) the references are noised to (0 = clean).
    ``key``: identifies the capture; an equal key reuses the stored one (same step, or cached).
    ``context``: ``[1 | n, L, ctx_dim]`` text the reference stream sees (model device), or None for zeros.
    ``sites``: site indices to record (None = all the injector uses).
    ``template_row``: batch row of the real call whose extra conds (e.g. SDXL ``y``) the references copy.
    ``template_rows``: one row per reference instead (per-row references: reference i copies the extra conds
    and concat of row ``template_rows[i]``, so a trainer's row i and its reference see the same ``y``).
    """

    latents: ReferenceLatents
    sigma: torch.Tensor
    key: Hashable
    cached: bool
    sites: frozenset[int] | None = None   # None: every site where the injector's weight is not 0
    context: torch.Tensor | None = None
    template_row: int = 0
    key_downsample: int = 1               # >1: reference self-attention keys pooled k x k at the top level
    template_rows: tuple[int, ...] | None = None
    # DiT: the first RoPE axis of the reference's image tokens in its pass (0: the generation's own positions; FLUX.1
    # Kontext puts reference images at 1, rows and columns unchanged), so its recorded keys carry those positions
    dit_position_index: int = 0


def move_tensors(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (itself, or inside tuples/lists) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(move_tensors(v, device) for v in value)
    return value


@dataclass
class CapturedStates:
    """``h_f`` per site (``{site.index: [n, N, C]}``) plus per-site memo of what was derived from it."""

    key: Hashable
    states: dict[int, torch.Tensor] = field(default_factory=dict)
    cached: bool = False
    derived: dict[Hashable, Any] = field(default_factory=dict)

    def derive(self, site: AttentionSite, tag: Hashable, fn: Callable[[torch.Tensor], Any],
               memo: bool = True) -> Any:
        """``fn(h_f)`` for ``site``, computed once per capture (e.g. projected K/V, shared by all chunks).

        ``memo=False`` recomputes (use while training: the projection's weights change between steps).
        """
        slot = (site.index, tag)
        if memo and slot in self.derived:
            return self.derived[slot]
        value = fn(self.states[site.index])
        if memo:
            self.derived[slot] = value
        return value

    def drop_states(self) -> None:
        """Free ``h_f`` once everything needed was derived (cached modes)."""
        self.states = {}

    def to(self, device: torch.device) -> "CapturedStates":
        self.states = {site: move_tensors(t, device) for site, t in self.states.items()}
        self.derived = {slot: move_tensors(value, device) for slot, value in self.derived.items()}
        return self


class CaptureRecorder:
    """Collects ``h_f`` during a reference pass; raises :class:`CaptureComplete` when done."""

    def __init__(self, wanted: frozenset[int], zero_context: bool = False, trim_text_attention: bool = False,
                 position_index: int = 0, grid: tuple[int, int] | None = None):
        self.wanted = wanted
        self.states: dict[int, torch.Tensor] = {}
        self.zero_context = zero_context   # the reference stream sees an all-zero text context
        self.trim_text_attention = trim_text_attention   # ... and attn2 runs on one query token
        self.position_index = position_index   # DiT: the reference image tokens' first RoPE axis (see CaptureRequest)
        self.grid = grid                        # DiT: the reference's token grid
        self.positions: Any = None              # DiT: the pass's rotary embedding, made once by the first block

    def record(self, site: Any, hidden: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        """Keep ``hidden`` (a UNet site's ``h_f``; a DiT block's ``(k, v)``) for ``site``."""
        if site.index in self.wanted:
            self.states[site.index] = tuple(t.detach() for t in hidden) if isinstance(hidden, tuple) \
                else hidden.detach()
            if len(self.states) == len(self.wanted):
                raise CaptureComplete()


@dataclass
class PassContext:
    """State of one UNet call, passed to every site in ``transformer_options[PASS_KEY]``."""

    sigma: float
    model_sampling: Any = None
    active: tuple = ()                            # the injectors active at this sigma
    captures: dict = field(default_factory=dict)  # injector uid -> CapturedStates
    recorder: CaptureRecorder | None = None      # a reference pass: record, inject nothing
    txt_tokens: int = 0                           # DiT: text tokens ahead of the image tokens (set by the blocks)
    grid: tuple[int, int] | None = None           # DiT: the generated image's token grid (set by the wrapper)

    def __deepcopy__(self, memo):  # never copied with the options it travels in
        return self


class ReferenceKeyDownsampling:
    """attn1_patch of a reference pass: self-attention keys/values at the top level pooled ``k x k``.

    ComfyUI calls an ``attn1_patch`` with ``(n, context, value, extra_options)`` before ``to_k``/``to_v``,
    so pooling here also saves the key/value projections. Only self-attention (context and value are
    ``n`` itself) on a ``tokens``-token grid is pooled; everything else passes through.
    """

    def __init__(self, window: int, tokens: int):
        if window < 1:
            raise InvalidInputError(f"key downsampling window must be >= 1, got {window}")
        self.window = int(window)
        self.tokens = int(tokens)

    def __call__(self, n: torch.Tensor, context, value, extra_options: dict):
        if self.window == 1 or context is not n or value is not n or n.shape[1] != self.tokens:
            return n, context, value
        grid = tuple(int(v) for v in extra_options.get("activations_shape", ())[-2:])
        if len(grid) != 2 or grid[0] * grid[1] != self.tokens:
            return n, context, value
        pooled = pool_key_grid(n, grid, (self.window, self.window))
        return n, pooled, pooled

    def __deepcopy__(self, memo):
        return self


# ---------------------------------------------------------------------- running a reference pass
@dataclass
class ReferenceBatch:
    """The reference rows of one capture: noised latents, sigmas, text, concat and extra conds."""

    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor | None
    concat: torch.Tensor | None
    kwargs: dict


def reference_input(request: CaptureRequest, model_sampling: Any, process_latent_in: Callable | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """The noised reference batch ``x`` the UNet is called with (``noise_scaling`` at the request's sigma)."""
    latents = request.latents.latents.float()
    if process_latent_in is not None:
        latents = process_latent_in(latents)
    noise = request.latents.noise
    sigma = request.sigma.float()
    if model_sampling is None:
        x = latents + noise * sigma.view(-1, 1, 1, 1)
    else:
        x = model_sampling.noise_scaling(sigma, noise, latents)
    return x.to(dtype)


def reference_batch(request: CaptureRequest, x: torch.Tensor, c_concat, c_crossattn, kwargs: dict, base_model: Any,
                    model_sampling: Any, zero_text_tokens: int | None = None) -> ReferenceBatch:
    """The reference pass's inputs, shaped like the real call ``(x, c_concat, c_crossattn, kwargs)``.

    ``zero_text_tokens``: length of the all-zero text context (None: as long as the real text; a DiT's joint
    attention pays for every text token, so its reference pass uses one)."""
    ref_x = reference_input(request, model_sampling, getattr(base_model, "process_latent_in", None), x.dtype)
    count = ref_x.shape[0]
    sigma = request.sigma.float()
    ref_t = sigma.expand(count) if sigma.numel() == 1 else sigma
    context = request.context
    if context is None and c_crossattn is not None:
        tokens = c_crossattn.shape[1] if zero_text_tokens is None else zero_text_tokens
        context = torch.zeros((1, tokens) + tuple(c_crossattn.shape[2:]), device=c_crossattn.device,
                              dtype=c_crossattn.dtype)
    if context is not None:
        context = context.expand(count, *context.shape[1:])
    batch = x.shape[0]
    if request.template_rows is not None:
        if len(request.template_rows) != count:
            raise InvalidInputError(f"{len(request.template_rows)} template rows for {count} references")
        rows = torch.tensor(request.template_rows, dtype=torch.long)
        return ReferenceBatch(ref_x, ref_t, context, select_rows(c_concat, batch, rows),
                              {name: select_rows(value, batch, rows) for name, value in kwargs.items()})
    ref_concat = None
    if isinstance(c_concat, torch.Tensor) and c_concat.shape[0] == batch:
        ref_concat = c_concat[request.template_row:request.template_row + 1].expand(count, *c_concat.shape[1:])
    return ReferenceBatch(ref_x, ref_t, context, ref_concat,
                          slice_extra_conds(kwargs, batch, request.template_row, count))


def select_rows(value: Any, batch: int, rows: torch.Tensor) -> Any:
    """``value``'s ``rows`` when it is a per-row tensor of the real batch (size ``batch``), else ``value``."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return value.index_select(0, rows.to(value.device))
    return value


def run_reference_passes(executor: Callable, request: CaptureRequest, ref: ReferenceBatch, options: dict,
                         model_sampling: Any, batch_size: int, trim: bool, pass_key: str,
                         dit_grid: tuple[int, int] | None = None) -> tuple[dict, int]:
    """Run the reference UNet pass(es), at most ``batch_size`` references each, each stopped after the last
    wanted site. ``options`` is the pass's own copy of the transformer options (``pass_key`` gets the pass's
    :class:`PassContext`); ``dit_grid``: a DiT reference's token grid. Returns ``({site: h_f}, passes run)``."""
    count = ref.x.shape[0]
    step = max(1, batch_size)
    zero_context = request.context is None
    parts: list[dict[int, torch.Tensor]] = []
    for start in range(0, count, step):  # bounded activation memory
        stop = min(count, start + step)
        recorder = CaptureRecorder(request.sites, zero_context, zero_context and trim, request.dit_position_index,
                                   dit_grid)
        options[pass_key] = PassContext(0.0, model_sampling, (), {}, recorder)
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
    return recorded, len(parts)


def add_key_downsampling(options: dict, request: CaptureRequest, ref_x: torch.Tensor, top_level: int = 0) -> bool:
    """Append the reference pass's self-attention key pooling to its own copy of the options. Returns False
    when it was asked for but another pack replaces attn1 (its kernel might not expect fewer keys).

    ``top_level``: the highest-resolution level that has attention (SD1.5: 0, the latent grid; SDXL: 1, half
    of it, since SDXL's first level has no transformer); its grid is the latent halved that many times,
    rounding up like the UNet's stride-2 convolutions."""
    if request.key_downsample <= 1:
        return True
    if any(options.get("patches_replace", {}).get("attn1", {}).values()):
        return False
    patches = dict(options.get("patches", {}))
    h, w = int(ref_x.shape[-2]), int(ref_x.shape[-1])
    for _ in range(max(0, top_level)):
        h, w = -(-h // 2), -(-w // 2)
    tokens = h * w
    patches["attn1_patch"] = list(patches.get("attn1_patch", ())) + [
        ReferenceKeyDownsampling(request.key_downsample, tokens)]
    options["patches"] = patches
    return True


def token_safe_patches(transformer_options: dict, own_tap: Callable) -> bool:
    """Whether every attn2 input/output patch besides ``own_tap`` (the engine's capture tap) accepts a
    one-token ``n``."""
    patches = transformer_options.get("patches", {})
    for name in ("attn2_patch", "attn2_output_patch"):
        for fn in patches.get(name, ()):
            if fn == own_tap or getattr(fn, TOKEN_SAFE_ATTR, False):
                continue
            return False
    return True


def slice_extra_conds(kwargs: dict, batch: int, row: int, count: int, offset: bool = False) -> dict:
    """Per-row extra conds (e.g. SDXL ``y``) for a reference pass.

    ``offset=False``: row ``row`` of the real batch (size ``batch``) repeated ``count`` times.
    ``offset=True``: rows ``row .. row+count`` of an already per-reference batch (size ``batch``).
    """
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
            if offset:
                out[name] = value[row:row + count]
            else:
                out[name] = value[row:row + 1].expand(count, *value.shape[1:]).contiguous()
        else:
            out[name] = value
    return out
