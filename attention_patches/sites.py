"""Cross-attention sites, found by walking the model (never from a hard-coded table).

A *site* is one ``attn2`` (text cross-attention) layer of the UNet. ComfyUI looks attn2 replace patches
up by ``(block_kind, block_id, block_index)`` (``BasicTransformerBlock.forward``), where ``block_kind``
is ``"input" | "middle" | "output"``, ``block_id`` the index in ``input_blocks`` / ``output_blocks``
(0 for the middle block) and ``block_index`` the depth inside that block's SpatialTransformer.

Walking ``input_blocks``, ``middle_block`` and ``output_blocks`` the way ``UNetModel._forward`` runs them
gives every site in call order, so the SD1.5 middle block is ``("middle", 0)`` (the key the host emits;
a hard-coded ``("middle", 1)`` never fires) and SDXL's depth-10 blocks yield 10 sites each (70 total).

``order`` is the diffusers attention-processor position (down blocks, then up blocks, then the mid
block): IP-Adapter-style checkpoints name the k-th cross-attention ``"{2k+1}.to_k_ip.weight"``.
It is derived by sorting the walked sites, not tabulated.

DiT models (FLUX.1 dev / schnell / Kontext, Chroma: ``double_blocks`` then ``single_blocks`` of joint
attention) have one :class:`DitSite` per block instead, keyed as ComfyUI's ``patches_replace["dit"]`` looks
block replacements up (``("double_block", i)``, ``("single_block", i)``); :func:`find_sites` returns those
for a DiT and :func:`find_unet_sites` refuses a DiT for the UNet-only techniques.

Plain torch: no ``comfy`` import; works on the meta device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from torch import nn

from ..errors import UnsupportedModelError

# diffusers registers down_blocks, up_blocks, then mid_block: that order numbers the processors.
_DIFFUSERS_GROUP_RANK = {"input": 0, "output": 1, "middle": 2}


@dataclass(frozen=True)
class AttentionSite:
    """One cross-attention layer of the UNet.

    Attributes:
        index: position in call order (0 = first site the UNet runs).
        block: ``("input"|"middle"|"output", block_id)`` as in ``extra_options["block"]``.
        block_index: depth inside the block's transformer (``extra_options["block_index"]``).
        transformer_index: running count of transformers in the UNet at this site
            (``extra_options["transformer_index"]``).
        channels: inner width C of the attention (= heads * dim_head); q/k/v are [B, N, C].
        heads, dim_head: attention heads and their width.
        context_dim: width of the text context the layer's ``to_k`` / ``to_v`` take.
        order: diffusers processor position k (down, up, mid); the state-dict index is ``2k+1``.
        level: resolution level (0 = full latent resolution, 1 = half, ...), counted from the
            Downsample/Upsample layers met while walking; the token grid is about latent / 2**level.
    """

    index: int
    block: tuple[str, int]
    block_index: int
    transformer_index: int
    channels: int
    heads: int
    dim_head: int
    context_dim: int
    order: int
    level: int

    @property
    def key(self) -> tuple[str, int, int]:
        """The 3-tuple ComfyUI's attn2 replace lookup tries first."""
        return (self.block[0], self.block[1], self.block_index)

    @property
    def group(self) -> str:
        return self.block[0]

    @property
    def processor_index(self) -> int:
        """diffusers ``attn_processors`` index of this attn2 (odd): ``2 * order + 1``."""
        return 2 * self.order + 1

    def describe(self) -> str:
        return (f"{self.block[0]}[{self.block[1]}].{self.block_index} t{self.transformer_index} "
                f"C={self.channels} heads={self.heads}x{self.dim_head} ctx={self.context_dim} "
                f"proc={self.processor_index} level={self.level}")


def _unwrap(model: Any, is_target) -> nn.Module | None:
    """The network inside a ModelPatcher / BaseModel (or ``model`` itself) for which ``is_target`` holds."""
    seen = model
    for _ in range(4):
        if is_target(seen):
            return seen
        seen = getattr(seen, "diffusion_model", None) or getattr(seen, "model", None)
        if seen is None:
            return None
    return None


