"""Imagic's text embeddings as one typed value (``M3FACE_IMAGIC_EMBEDDING``): the target prompt's embedding,
the embedding optimised to reconstruct the photo, their interpolation, and a safetensors file.

The interpolation follows M3Face's edit script (DEV prototype): ``new = alpha * target + (1 - alpha) *
optimized``, so alpha 1 is the target prompt itself and alpha 0 the reconstruction embedding (alpha plays the
role of Imagic's eta on the target; the script tries 0.8, 0.9, 1 and 1.1). Only the token sequence is
optimised; a pooled output of the target (CLIP's, unused by SD1.5) is carried along unchanged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ...errors import CheckpointLayoutError, InvalidInputError
from ...safetensors_io import atomic_save, load_tensors

SOCKET_TYPE = "M3FACE_IMAGIC_EMBEDDING"
FORMAT = "m3face_imagic_embedding/1"
FORMAT_KEY = "likeness.format"
DEFAULT_ALPHA = 0.9
SUGGESTED_ALPHAS = (0.8, 0.9, 1.0, 1.1)


@dataclass
class ImagicEmbedding:
    target: torch.Tensor                     # [1, T, C] the target prompt's text-encoder output
    optimized: torch.Tensor                  # [1, T, C] after stage 1 (reconstructs the photo)
    pooled: torch.Tensor | None = None       # the target's pooled output, if its conditioning had one
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.target.ndim != 3 or self.target.shape != self.optimized.shape:
            raise InvalidInputError(f"Imagic embeddings must both be [1, tokens, channels]; got "
                                    f"{tuple(self.target.shape)} and {tuple(self.optimized.shape)}.")

    def interpolate(self, alpha: float) -> torch.Tensor:
        """``alpha * target + (1 - alpha) * optimized`` (alpha 1: the target, 0: the optimised embedding)."""
        alpha = float(alpha)
        return alpha * self.target + (1.0 - alpha) * self.optimized

    def conditioning(self, context: torch.Tensor) -> list:
        """A CONDITIONING holding ``context`` (and the target's pooled output)."""
        extras = {} if self.pooled is None else {"pooled_output": self.pooled}
        return [[context, extras]]


def target_from_conditioning(conditioning: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embedding ``[1, T, C]``, pooled output or None) of a one-entry, one-prompt CONDITIONING."""
    if not isinstance(conditioning, list) or len(conditioning) != 1:
        raise InvalidInputError("The target conditioning must hold exactly one prompt (one CLIP Text Encode, not "
                                f"a combination of {len(conditioning) if isinstance(conditioning, list) else '?'}).")
    context, extras = conditioning[0]
    if context.ndim != 3 or context.shape[0] != 1:
        raise InvalidInputError(f"The target conditioning must be [1, tokens, channels]; got {tuple(context.shape)}.")
    pooled = extras.get("pooled_output")
    return context, pooled if isinstance(pooled, torch.Tensor) else None


def encode_target(clip, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embedding, pooled output) of the target prompt through a CLIP, as CLIP Text Encode encodes it."""
    if not prompt.strip():
        raise InvalidInputError("The target prompt is empty; describe the edited photo (or connect a target "
                                "conditioning).")
    context, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    return context, pooled


def save_embedding(embedding: ImagicEmbedding, path: str) -> str:
    """Write ``embedding`` (both embeddings, the pooled output, the run's settings as metadata) atomically."""
    tensors = {"target": embedding.target.float(), "optimized": embedding.optimized.float()}
    if embedding.pooled is not None:
        tensors["pooled_output"] = embedding.pooled.float()
    metadata = {FORMAT_KEY: FORMAT, "settings": json.dumps(embedding.metadata, sort_keys=True, default=str)}
    return atomic_save(tensors, path, metadata)


def load_embedding(path: str) -> ImagicEmbedding:
    """An embedding file written by :func:`save_embedding`."""
    tensors, metadata = load_tensors(path, "Imagic embedding file", "train it again with M3Face Imagic Train")
    if metadata.get(FORMAT_KEY) != FORMAT or not {"target", "optimized"} <= set(tensors):
        raise CheckpointLayoutError(f"'{path}' is not an M3Face Imagic embedding file (format "
                                    f"{metadata.get(FORMAT_KEY)!r}, tensors {sorted(tensors)}).")
    return ImagicEmbedding(tensors["target"], tensors["optimized"], tensors.get("pooled_output"),
                           json.loads(metadata.get("settings", "{}")))
