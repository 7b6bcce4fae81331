"""Image-space masks resized to each site's token grid, and the Eq. 7 mask for n identities.

A site's tokens are its activations ``[B, C, h, w]`` flattened row-major (token ``y * w + x``), so a
mask is resized straight to ``(h, w)`` taken from ``extra_options["activations_shape"]``: odd sizes and
any aspect ratio need no padding or cropping. Down-scaling averages the pixels each token covers (a
face covering half a token gives 0.5); the Eq. 7 membership test thresholds at 0.5.

Face Fusion Eq. 7 (paper §3.4): a face key of identity i is blocked (-inf) for a query that lies inside
the mask of another identity j != i; every other (query, key) pair gets no bias. Queries outside all
masks see every identity, queries inside two identities' masks see neither.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError

INSIDE_THRESHOLD = 0.5


def as_mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """A ComfyUI MASK ``[B,H,W]`` or ``[H,W]`` (or ``[B,1,H,W]``) as float ``[B,H,W]`` in 0..1."""
    if not isinstance(mask, torch.Tensor):
        raise InvalidInputError(f"a MASK tensor is required, got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    elif mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3 or mask.shape[-1] < 1 or mask.shape[-2] < 1:
        raise InvalidInputError(f"MASK must be [B,H,W] or [H,W], got shape {tuple(mask.shape)}")
    return mask.float().clamp(0.0, 1.0)


def resize_to_grid(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B,H,W]`` → ``[B, height*width]`` (row-major tokens); box average when shrinking."""
    mask = as_mask_batch(mask)
    if mask.shape[-2:] == (height, width):
        grid = mask
    else:
        shrinking = mask.shape[-2] >= height and mask.shape[-1] >= width
        # area = exact box average when shrinking (a token is the mean of the pixels it covers)
        mode = {"mode": "area"} if shrinking else {"mode": "bilinear", "align_corners": False}
        grid = F.interpolate(mask.unsqueeze(1), size=(height, width), **mode).squeeze(1).clamp(0.0, 1.0)
    return grid.reshape(grid.shape[0], height * width)


class RegionMask:
    """An image-space mask, resized lazily per token grid and memoised (per grid size and dtype).

    Batch size 1 applies to every image; otherwise the mask batch must equal the latent batch (rows of
    a chunk map to ``row % batch``). The mask and its resized grids live on one device; :meth:`to` moves
    them (the owning injector calls it when the model moves).
    """

    def __init__(self, mask: torch.Tensor):
        self.mask = as_mask_batch(mask).detach().cpu()
        self._grids: dict[tuple, torch.Tensor] = {}

    @property
    def batch(self) -> int:
        return int(self.mask.shape[0])

    def to(self, device: torch.device) -> "RegionMask":
        self.mask = self.mask.to(device)
        self._grids = {key: grid.to(device) for key, grid in self._grids.items()}
        return self

    def tokens(self, height: int, width: int, dtype=torch.float32) -> torch.Tensor:
        """Soft mask ``[Bm, height*width]`` in 0..1."""
        key = (height, width, dtype)
        grid = self._grids.get(key)
        if grid is None:
            grid = resize_to_grid(self.mask, height, width).to(dtype=dtype)
            self._grids[key] = grid
        return grid

    def inside(self, height: int, width: int) -> torch.Tensor:
        """Boolean ``[Bm, height*width]``: tokens inside the region (soft value >= 0.5)."""
        key = (height, width, "inside")
        grid = self._grids.get(key)
        if grid is None:
            grid = self.tokens(height, width) >= INSIDE_THRESHOLD
            self._grids[key] = grid
        return grid

    def __deepcopy__(self, memo):  # masks are immutable once made: share them across clones
        return self


def rows_for(mask_tokens: torch.Tensor, rows: Sequence[int], chunk_size: int) -> torch.Tensor:
    """Pick the mask row for each batch row (mask batch 1 broadcasts; else ``row % chunk_size``)."""
    if mask_tokens.shape[0] == 1:
        return mask_tokens
    if mask_tokens.shape[0] != chunk_size:
        raise InvalidInputError(f"a mask batch of {mask_tokens.shape[0]} does not match the latent batch of "
                                f"{chunk_size}; give one mask or one per image")
    index = torch.tensor([r % chunk_size for r in rows], device=mask_tokens.device)
    return mask_tokens.index_select(0, index)


def eq7_allowed(inside: torch.Tensor) -> torch.Tensor:
    """Eq. 7 per identity: ``inside`` bool ``[n_ids, ..., Nq]`` → allowed bool of the same shape.

    ``allowed[i, q]`` is False when query q lies inside the mask of some identity j != i.
    """
    count = inside.to(torch.int32).sum(0, keepdim=True)
    return (count - inside.to(torch.int32)) == 0


def eq7_bias(inside: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Additive per-identity query bias ``[n_ids, ..., Nq]``: 0 where allowed, -inf where blocked."""
    allowed = eq7_allowed(inside)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=inside.device)
    return bias.masked_fill(~allowed, float("-inf"))


def eq7_additive_mask(inside: torch.Tensor, text_keys: int, keys_per_identity: Sequence[int],
                      dtype=torch.float32) -> torch.Tensor:
    """The full Eq. 7 mask A ``[Nq, text_keys + sum(keys_per_identity)]`` for one image.

    ``inside``: bool ``[n_ids, Nq]``. Text keys are never blocked. This is the explicit (reference)
    form; the engine applies the same mask as a per-identity query bias (see :func:`eq7_bias`).
    """
    if inside.ndim != 2 or inside.shape[0] != len(keys_per_identity):
        raise InvalidInputError("inside must be [n_identities, Nq] with one row per identity")
    bias = eq7_bias(inside, dtype)  # [n, Nq]
    blocks = [torch.zeros(inside.shape[1], text_keys, dtype=dtype, device=inside.device)]
    for i, n_keys in enumerate(keys_per_identity):
        blocks.append(bias[i].unsqueeze(1).expand(-1, n_keys))
    return torch.cat(blocks, dim=1)
