"""ConsistentID's facial attention-localization loss (paper Eq. 1), cross-attention version.

Each fused feature-word token ("face", "ears", "eyes", "nose", "mouth") should attend to the image area of the
facial region whose features it carries. For one attention layer and one token j with region mask m_j:

    P_j      = the text cross-attention probability of token j at every latent pixel (per head),
               divided by its maximum over the pixels (``normalize``, as the official trainer sets it)
    loss_j   = mean(P_j over the background 1 - m_j) - mean(P_j over the region m_j)

"Balanced" means both terms are *means* weighted by the (soft, resized) mask and its complement,
``sum(P * w) / (sum(w) + 1e-5)``, so a small region (an eye) weighs as much as a big one (the face) and the
region/background size ratio does not matter. The value lies in [-1, 1]; -1 = all attention mass inside the
region, with the map saturated there. Per layer the tokens are averaged (only valid ones, count + 1e-5), then
heads and batch rows (rows without tokens count as 0, as in the official code); the layers are averaged.
The masks are resized to each layer's token grid bilinearly with antialiasing (official). The trainer scales
the result by lambda = 0.01.

Where the maps come from: the official code hooks the attention modules of diffusers' five middle blocks
(``down_blocks.1``, ``down_blocks.2``, ``mid_block``, ``up_blocks.1``, ``up_blocks.2``), but it hooks ``attn1``
(self-attention) by a naming slip, and the hooks only fire without xformers. We implement what the paper
describes: ``attn2`` probabilities over the text tokens (the decoupled ID tokens have their own softmax and are
not part of it) at the same blocks, i.e. every cross-attention site below the full latent resolution
(:func:`localization_sites`: 11 sites on SD1.5; on SDXL the official trainer's three middle blocks, 36 sites).

The maps are recorded by :class:`AttentionMapRecorder`, an engine injector that contributes nothing: at the
chosen sites it computes ``softmax(q k_text^T / sqrt(d))`` from the query and text keys the engine hands every
injector, keeps the columns of the marked tokens (with autograd), and the trainer turns them into the loss.
Plain torch; no host import.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...attention_patches import AttentionCall, AttentionSite, DecoupledInjector

EPS = 1e-5
RECORDER_NAME = "consistentid_attention_maps"


# ----------------------------------------------------------------------------------------------------------------
# The loss (plain tensors)

def balanced_l1(probabilities: torch.Tensor, masks: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Per (row, head, token) balanced L1 term.

    probabilities ``[B, H, N, K]`` (N latent pixels, K tokens); masks ``[B, K, N]`` in 0..1 -> ``[B, H, K]``.
    """
    if normalize:
        probabilities = probabilities / (probabilities.amax(dim=2, keepdim=True) + EPS)
    region = masks.transpose(1, 2).unsqueeze(1).to(probabilities.dtype)       # [B, 1, N, K]
    background = 1.0 - region
    inside = (probabilities * region).sum(dim=2) / (region.sum(dim=2) + EPS)
    outside = (probabilities * background).sum(dim=2) / (background.sum(dim=2) + EPS)
    return outside - inside


