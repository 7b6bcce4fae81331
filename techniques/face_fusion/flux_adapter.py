"""FUSION_ADAPTER on a Flux-family DiT: trainable per-block projections of the reference's keys and values.

A DiT has no cross-attention and no hidden state that enters one: the reference pass records, per block, the
keys and values of the reference's image tokens as the block's joint attention computes them (QK-normed, with
RoPE; :mod:`...attention_patches.capture`). The adapter maps them to the keys/values that join the generation's
joint attention (the DiT form of the paper's Eq. 2):

    K_f = k_ref + up_k(down_k(k_ref)),   V_f = v_ref + up_v(down_v(v_ref))

a low-rank residual per block (``down``: C → r, ``up``: r → C, no bias). ``up`` starts at zero, so an untrained
adapter is exactly plain reference-joining (the reference's own keys and values in the joint attention, as
Kontext-style reference tokens) and training starts from it; ``down`` starts from a seeded Kaiming-uniform draw
(as ``nn.Linear`` does), so a new adapter is reproducible.

File format (safetensors, ``format=likeness.face_fusion``, ``layout=dit``):
``fusion_dit.double_blocks.{i}.to_k_f.down.weight`` ``[r, C]``, ``...to_k_f.up.weight`` ``[C, r]`` and the same for
``to_v_f``, for every double block i and ``fusion_dit.single_blocks.{i}...`` for every single block; metadata ``base``
(the DiT class: flux, chroma), ``rank``, ``hidden``, ``heads``, ``double_blocks``, ``single_blocks``,
``reference_index`` (the RoPE index of the reference tokens it was made with), plus what the trainer adds. The sites are derived from the
model (:func:`~...attention_patches.find_sites` → ``DitSite``), widths and heads from its blocks.
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...attention_patches.sites import DitSite, dit_model_of, find_dit_sites
from ...errors import CheckpointLayoutError, InvalidInputError, UnsupportedModelError
from .adapter import DIT_LAYOUT, FusionAdapterBase

DIT_KEY_PREFIX = "fusion_dit."
DIT_KEY_PATTERN = re.compile(r"^fusion_dit\.(double|single)_blocks\.(\d+)\.to_([kv])_f\.(down|up)\.weight$")
DEFAULT_RANK = 16


class LowRankResidual(nn.Module):
    """``x + up(down(x))`` (C → r → C, no bias); ``up`` starts at zero (the identity)."""

    def __init__(self, width: int, rank: int, dtype=torch.float32):
        super().__init__()
        self.down = nn.Linear(width, rank, bias=False, dtype=dtype)
        self.up = nn.Linear(rank, width, bias=False, dtype=dtype)


class FluxBlockProjection(nn.Module):
    """``to_k_f`` and ``to_v_f`` of one DiT block."""

    def __init__(self, width: int, rank: int, dtype=torch.float32):
        super().__init__()
        self.to_k_f = LowRankResidual(width, rank, dtype)
        self.to_v_f = LowRankResidual(width, rank, dtype)


def residual(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return x + F.linear(F.linear(x, down), up)


class FluxFusionAdapter(FusionAdapterBase):
    """Every block's projections: ``double_blocks[i]`` and ``single_blocks[i]`` (as the DiT names its blocks).

    ``project(site, (k, v)) -> (K_f, V_f)`` for a block's captured reference keys/values ``[n, N, C]``; the weights
    are cast to their dtype (cached copies outside autograd, the live parameters while it records).
    """

    layout = DIT_LAYOUT

    def __init__(self, double_blocks: int, single_blocks: int, hidden: int, rank: int = DEFAULT_RANK,
                 metadata: dict[str, str] | None = None, dtype=torch.float32):
        super().__init__(metadata)
        if double_blocks + single_blocks < 1:
            raise InvalidInputError("a Fusion adapter needs at least one block")
        if not 1 <= rank <= hidden:
            raise InvalidInputError(f"the adapter rank must lie in 1..{hidden} (the model width), got {rank}")
        self.hidden, self.rank = int(hidden), int(rank)
        self.double_blocks = nn.ModuleList(FluxBlockProjection(hidden, rank, dtype) for _ in range(double_blocks))
        self.single_blocks = nn.ModuleList(FluxBlockProjection(hidden, rank, dtype) for _ in range(single_blocks))
        self.metadata.update({"rank": str(rank), "hidden": str(hidden), "double_blocks": str(double_blocks),
                              "single_blocks": str(single_blocks)})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: Any, rank: int = DEFAULT_RANK, seed: int = 0) -> "FluxFusionAdapter":
        """A new (identity) adapter for the DiT in ``model`` (ModelPatcher / BaseModel / DiT)."""
        dit = dit_model_of(model)
        if dit is None:
            raise UnsupportedModelError(f"{type(model).__name__} is not a Flux-family DiT; for an SD1.5/SDXL model "
                                        "make a UNet Fusion adapter (new_fusion_adapter picks the right one)")
        sites = find_dit_sites(dit)
        widths = {s.hidden for s in sites}
        if len(widths) != 1:
            raise CheckpointLayoutError(f"the DiT's blocks have different widths {sorted(widths)}")
        double = sum(1 for s in sites if s.kind == "double")
        from .apply import DIT_REFERENCE_INDEX

        adapter = cls(double, len(sites) - double, widths.pop(), rank,
                      {"base": type(dit).__name__.lower(), "heads": str(sites[0].heads), "init": "identity",
                       "init_seed": str(seed), "reference_index": str(DIT_REFERENCE_INDEX)})
        adapter.reset(seed)
        return adapter

    def reset(self, seed: int = 0) -> None:
        """The identity adapter: ``up`` zero, ``down`` Kaiming-uniform (``nn.Linear``'s bound) from ``seed``."""
        generator = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / math.sqrt(self.hidden)
        with torch.no_grad():
            for block in self.blocks():
                for part in (block.to_k_f, block.to_v_f):
                    draw = torch.rand(part.down.weight.shape, generator=generator, dtype=torch.float32)
                    part.down.weight.copy_((2.0 * draw - 1.0) * bound)
                    part.up.weight.zero_()

    def blocks(self) -> list[FluxBlockProjection]:
        return list(self.double_blocks) + list(self.single_blocks)

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> "FluxFusionAdapter":
        """From the file's flat keys; raises CheckpointLayoutError naming what is wrong."""
        unknown = [k for k in tensors if not DIT_KEY_PATTERN.match(k)]
        if unknown:
            raise CheckpointLayoutError(f"not a Flux Face Fusion adapter: unexpected keys {unknown[:5]} (expected "
                                        "fusion_dit.double_blocks|single_blocks.<i>.to_k_f|to_v_f.down|up.weight)")
        if not tensors:
            raise CheckpointLayoutError("the file holds no fusion_dit.* weights")
        counts = {"double": 0, "single": 0}
        for key in tensors:
            kind, index = DIT_KEY_PATTERN.match(key).group(1, 2)
            counts[kind] = max(counts[kind], int(index) + 1)
        first = tensors.get("fusion_dit.double_blocks.0.to_k_f.down.weight",
                            tensors.get("fusion_dit.single_blocks.0.to_k_f.down.weight"))
        if first is None or first.ndim != 2:
            raise CheckpointLayoutError("the adapter has no block 0 (fusion_dit.double_blocks.0 / single_blocks.0) down "
                                        "projection")
        rank, hidden = (int(n) for n in first.shape)
        adapter = cls(counts["double"], counts["single"], hidden, rank, metadata)
        expected = {DIT_KEY_PREFIX + k: tuple(v.shape) for k, v in adapter.state_dict().items()}
        missing = sorted(set(expected) - set(tensors))
        wrong = sorted(k for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k])
        if missing or wrong:
            raise CheckpointLayoutError(f"incomplete Flux Fusion adapter: missing {missing[:4]}, wrong shapes "
                                        f"{wrong[:4]} (rank {rank}, width {hidden})")
        adapter.load_state_dict({k[len(DIT_KEY_PREFIX):]: v.float() for k, v in tensors.items()})
        return adapter

    # ------------------------------------------------------------------ file format
    def file_state_dict(self) -> dict[str, torch.Tensor]:
        return {DIT_KEY_PREFIX + k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}

    def site_count(self) -> int:
        return len(self.double_blocks) + len(self.single_blocks)

    def made_for(self) -> str:
        return (f"{self.metadata.get('base', 'a DiT')}, {len(self.double_blocks)} double + "
                f"{len(self.single_blocks)} single blocks of width {self.hidden}")

    # ------------------------------------------------------------------ use
    def check_layout_sites(self, sites: list[DitSite]) -> None:
        """Raise CheckpointLayoutError unless the model has exactly this adapter's blocks, of its width."""
        double = sum(1 for s in sites if s.kind == "double")
        if (double, len(sites) - double) != (len(self.double_blocks), len(self.single_blocks)) or \
                any(s.hidden != self.hidden for s in sites):
            widths = sorted({s.hidden for s in sites})
            raise CheckpointLayoutError(
                f"this Fusion adapter was made for a DiT with {self.made_for()} but the MODEL has {double} double + "
                f"{len(sites) - double} single blocks of width {widths}: make or train an adapter on this model "
                f"(Fusion Adapter New / Train Face Fusion)")

    def block(self, site: DitSite) -> FluxBlockProjection:
        return (self.double_blocks if site.kind == "double" else self.single_blocks)[site.block_id]

    def weights_for(self, site: DitSite, dtype) -> tuple[torch.Tensor, ...]:
        """``(k_down, k_up, v_down, v_up)`` in ``dtype``."""
        proj = self.block(site)
        live = (proj.to_k_f.down.weight, proj.to_k_f.up.weight, proj.to_v_f.down.weight, proj.to_v_f.up.weight)
        return self.cached_weights((site.index,), live, dtype)

    def project(self, site: DitSite, captured: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K_f, V_f)`` ``[n, N, C]`` from the block's captured reference keys/values (on the adapter's device)."""
        k, v = captured
        k_down, k_up, v_down, v_up = self.weights_for(site, k.dtype)
        return residual(k, k_down, k_up), residual(v, v_down, v_up)
