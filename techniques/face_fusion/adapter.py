"""FUSION_ADAPTER: Face Fusion's only trainable weights, ``Linear_kf`` and ``Linear_vf`` per site.

Paper §3.2 (Eq. 2): at every cross-attention layer l the reference stream's hidden state ``h_f``
(``[N_h, C_l]``, the tensor entering ``attn2``) is projected to ``K_f = Linear_kf(h_f)`` and
``V_f = Linear_vf(h_f)`` (C_l → C_l, no bias), which join the text keys/values (Eq. 3).

Initialisation (the paper does not say): from the SAME block's self-attention ``attn1.to_k`` /
``attn1.to_v``. They are the only pretrained C→C key/value projections in the block (attn2's to_k/to_v
take the 768/2048-d text, not C-dim hidden states), and they were trained to turn this block's hidden
states into keys/values that this block's queries attend to. So an untrained adapter already behaves
like "reference attention" (the generated image attending to the reference's features, as in
reference-only control) and training starts from a meaningful point instead of noise. Note q comes
from attn2's ``to_q``, so the match is approximate; training adapts it.

File format (safetensors, seed_architectures.md §4): ``fusion.{2k+1}.to_k_f.weight`` and
``fusion.{2k+1}.to_v_f.weight``, ``[C, C]``, k = diffusers processor order of the site (SD1.5: 16
sites → indices 1..31; SDXL: 70 → 1..139), plus string metadata: ``format=likeness.face_fusion``,
``format_version``, ``layout`` (``unet``; files written before it existed have none and are UNet files),
``base`` (sd15 / sd2 / sdxl / unknown, from the site structure), ``sites``, ``init``, and anything the trainer adds
(steps, lr, dataset, timestep mode). Files live in ``models/likeness/fusion/``.

One adapter family: :class:`FusionAdapterBase` holds what every layout shares (metadata and file metadata, the
``layout`` marker, the per-dtype weight cache, the refusal of a model of the other layout); :class:`FusionAdapter`
is the UNet layout above, :class:`~.flux_adapter.FluxFusionAdapter` the Flux-family DiT layout (``layout=dit``).
:func:`new_fusion_adapter` makes the one that fits a model and :func:`load_fusion_adapter` reads either file.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Iterable

import torch
from torch import nn

from ...attention_patches.sites import (
    AttentionSite,
    dit_model_of,
    family_name,
    find_unet_sites,
    is_dit_sites,
    transformer_blocks,
    unet_family,
)
from ...errors import CheckpointLayoutError, InvalidInputError
from ...safetensors_io import atomic_save, load_tensors

logger = logging.getLogger("likeness")

FORMAT = "likeness.face_fusion"
FORMAT_VERSION = "1"
KEY_PATTERN = re.compile(r"^fusion\.(\d+)\.to_([kv])_f\.weight$")
FOLDER, SUBFOLDER = "likeness", "fusion"
INIT_MODES = ("attn1",)
LAYOUT_KEY = "layout"
UNET_LAYOUT, DIT_LAYOUT = "unet", "dit"
LAYOUT_NAMES = {UNET_LAYOUT: "an SD1.5/SDXL UNet", DIT_LAYOUT: "a Flux-family DiT"}


def base_name(sites: Iterable[AttentionSite]) -> str:
    """``sd15`` / ``sd2`` / ``sdxl`` from the site structure (:func:`unet_family`), else ``unknown``."""
    return unet_family(sites)


class FusionSiteProjection(nn.Module):
    """``to_k_f`` and ``to_v_f`` of one site (C → C, no bias)."""

    def __init__(self, channels: int, dtype=torch.float32, device=None):
        super().__init__()
        self.to_k_f = nn.Linear(channels, channels, bias=False, dtype=dtype, device=device)
        self.to_v_f = nn.Linear(channels, channels, bias=False, dtype=dtype, device=device)


class FusionAdapterBase(nn.Module):
    """What every Fusion adapter layout shares (see the module doc). A subclass sets ``layout``, holds its
    projections and implements ``project(site, captured)``, ``file_state_dict()`` and ``check_layout_sites``."""

    layout = ""

    def __init__(self, metadata: dict[str, str] | None = None):
        super().__init__()
        self.metadata: dict[str, str] = dict(metadata or {})
        self._dtype_cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def file_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def file_metadata(self, extra: dict[str, Any] | None = None) -> dict[str, str]:
        meta = dict(self.metadata)
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
        meta.update({"format": FORMAT, "format_version": FORMAT_VERSION, LAYOUT_KEY: self.layout,
                     "sites": str(self.site_count())})
        return meta

    def site_count(self) -> int:
        raise NotImplementedError

    def check_sites(self, sites: Iterable[Any]) -> None:
        """Raise CheckpointLayoutError unless this adapter fits ``sites`` (the model's): first the layout (a UNet
        adapter on a DiT or the other way round), then the layout's own check of every site and width."""
        sites = list(sites)
        model_layout = DIT_LAYOUT if is_dit_sites(sites) else UNET_LAYOUT
        if model_layout != self.layout:
            raise CheckpointLayoutError(
                f"this Fusion adapter was made for {LAYOUT_NAMES.get(self.layout, self.layout)} "
                f"({self.made_for()}) but the MODEL is {LAYOUT_NAMES[model_layout]}: an adapter only fits the model "
                f"family it was made for; load one made for this model, or make or train one on it "
                f"(Fusion Adapter New / Train Face Fusion)")
        self.check_layout_sites(sites)

    def made_for(self) -> str:
        return family_name(self.metadata.get("base", "unknown"))

    def check_layout_sites(self, sites: list) -> None:
        raise NotImplementedError

    def cached_weights(self, key: tuple, live: tuple[torch.Tensor, ...], dtype) -> tuple[torch.Tensor, ...]:
        """``live`` weights in ``dtype``: the live tensors (cast, differentiably) while autograd records them, else
        copies cached per ``key`` (``key[0]`` names the site; a weight changed in place makes a new copy)."""
        if torch.is_grad_enabled() and any(w.requires_grad for w in live):
            return tuple(w.to(dtype=dtype) for w in live)
        full_key = key + (dtype,) + tuple(_version(w) for w in live)
        hit = self._dtype_cache.get(full_key)
        if hit is None:
            self._dtype_cache = {k: v for k, v in self._dtype_cache.items() if k[0] != key[0]}
            hit = tuple(w.detach().to(dtype=dtype) for w in live)
            self._dtype_cache[full_key] = hit
        return hit

    def _apply(self, fn, recurse=True):
        self._dtype_cache = {}   # moved or cast (nn.Module.to/cpu/cuda/half): the cached copies are stale
        return super()._apply(fn, recurse)


