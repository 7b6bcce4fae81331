"""Injectors: what a technique adds at each cross-attention site.

Two kinds, both driven by the one patch object (:mod:`.patch`):

- :class:`DecoupledInjector` (IP-Adapter / FaceID family, Face-MakeUp, ConsistentID):
  ``out = Attn(q, K_c, V_c) + w * mask * Attn(q, K_id, V_id)``. A subclass (or a ``provider``
  callable) supplies per-site identity keys/values for each chunk kind.
- :class:`JointInjector` (Face Fusion): returns :class:`KeyGroup` s, extra key/value blocks that
  join the text keys in ONE softmax, ``out = Attn(q, [K_c; K_1..K_n], [V_c; V_1..V_n])``, each with an
  optional additive per-query bias (Eq. 7's -inf) and a log-weight.

Batch layout: ComfyUI concatenates chunks (one per cond entry) in ``cond_or_uncond`` order, e.g.
``[1, 0, 0]`` = negative first, then two positives; every chunk has ``B / len(cond_or_uncond)`` rows
(the latent batch). :class:`ChunkLayout` turns that into row indices per chunk kind so each chunk gets
its own identity (positive tokens, negative/uncond tokens, or none). Without ``cond_or_uncond``
(a direct ``apply_model`` call, e.g. training) the whole batch is one positive chunk.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .masks import RegionMask, rows_for
from .sigma import SigmaRange, SiteWeights
from .sites import AttentionSite

POSITIVE = 0
NEGATIVE = 1

_uid = itertools.count(1)


@dataclass(frozen=True)
class ChunkLayout:
    """Which batch rows belong to which chunk, and each chunk's kind (0 positive, 1 negative)."""

    cond_or_uncond: tuple[int, ...]
    chunk_size: int

    @classmethod
    def from_options(cls, extra_options: dict, batch: int) -> "ChunkLayout":
        kinds = tuple(extra_options.get("cond_or_uncond") or ())
        if not kinds or batch % len(kinds) != 0:
            return cls((POSITIVE,), batch)
        return cls(kinds, batch // len(kinds))

    @property
    def batch(self) -> int:
        return self.chunk_size * len(self.cond_or_uncond)

    def chunk_rows(self, chunk: int) -> list[int]:
        start = chunk * self.chunk_size
        return list(range(start, start + self.chunk_size))

    def rows_of_kind(self, kind: int) -> list[int]:
        """Rows of every chunk of ``kind``; kinds other than 0 count as negative (1)."""
        rows: list[int] = []
        for chunk, k in enumerate(self.cond_or_uncond):
            if (k == POSITIVE) == (kind == POSITIVE):
                rows += self.chunk_rows(chunk)
        return rows

    def kinds(self) -> list[int]:
        """Kinds present (0 and/or 1), positive first."""
        present = {POSITIVE if k == POSITIVE else NEGATIVE for k in self.cond_or_uncond}
        return sorted(present)


def row_index(rows: Sequence[int], batch: int, device) -> slice | torch.Tensor:
    """A slice for contiguous rows (no copy when indexing), else an index tensor."""
    if rows and list(rows) == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(list(rows), dtype=torch.long, device=device)


def take_rows(x: torch.Tensor, index: slice | torch.Tensor) -> torch.Tensor:
    return x[index] if isinstance(index, slice) else x.index_select(0, index)


@dataclass
class AttentionCall:
    """What an injector sees at one attention call (q/k/v already projected, host layout ``[B,N,C]``)."""

    q: torch.Tensor
    k_text: torch.Tensor
    v_text: torch.Tensor
    site: AttentionSite
    layout: ChunkLayout
    sigma: float
    heads: int
    grid: tuple[int, int]           # (h, w) of this site's token grid, from activations_shape
    extra_options: dict
    captures: dict = field(default_factory=dict)   # injector uid -> captured reference states
    # DiT joint attention: q/k/v cover text + image tokens; (start, stop) of the generated image's h*w tokens.
    # None on a UNet (every query is an image token of ``grid``).
    image_span: tuple[int, int] | None = None

    def captured(self, injector: "Injector") -> Any:
        return self.captures.get(injector.uid)


@dataclass
class KeyGroup:
    """One block of extra keys/values for the joint softmax.

    Attributes:
        k, v: ``[1 | R, Nk, C]`` projected keys/values (``1`` broadcasts to all ``rows``). None when
            ``zero_keys`` is used.
        rows: batch rows this block is visible to.
        log_weight: added to every logit of the block (``log w``; 0 = plain Eq. 3).
        query_bias: None or additive ``[1 | R, Nq]`` per-query bias for the whole block (-inf blocks it:
            Eq. 7).
        zero_keys: ``Nk`` all-zero keys and values (an "uncond = zeros" identity) handled analytically.
        tag: label for logs and tests.
    """

    k: torch.Tensor | None
    v: torch.Tensor | None
    rows: list[int]
    log_weight: float = 0.0
    query_bias: torch.Tensor | None = None
    zero_keys: int = 0
    tag: str = ""


class Injector:
    """Base: weight, sigma range, per-site weights, optional image-space region mask.

    Injectors are shared between model clones (they hold the heavy tensors: adapter modules, embeds);
    per-clone state (captures, caches) lives on the patch object. ``name`` identifies the technique:
    adding an injector with the same name to a patch replaces the old one.

    Devices: the patch calls :meth:`to` when ComfyUI loads the model or offloads it (and when the injector
    is added to a patch whose model already sits on a device), so every tensor an injector owns lives where
    the model's activations are and the attention path copies nothing between devices. A subclass that
    owns more tensors (adapter modules, tokens, references) extends :meth:`to`; one that holds a separately
    loaded model returns its ModelPatcher from :meth:`models` so ComfyUI loads it with the UNet.
    """

    kind = "base"
    needs_capture = False

    def __init__(self, name: str, weight: float = 1.0, sigma_range: SigmaRange | None = None,
                 site_weights: SiteWeights | None = None, region: RegionMask | torch.Tensor | None = None):
        self.uid = next(_uid)
        self.name = name
        self.weight = float(weight)
        self.sigma_range = sigma_range or SigmaRange()
        self.site_weights = site_weights or SiteWeights()
        self.region = region if region is None or isinstance(region, RegionMask) else RegionMask(region)
        self._site_weight_cache: dict[int, float] = {}

    def is_active(self, sigma: float, model_sampling: Any = None) -> bool:
        """Called once per UNet call with the host-side sigma."""
        return self.weight != 0.0 and self.sigma_range.contains(sigma, model_sampling)

    def weight_at(self, site: AttentionSite) -> float:
        w = self._site_weight_cache.get(site.index)
        if w is None:
            w = self._site_weight_cache[site.index] = self.weight * self.site_weights.weight(site)
        return w

    def to(self, device: torch.device) -> "Injector":
        """Move the tensors this injector owns to ``device`` in place; returns ``self``."""
        if self.region is not None:
            self.region.to(device)
        return self

    def models(self) -> list:
        """ModelPatchers this injector holds, for ComfyUI to load and offload with the model (none here)."""
        return []

    def capture_request(self, t: torch.Tensor, sigma: float, layout: ChunkLayout, model_sampling: Any) -> Any:
        """Injectors with ``needs_capture`` return a :class:`~.capture.CaptureRequest` (or None) per UNet call.

        ``t``: the call's per-row sigmas (model device); ``sigma``: their max, already on the host."""
        return None

    def on_captured(self, states: Any, patch: Any) -> None:
        """Called once after a capture pass (e.g. project K/V and drop ``h_f`` in cached modes)."""

    def __deepcopy__(self, memo):  # shared by clones, never copied (see class doc)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, weight={self.weight})"


def stacking_name(injectors: Sequence[Injector], base: str) -> str:
    """``base``, or ``base#2``, ``base#3`` ...: a name none of ``injectors`` has. An apply node names its injector
    with this, so applying a technique a second time adds to the first instead of replacing it."""
    taken = {injector.name for injector in injectors}
    if base not in taken:
        return base
    return next(f"{base}#{n}" for n in itertools.count(2) if f"{base}#{n}" not in taken)


class DecoupledInjector(Injector):
    """``out += w * mask * Attn(q, K_id, V_id)``, per chunk kind.

    Supply identity keys/values either by subclassing :meth:`identity_kv` or with
    ``provider(site, kind) -> (k, v) | None`` where k, v are ``[1 | chunk_size, N_id, C]`` already
    projected for ``site`` (e.g. ``to_k_ip(tokens)``); return None for a kind that gets nothing
    (e.g. ``uncond="none"``). Memoise per site inside the provider: it is called on every attention call.
    A provider that owns tensors implements ``to(device)`` (and ``models()`` if it holds ModelPatchers);
    the injector forwards both.
    """

    kind = "decoupled"

    def __init__(self, name: str, provider: Callable[[AttentionSite, int], Any] | None = None, **kw):
        super().__init__(name, **kw)
        self.provider = provider

    def to(self, device: torch.device) -> "DecoupledInjector":
        super().to(device)
        if hasattr(self.provider, "to"):
            self.provider = self.provider.to(device)
        return self

    def models(self) -> list:
        return list(self.provider.models()) if hasattr(self.provider, "models") else []

    def identity_kv(self, call: AttentionCall, kind: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.provider is None:
            raise NotImplementedError("DecoupledInjector needs a provider or an identity_kv override")
        return self.provider(call.site, kind)

    def contributions(self, call: AttentionCall, weight: float) -> list[tuple[list[int], torch.Tensor]]:
        """``[(rows, extra [len(rows), Nq, C])]`` to add to the base output.

        Chunks whose identity tokens have the same length share ONE attention call (keys stacked per row),
        e.g. the positive and negative chunk of a CFG batch.
        """
        from .kernels import sdpa

        layout = call.layout
        by_kind = {kind: self.identity_kv(call, kind) for kind in layout.kinds()}
        parts: dict[int, list] = {}   # token count -> [(rows, k, v)] in batch order
        for chunk, kind in enumerate(layout.cond_or_uncond):
            kv = by_kind[POSITIVE if kind == POSITIVE else NEGATIVE]
            if kv is None:
                continue
            k, v = kv
            rows = layout.chunk_rows(chunk)
            if k.shape[0] not in (1, len(rows)):
                raise ValueError(f"identity tokens of batch {k.shape[0]} for a chunk of {len(rows)} rows")
            parts.setdefault(k.shape[1], []).append((rows, k.expand(len(rows), -1, -1), v.expand(len(rows), -1, -1)))
        out = []
        for entries in parts.values():
            rows = [r for entry in entries for r in entry[0]]
            k = entries[0][1] if len(entries) == 1 else torch.cat([e[1] for e in entries])
            v = entries[0][2] if len(entries) == 1 else torch.cat([e[2] for e in entries])
            index = row_index(rows, layout.batch, call.q.device)
            extra = sdpa(take_rows(call.q, index), k.to(call.q.dtype), v.to(call.q.dtype), call.heads)
            if self.region is not None:
                grid = self.region.tokens(*call.grid, dtype=call.q.dtype)
                extra = extra * (weight * rows_for(grid, rows, layout.chunk_size).unsqueeze(-1))
            elif weight != 1.0:
                extra = extra * weight
            out.append((rows, extra))
        return out


@dataclass
class BlockCall:
    """What a :class:`ResidualInjector` sees after one DiT block.

    ``img``: the block's output image tokens ``[B, N_img, C]`` (the first ``grid[0] * grid[1]`` are the generated
    image's, any further ones e.g. Kontext reference tokens); never modified in place by an injector.
    """

    img: torch.Tensor
    site: Any                      # attention_patches.sites.DitSite
    layout: ChunkLayout
    sigma: float
    grid: tuple[int, int]
    txt_tokens: int
    transformer_options: dict
    captures: dict = field(default_factory=dict)

    def captured(self, injector: "Injector") -> Any:
        return self.captures.get(injector.uid)


class ResidualInjector(Injector):
    """Adds a residual to the image tokens after a DiT block (PuLID-FLUX's cross-attention to the ID tokens).

    Override :meth:`residual`. The engine multiplies each returned delta by the injector's region mask on the
    token grid (tokens past the grid get 0), so a masked identity changes nothing outside its mask.
    """

    kind = "residual"

    def residual(self, call: BlockCall, weight: float) -> list[tuple[list[int], torch.Tensor]]:
        """``[(rows, delta [len(rows), N_img, C])]`` to add to ``call.img``; ``weight`` includes the site weight
        (multiply by it). Return ``[]`` at blocks the injector does not use."""
        raise NotImplementedError


class JointInjector(Injector):
    """Adds key/value blocks to the text keys' softmax (Face Fusion). Override :meth:`key_groups`."""

    kind = "joint"

    def key_groups(self, call: AttentionCall, weight: float) -> list[KeyGroup]:
        raise NotImplementedError

    @staticmethod
    def log_weight(weight: float) -> float:
        """The weight multiplies the attention mass of the added keys: a logit bias of ``log w``."""
        return math.log(weight) if weight > 0 else float("-inf")