def _is_unet(module: Any) -> bool:
    return hasattr(module, "input_blocks") and hasattr(module, "output_blocks")


def _is_dit(module: Any) -> bool:
    return isinstance(getattr(module, "double_blocks", None), nn.ModuleList) and \
        isinstance(getattr(module, "single_blocks", None), nn.ModuleList)


def diffusion_model_of(model: Any) -> nn.Module:
    """The UNet inside a ModelPatcher, a BaseModel, or the UNet itself."""
    unet = _unwrap(model, _is_unet)
    if unet is None:
        raise UnsupportedModelError(f"{type(model).__name__} is not a UNet (no input_blocks/output_blocks); "
                                    "this needs an SD1.5/SD2/SDXL-style model")
    return unet


def dit_model_of(model: Any) -> nn.Module | None:
    """The Flux-family DiT inside a ModelPatcher / BaseModel (or the DiT itself), or None for other models."""
    return _unwrap(model, _is_dit)


def _layers(block: nn.Module | None) -> Iterable[nn.Module]:
    if block is None:
        return ()
    if isinstance(block, (nn.Sequential, nn.ModuleList)):
        return list(block)
    return [block]


def _is_transformer(layer: nn.Module) -> bool:
    return hasattr(layer, "transformer_blocks") and isinstance(layer.transformer_blocks, nn.ModuleList)


def _walk(unet: nn.Module) -> list[tuple[dict, nn.Module]]:
    """(site fields without index/order, the BasicTransformerBlock) for every attn2, in call order."""
    found: list[tuple[dict, nn.Module]] = []
    transformer_index = 0
    level = 0
    walk = [("input", i, b) for i, b in enumerate(unet.input_blocks)]
    walk.append(("middle", 0, getattr(unet, "middle_block", None)))
    walk += [("output", i, b) for i, b in enumerate(unet.output_blocks)]
    for kind, block_id, block in walk:
        for layer in _layers(block):
            name = type(layer).__name__
            if name == "Downsample":
                level += 1
            elif name == "Upsample":
                level -= 1
            if not _is_transformer(layer):
                continue
            for block_index, tb in enumerate(layer.transformer_blocks):
                attn2 = getattr(tb, "attn2", None)
                if attn2 is None or getattr(tb, "switch_temporal_ca_to_sa", False):
                    continue  # no text cross-attention here
                found.append((dict(block=(kind, block_id), block_index=block_index,
                                   transformer_index=transformer_index,
                                   channels=attn2.to_q.out_features, heads=int(attn2.heads),
                                   dim_head=int(attn2.dim_head), context_dim=attn2.to_k.in_features,
                                   level=level), tb))
            transformer_index += 1
    return found


def find_sites(model: Any) -> tuple:
    """Every site of ``model`` (ModelPatcher, BaseModel or network) in call order: the text cross-attention
    sites of a UNet (:class:`AttentionSite`), or the blocks of a Flux-family DiT (:class:`DitSite`)."""
    dit = dit_model_of(model)
    if dit is not None:
        return find_dit_sites(dit)
    return find_unet_sites(model)


def find_unet_sites(model: Any) -> tuple[AttentionSite, ...]:
    """The UNet's text cross-attention sites; a DiT (or anything else) raises :class:`UnsupportedModelError`."""
    if dit_model_of(model) is not None:
        raise UnsupportedModelError("this technique runs on SD1.5/SDXL UNets; the MODEL is a Flux-family DiT "
                                    "(use PuLID-FLUX or Face Fusion on Flux)")
    raw = [fields for fields, _ in _walk(diffusion_model_of(model))]
    ranked = sorted(range(len(raw)), key=lambda i: (_DIFFUSERS_GROUP_RANK[raw[i]["block"][0]], i))
    order = {site: k for k, site in enumerate(ranked)}
    return tuple(AttentionSite(index=i, order=order[i], **r) for i, r in enumerate(raw))


