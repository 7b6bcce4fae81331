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
self-attention keys are spatially redundant). The queries keep every token, so every ``h_f`` keeps its
shape; the keys of one window are near-equal, and when they are equal the result is exact (a uniform
``log(k*k)`` logit bias on all keys cancels in the softmax). At 512 px that level's attention is ~20 % of
a reference pass (4096 x 4096 tokens at five sites); 2x2 pooling cuts it to a quarter.

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


class CaptureComplete(Exception):
    """Raised inside the reference pass once every needed site was recorded (stops the UNet early)."""


@dataclass
class ReferenceLatents:
    """Reference latents in the VAE's latent space (``[n, C, h, w]``, before ``process_latent_in``)
    with a fixed noise (seeded) used to noise them to a sigma."""

    latents: torch.Tensor
    noise_seed: int = 0
    _noise: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.latents, torch.Tensor) or self.latents.ndim != 4:
            raise InvalidInputError("reference latents must be a [n, C, h, w] tensor")
        self.latents = self.latents.detach()

    @property
    def count(self) -> int:
        return int(self.latents.shape[0])

    def noise(self) -> torch.Tensor:
        if self._noise is None:
            gen = torch.Generator(device="cpu").manual_seed(int(self.noise_seed))
            self._noise = torch.randn(self.latents.shape, generator=gen, dtype=torch.float32)
        return self._noise

    def __deepcopy__(self, memo):
        return self


@dataclass
class CaptureRequest:
    """What an injector asks the engine to capture before this UNet call.

    ``sigma``: ``[n]`` tensor (model device) the references are noised to (0 = clean).
    ``key``: identifies the capture; an equal key reuses the stored one (same step, or cached).
    ``context``: ``[1 | n, L, ctx_dim]`` text the reference stream sees, or None for zeros.
    ``sites``: site indices to record (None = all the injector uses).
    ``template_row``: batch row of the real call whose extra conds (e.g. SDXL ``y``) the references copy.
    """

    latents: ReferenceLatents
    sigma: torch.Tensor
    key: Hashable
    cached: bool
    sites: frozenset[int] | None = None   # None: every site where the injector's weight is not 0
    context: torch.Tensor | None = None
    template_row: int = 0
    key_downsample: int = 1               # >1: reference self-attention keys pooled k x k at the top level


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

    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.states.values())
        for value in self.derived.values():
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


class CaptureRecorder:
    """Collects ``h_f`` during a reference pass; raises :class:`CaptureComplete` when done."""

    def __init__(self, wanted: frozenset[int], stop_when_done: bool = True):
        self.wanted = wanted
        self.stop_when_done = stop_when_done   # False when the references ride in the real batch
        self.states: dict[int, torch.Tensor] = {}
        self.zero_context = False   # the reference stream sees an all-zero text context
        self.trim_text_attention = False   # ... and attn2 runs on one query token (patch.TRIM_REFERENCE_...)

    def record(self, site: AttentionSite, hidden: torch.Tensor) -> None:
        if site.index in self.wanted:
            self.states[site.index] = hidden.detach()
            if self.stop_when_done and len(self.states) == len(self.wanted):
                raise CaptureComplete()


class ReferenceKeyDownsampling:
    """attn1_patch of a reference pass: self-attention keys/values at the top level pooled ``k x k``.

    ComfyUI calls an ``attn1_patch`` with ``(n, context, value, extra_options)`` before ``to_k``/``to_v``,
    so pooling here also saves the key/value projections. Only self-attention (context and value are
    ``n`` itself) on a ``tokens``-token grid is pooled; everything else passes through.
    """

    likeness_batch_safe = True   # row-wise: extra batch rows do not matter

    def __init__(self, window: int, tokens: int):
        if window < 1:
            raise InvalidInputError(f"key downsampling window must be >= 1, got {window}")
        self.window = int(window)
        self.tokens = int(tokens)
        self.pooled_calls = 0

    def __call__(self, n: torch.Tensor, context, value, extra_options: dict):
        if self.window == 1 or context is not n or value is not n or n.shape[1] != self.tokens:
            return n, context, value
        grid = tuple(int(v) for v in extra_options.get("activations_shape", ())[-2:])
        if len(grid) != 2 or grid[0] * grid[1] != self.tokens:
            return n, context, value
        pooled = pool_key_grid(n, grid, (self.window, self.window))
        self.pooled_calls += 1
        return n, pooled, pooled

    def __deepcopy__(self, memo):
        return self


def reference_input(request: CaptureRequest, model_sampling: Any, process_latent_in: Callable | None,
                    device, dtype) -> torch.Tensor:
    """The noised reference batch ``x`` the UNet is called with (``noise_scaling`` at the request's sigma)."""
    latents = request.latents.latents.to(device=device, dtype=torch.float32)
    if process_latent_in is not None:
        latents = process_latent_in(latents)
    noise = request.latents.noise().to(device=device)
    sigma = request.sigma.to(device=device, dtype=torch.float32)
    if model_sampling is None:
        x = latents + noise * sigma.view(-1, 1, 1, 1)
    else:
        x = model_sampling.noise_scaling(sigma, noise, latents)
    return x.to(dtype)


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
