"""Identity inputs for the FaceID-family projectors: blending several identities, the unconditional branch.

Face-MakeUp's identity-mixing demo blends two identities *before* the projector: a weighted sum of the ArcFace
vectors and the same weighted sum of the CLIP-H penultimate hidden states (for the conditional branch; the
unconditional branch uses CLIP of a zero image, identical for every identity, so blending leaves it unchanged).
The demo uses 0.5/0.5 and does not re-normalise the blended ArcFace vector; we do the same, with any number of
identities and weights normalised to sum to one.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ...errors import InvalidInputError

# CLIP pixel mean: an image filled with it is the all-zero *normalised* tensor the official code encodes as the
# unconditional CLIP input (ComfyUI's clip_vision.encode_image normalises internally, so feed it this image).
CLIP_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)


def mix_identities(identities: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
                   weights: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blend ``(arcface [1,512] or [512], clip_hidden [1,N,D] or None)`` pairs with ``weights``.

    Weights are normalised to sum to one (equal weights when None). A weight of 1 on one identity and 0 on the
    others returns exactly that identity. CLIP hidden states must be all present or all None (FaceID has none).
    """
    if not identities:
        raise InvalidInputError("mix_identities needs at least one identity.")
    if weights is None:
        weights = [1.0] * len(identities)
    if len(weights) != len(identities):
        raise InvalidInputError(f"{len(identities)} identities but {len(weights)} weights.")
    if any(w < 0 for w in weights):
        raise InvalidInputError(f"identity weights must be >= 0, got {list(weights)}.")
    total = float(sum(weights))
    if total <= 0:
        raise InvalidInputError("identity weights sum to zero; give at least one identity a positive weight.")
    fractions = [float(w) / total for w in weights]

    arcfaces = [torch.as_tensor(a).reshape(1, -1).float() for a, _ in identities]
    if len({a.shape for a in arcfaces}) != 1:
        raise InvalidInputError(f"identity vectors differ in size: {[tuple(a.shape) for a in arcfaces]}.")
    clips = [c for _, c in identities]
    has_clip = [c is not None for c in clips]
    if any(has_clip) and not all(has_clip):
        raise InvalidInputError("either every identity has CLIP hidden states or none has.")

    arcface = _weighted_sum(arcfaces, fractions)
    if not all(has_clip):
        return arcface, None
    clips = [c.float() if c.dim() == 3 else c.float().unsqueeze(0) for c in clips]
    if len({tuple(c.shape) for c in clips}) != 1:
        raise InvalidInputError(f"CLIP hidden states differ in shape: {[tuple(c.shape) for c in clips]}.")
    return arcface, _weighted_sum(clips, fractions)


def _weighted_sum(tensors: list[torch.Tensor], fractions: list[float]) -> torch.Tensor:
    # Skip zero weights so a 1/0 blend is bit-identical to the single identity (no 0*inf, no rounding).
    terms = [t * f if f != 1.0 else t.clone() for t, f in zip(tensors, fractions, strict=True) if f != 0.0]
    out = terms[0]
    for term in terms[1:]:
        out = out + term
    return out


def average_identities(arcfaces: torch.Tensor, clip_hidden: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Several reference images of one person: the mean ArcFace vector [1,512] and mean CLIP states [1,N,D]."""
    arcfaces = arcfaces.reshape(arcfaces.shape[0], -1).float()
    mean_clip = None if clip_hidden is None else clip_hidden.float().mean(dim=0, keepdim=True)
    return arcfaces.mean(dim=0, keepdim=True), mean_clip