def transformer_blocks(model: Any) -> dict[int, nn.Module]:
    """``{site.index: BasicTransformerBlock}`` (to read a site's ``attn1`` / ``attn2`` weights)."""
    return {i: tb for i, (_, tb) in enumerate(_walk(diffusion_model_of(model)))}


# ---------------------------------------------------------------------- DiT blocks
DIT_KINDS = ("double", "single")


@dataclass(frozen=True)
class DitSite:
    """One joint-attention block of a Flux-family DiT.

    Attributes:
        index: position in call order (all double blocks, then all single blocks).
        kind: ``"double"`` (separate text and image streams, one joint attention) or ``"single"`` (one stream).
        block_id: index inside ``double_blocks`` / ``single_blocks``.
        hidden: model width C (the attention's inner width; q/k/v are ``[B, H, N, C/H]``).
        heads, dim_head: attention heads and their width.
    """

    index: int
    kind: str
    block_id: int
    hidden: int
    heads: int
    dim_head: int

    @property
    def key(self) -> tuple[str, int]:
        """ComfyUI's ``patches_replace["dit"]`` key of this block."""
        return (f"{self.kind}_block", self.block_id)

    @property
    def group(self) -> str:
        """``double`` / ``single`` (what :class:`~.sigma.SiteWeights` modes select)."""
        return self.kind

    def describe(self) -> str:
        return f"{self.kind}[{self.block_id}] C={self.hidden} heads={self.heads}x{self.dim_head}"


def _block_width(block: nn.Module) -> tuple[int, int]:
    """``(hidden, heads)`` of a double or single block, read from its layers."""
    heads = int(block.num_heads)
    hidden = int(getattr(block, "hidden_size", 0) or getattr(block, "hidden_dim", 0))
    return hidden, heads


def find_dit_sites(dit: nn.Module) -> tuple[DitSite, ...]:
    """One :class:`DitSite` per block of ``dit`` (a module with ``double_blocks`` and ``single_blocks``)."""
    sites: list[DitSite] = []
    for kind in DIT_KINDS:
        for block_id, block in enumerate(getattr(dit, f"{kind}_blocks")):
            hidden, heads = _block_width(block)
            sites.append(DitSite(len(sites), kind, block_id, hidden, heads, hidden // heads))
    return tuple(sites)


def is_dit_sites(sites: Iterable[Any]) -> bool:
    """Whether ``sites`` are DiT blocks (else UNet cross-attention sites)."""
    return any(isinstance(s, DitSite) for s in sites)


def sites_by_key(sites: Iterable[AttentionSite]) -> dict[tuple, AttentionSite]:
    """Map both lookup keys ComfyUI uses (3-tuple, and 2-tuple for depth-1 blocks) to the site."""
    table: dict[tuple, AttentionSite] = {}
    for site in sites:
        table[site.key] = site
        table.setdefault(site.block, site)
    return table


def describe_sites(sites: Iterable[AttentionSite]) -> str:
    """A multi-line table for logs and the CLI."""
    return "\n".join(site.describe() for site in sites)


FAMILY_NAMES = {"sd15": "SD1.5", "sd2": "SD2", "sdxl": "SDXL", "unknown": "an unknown model family"}


def unet_family(sites: Iterable[AttentionSite]) -> str:
    """``sd15`` / ``sd2`` / ``sdxl`` / ``unknown`` from the site structure, also for shrunken test UNets.

    SD1.x and SD2.x have 16 sites with attention already at full latent resolution (level 0; SD2: 1024-wide
    context); SDXL has none at level 0 (its first level is convolution only) and deep transformers below.
    """
    sites = list(sites)
    if not sites:
        return "unknown"
    top = min(s.level for s in sites)
    contexts = {s.context_dim for s in sites}
    if top >= 1 and len(sites) > 16:
        return "sdxl"
    if top == 0 and len(sites) == 16:
        return "sd2" if contexts == {1024} else "sd15"
    return "unknown"


def family_name(family: str) -> str:
    """The family as users write it (``SD1.5``, ``SDXL``)."""
    return FAMILY_NAMES.get(family, family)