class FusionAdapter(FusionAdapterBase):
    """All sites' projections, keyed by the diffusers processor index ``2k+1`` (as a string).

    ``project(site, h) -> (K_f, V_f)``; ``weights_for(site, dtype)`` caches copies in another dtype for
    inference (never while autograd records, so training always uses the live parameters). The weights
    follow the model's device (the Face Fusion injector moves the adapter when ComfyUI moves the model).
    """

    layout = UNET_LAYOUT

    def __init__(self, channels_by_index: dict[int, int], metadata: dict[str, str] | None = None,
                 dtype=torch.float32):
        super().__init__(metadata)
        if not channels_by_index:
            raise InvalidInputError("a Fusion adapter needs at least one site")
        self.sites = nn.ModuleDict({str(i): FusionSiteProjection(c, dtype=dtype)
                                    for i, c in sorted(channels_by_index.items())})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: Any, init: str = "attn1") -> "FusionAdapter":
        """A new adapter for ``model`` (ModelPatcher / BaseModel / UNet), initialised from each site's
        block ``attn1.to_k`` / ``attn1.to_v`` (see the module doc)."""
        if init not in INIT_MODES:
            raise InvalidInputError(f"init must be one of {INIT_MODES}, got {init!r}")
        sites = find_unet_sites(model)
        blocks = transformer_blocks(model)
        adapter = cls({s.processor_index: s.channels for s in sites},
                      {"base": base_name(sites), "sites": str(len(sites)), "init": init})
        with torch.no_grad():
            for site in sites:
                attn1 = blocks[site.index].attn1
                proj = adapter.sites[str(site.processor_index)]
                for target, source in ((proj.to_k_f, attn1.to_k), (proj.to_v_f, attn1.to_v)):
                    weight = source.weight
                    if weight.shape != target.weight.shape:
                        raise CheckpointLayoutError(
                            f"site {site.key}: attn1 weight {tuple(weight.shape)} is not C x C = "
                            f"{tuple(target.weight.shape)}; this UNet cannot seed a Fusion adapter")
                    if weight.device.type == "meta":
                        raise InvalidInputError("the model's weights are not loaded (meta device)")
                    target.weight.copy_(weight.detach().to(torch.float32))
        return adapter

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> "FusionAdapter":
        """From the file's flat keys; raises CheckpointLayoutError naming what is wrong."""
        found: dict[int, dict[str, torch.Tensor]] = {}
        unknown = []
        for key, tensor in tensors.items():
            match = KEY_PATTERN.match(key)
            if not match:
                unknown.append(key)
                continue
            found.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        if unknown:
            raise CheckpointLayoutError(f"not a Face Fusion adapter: unexpected keys {unknown[:5]} "
                                        f"(expected fusion.<2k+1>.to_k_f.weight / to_v_f.weight)")
        if not found:
            raise CheckpointLayoutError("the file holds no fusion.*.to_k_f/to_v_f weights")
        channels = {}
        for index, pair in sorted(found.items()):
            if set(pair) != {"k", "v"}:
                raise CheckpointLayoutError(f"site {index}: needs both to_k_f and to_v_f, found {sorted(pair)}")
            shapes = {tuple(t.shape) for t in pair.values()}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2 or pair["k"].shape[0] != pair["k"].shape[1]:
                raise CheckpointLayoutError(f"site {index}: weights must be square C x C, got {sorted(shapes)}")
            if index % 2 != 1:
                raise CheckpointLayoutError(f"site index {index} is even; attn2 processor indices are odd (2k+1)")
            channels[index] = int(pair["k"].shape[0])
        adapter = cls(channels, metadata)
        with torch.no_grad():
            for index, pair in found.items():
                adapter.sites[str(index)].to_k_f.weight.copy_(pair["k"].float())
                adapter.sites[str(index)].to_v_f.weight.copy_(pair["v"].float())
        return adapter

    # ------------------------------------------------------------------ file format
    def file_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for index, proj in self.sites.items():
            out[f"fusion.{index}.to_k_f.weight"] = proj.to_k_f.weight.detach().contiguous().cpu()
            out[f"fusion.{index}.to_v_f.weight"] = proj.to_v_f.weight.detach().contiguous().cpu()
        return out

    def site_count(self) -> int:
        return len(self.sites)

    # ------------------------------------------------------------------ use
    def check_layout_sites(self, sites: list[AttentionSite]) -> None:
        """Raise CheckpointLayoutError unless every site has a projection of its width."""
        missing = [s for s in sites if str(s.processor_index) not in self.sites]
        widths_differ = not missing and any(self.sites[str(s.processor_index)].to_k_f.in_features != s.channels
                                            for s in sites)
        if missing or len(sites) != len(self.sites) or widths_differ:
            made_for = family_name(self.metadata.get("base", "unknown"))
            raise CheckpointLayoutError(
                f"this Fusion adapter was made for {made_for} ({len(self.sites)} sites) but the model is "
                f"{family_name(base_name(sites))} ({len(sites)} sites): an adapter only fits the model family it "
                f"was made for; make or train one on this model (Fusion Adapter New / Train Face Fusion)")

    def weights_for(self, site: AttentionSite, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        proj = self.sites[str(site.processor_index)]
        return self.cached_weights((site.processor_index,), (proj.to_k_f.weight, proj.to_v_f.weight), dtype)

    def project(self, site: AttentionSite, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 2: ``(Linear_kf(h_f), Linear_vf(h_f))`` for ``hidden`` ``[n, N, C]`` (on the adapter's device)."""
        wk, wv = self.weights_for(site, hidden.dtype)
        return torch.nn.functional.linear(hidden, wk), torch.nn.functional.linear(hidden, wv)



def _version(tensor: torch.Tensor) -> tuple:
    """Identity + in-place version of a weight (inference tensors have no version counter)."""
    return (id(tensor), tensor.data_ptr(), 0 if tensor.is_inference() else tensor._version)


def new_fusion_adapter(model: Any, **options) -> FusionAdapterBase:
    """An untrained adapter for ``model``: :class:`FusionAdapter` (``init``) on a UNet,
    :class:`~.flux_adapter.FluxFusionAdapter` (``rank``, ``seed``) on a Flux-family DiT; options of the other layout
    are ignored (a node offers them for either model)."""
    if dit_model_of(model) is not None:
        from .flux_adapter import FluxFusionAdapter

        return FluxFusionAdapter.from_model(model, **{k: v for k, v in options.items() if k in ("rank", "seed")})
    return FusionAdapter.from_model(model, **{k: v for k, v in options.items() if k == "init"})


def save_fusion_adapter(adapter: FusionAdapterBase, path: str, extra_metadata: dict[str, Any] | None = None) -> str:
    """Write ``adapter`` to ``path`` atomically (temp file + fsync + rename). Returns the path."""
    return atomic_save(adapter.file_state_dict(), path, adapter.file_metadata(extra_metadata))


def adapter_from_file_contents(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> FusionAdapterBase:
    """The adapter a file's tensors and metadata describe, of the layout its ``layout`` marker (or, in files written
    before the marker existed, its keys) names."""
    from .flux_adapter import DIT_KEY_PREFIX, FluxFusionAdapter

    layout = metadata.get(LAYOUT_KEY)
    if layout is None:
        layout = DIT_LAYOUT if any(k.startswith(DIT_KEY_PREFIX) for k in tensors) else UNET_LAYOUT
    if layout == DIT_LAYOUT:
        return FluxFusionAdapter.from_state_dict(tensors, metadata)
    if layout != UNET_LAYOUT:
        raise CheckpointLayoutError(f"unknown Face Fusion adapter layout {layout!r} (expected {UNET_LAYOUT} or "
                                    f"{DIT_LAYOUT}); is the file from a newer version of the pack?")
    return FusionAdapter.from_state_dict(tensors, metadata)


def load_fusion_adapter(path: str) -> FusionAdapterBase:
    """Read a Fusion adapter file (safetensors only), either layout."""
    tensors, metadata = load_tensors(path, "Fusion adapter", "is it a complete .safetensors file? Train or copy it again")
    if metadata.get("format") not in (None, FORMAT):
        raise CheckpointLayoutError(f"{path} is a '{metadata.get('format')}' file, not a Face Fusion adapter")
    adapter = adapter_from_file_contents(tensors, metadata)
    adapter.metadata.setdefault("source", os.path.basename(path))
    return adapter


def list_fusion_adapters() -> list[str]:
    """Adapter files under ``models/likeness/fusion/`` (relative names)."""
    from ...host.folders import list_files

    return [n for n in list_files(FOLDER, SUBFOLDER, {".safetensors"})]


def fusion_adapter_path(name: str) -> str:
    from ...host.folders import resolve

    return resolve(FOLDER, name, SUBFOLDER)


def fusion_save_dir() -> str:
    from ...host.folders import save_dir

    return save_dir(FOLDER, SUBFOLDER)