def masks_to_grid(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Region masks ``[B, K, Hm, Wm]`` -> ``[B, K, h*w]`` at a layer's token grid (bilinear, antialiased)."""
    if tuple(masks.shape[-2:]) != tuple(grid):
        masks = F.interpolate(masks.float(), size=tuple(grid), mode="bilinear", align_corners=False, antialias=True)
    return masks.flatten(2)


def layer_localization_loss(probabilities: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor,
                            grid: tuple[int, int], normalize: bool = True) -> torch.Tensor:
    """One layer's loss: probabilities ``[B, H, h*w, K]``, masks ``[B, K, Hm, Wm]``, valid ``[B, K]`` bool."""
    batch, heads, pixels, slots = probabilities.shape
    if pixels != grid[0] * grid[1]:
        raise ValueError(f"{pixels} attention rows do not form the {grid[0]}x{grid[1]} token grid")
    per_token = balanced_l1(probabilities, masks_to_grid(masks, grid).to(probabilities.device), normalize)
    weight = valid.to(per_token.dtype).to(per_token.device).view(batch, 1, slots)
    count = weight.sum(dim=2) + EPS                                              # [B, 1]
    return ((per_token * weight).sum(dim=2) / count).mean()


def facial_localization_loss(records: Sequence[tuple[torch.Tensor, tuple[int, int]]], masks: torch.Tensor,
                             valid: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Mean over layers of :func:`layer_localization_loss`; ``records`` = ``[(probabilities, grid)]``."""
    if not records:
        raise ValueError("no attention maps were recorded (no localization site ran)")
    total = sum(layer_localization_loss(p, masks, valid, g, normalize) for p, g in records)
    return total / len(records)


# ----------------------------------------------------------------------------------------------------------------
# Which tokens: selector matrices (a token may appear in several copies when contexts are repeated)

def token_selector(positions: Sequence[Sequence[int]], lengths: Sequence[int], total: int,
                   slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(selector [B, total, K], valid [B, K])`` picking each row's marked tokens out of ``total`` keys.

    Row b's own context is ``lengths[b]`` tokens long and was repeated to ``total`` (what ComfyUI does to batch
    prompts of different lengths); the probability of its token at ``p`` is the sum over all copies
    ``p + m * lengths[b]``. ``K = slots`` or the longest position list; missing slots are invalid.
    """
    slots = max([len(p) for p in positions] + [0]) if slots is None else slots
    selector = torch.zeros(len(positions), total, max(slots, 1))
    valid = torch.zeros(len(positions), max(slots, 1), dtype=torch.bool)
    for row, (row_positions, length) in enumerate(zip(positions, lengths, strict=True)):
        if total % length:
            raise ValueError(f"a context of {length} tokens cannot be repeated to {total}")
        for slot, position in enumerate(row_positions):
            if not 0 <= position < length:
                raise ValueError(f"token position {position} outside a context of {length} tokens")
            selector[row, position::length, slot] = 1.0
            valid[row, slot] = True
    return selector, valid


def token_attention(q: torch.Tensor, k: torch.Tensor, heads: int, selector: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of the selected tokens: q ``[B, Nq, C]``, k ``[B|1, L, C]``, selector
    ``[B, L, K]`` -> ``[B, heads, Nq, K]``. Softmax over all L keys in fp32, scale 1/sqrt(C/heads)."""
    batch, n_q, channels = q.shape
    dim_head = channels // heads
    q4 = q.float().view(batch, n_q, heads, dim_head).transpose(1, 2)
    k4 = k.float().view(k.shape[0], k.shape[1], heads, dim_head).transpose(1, 2)
    logits = torch.matmul(q4, k4.transpose(-1, -2)) * (1.0 / math.sqrt(dim_head))
    probabilities = torch.softmax(logits, dim=-1)                                # [B, H, Nq, L]
    return torch.matmul(probabilities, selector.to(probabilities.dtype).unsqueeze(1))


# ----------------------------------------------------------------------------------------------------------------
# Recording through the engine

def localization_sites(sites: Sequence[AttentionSite], sdxl: bool = False) -> list[AttentionSite]:
    """The cross-attention sites the loss uses: the UNet blocks the official trainers hook.

    The official ``unet_store_cross_attention_scores(layers=n)`` keeps the middle ``n`` of the names
    ``down_blocks.0-2, mid_block, up_blocks.1-3``. SD1.5 (``n = 5``): ``down_blocks.1/.2``, ``mid_block`` and
    ``up_blocks.1/.2``, i.e. every site below the full latent resolution (11 sites; ``down_blocks.0`` and
    ``up_blocks.3`` are left out). SDXL (``train_SDXL.py``, ``n = 3``): ``down_blocks.2`` (the deepest level),
    ``mid_block`` and ``up_blocks.1``, which in SDXL's three-level UNet is the half-resolution up block. Derived
    from the walked sites' group and resolution level, not tabulated.
    """
    if sdxl:
        deepest = max((s.level for s in sites if s.group == "input"), default=0)
        chosen = [s for s in sites if s.group == "middle" or (s.group == "input" and s.level == deepest)
                  or (s.group == "output" and s.level == 1)]
    else:
        chosen = [s for s in sites if s.level >= 1]
    return chosen or list(sites)


class AttentionMapRecorder(DecoupledInjector):
    """Engine injector that only observes: records the marked tokens' attention maps at chosen sites.

    Installed with ``add_injector`` on the training clone. Per forward: :meth:`begin` with the batch's token
    selector, run the model, :meth:`end` returns ``[(probabilities [B, heads, h*w, K], grid)]`` in call order.
    It adds nothing to the attention output (an empty contribution list), so it never changes the model.
    """

    def __init__(self, sites: Sequence[AttentionSite], name: str = RECORDER_NAME):
        super().__init__(name, provider=None)
        self.site_indices = frozenset(s.index for s in sites)
        self._selector: torch.Tensor | None = None
        self._records: list[tuple[torch.Tensor, tuple[int, int]]] = []

    def begin(self, selector: torch.Tensor | None) -> None:
        """Record the columns of ``selector`` ([B, L, K]) in the next forward (None: record nothing)."""
        self._selector = selector
        self._records = []

    def end(self) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        records, self._records, self._selector = self._records, [], None
        return records

    def contributions(self, call: AttentionCall, weight: float) -> list:
        selector = self._selector
        if selector is None or call.site.index not in self.site_indices:
            return []
        if selector.shape[0] != call.q.shape[0] or selector.shape[1] != call.k_text.shape[1]:
            raise ValueError(f"token selector {list(selector.shape[:2])} does not fit the attention call "
                             f"(batch {call.q.shape[0]}, {call.k_text.shape[1]} text tokens)")
        self._records.append((token_attention(call.q, call.k_text, call.heads, selector), call.grid))
        return []
