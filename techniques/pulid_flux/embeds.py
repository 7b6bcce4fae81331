"""PULID_FLUX_EMBEDS: one person's PuLID-FLUX ID tokens as data (the IDFormer's output), saved as safetensors.

``tokens`` ``[1, T, C]`` (T = 32 ID tokens of C = 2048 in the release) drive the positive rows; ``uncond_tokens``
are the IDFormer run on all-zero inputs (what the official pipeline gives the negative pass under true CFG).
``encoder`` names the PuLID-FLUX file that made them: tokens of one file are meaningless to another's
cross-attentions, so Apply warns when they differ and refuses a width mismatch.

Files: tensors ``tokens`` and ``uncond_tokens`` (float32) with metadata ``format=likeness.pulid_flux_embeds``,
``version``, ``encoder``, ``sources``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ...errors import InvalidInputError, ModelFileError
from ...safetensors_io import atomic_save

FORMAT = "likeness.pulid_flux_embeds"
VERSION = "1"


@dataclass
class PulidFluxEmbeds:
    """ID tokens ``[1, T, C]`` for the positive rows and for the negative rows (true CFG)."""

    tokens: torch.Tensor
    uncond_tokens: torch.Tensor
    encoder: str                                       # the PuLID-FLUX file's name
    sources: list[str] = field(default_factory=list)   # e.g. "image 0 face 0", "mean of 3 images"

    def __post_init__(self):
        for name in ("tokens", "uncond_tokens"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.ndim != 3 or value.shape[0] != 1:
                shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise InvalidInputError(f"PuLID-FLUX embeds need {name} [1, T, C]; got {shape}")
            if not bool(torch.isfinite(value).all()):
                raise InvalidInputError(f"PuLID-FLUX embeds: {name} contains NaN or infinite values")
            setattr(self, name, value.detach().to("cpu", torch.float32))
        if self.tokens.shape != self.uncond_tokens.shape:
            raise InvalidInputError(f"PuLID-FLUX embeds: tokens {list(self.tokens.shape)} and uncond tokens "
                                    f"{list(self.uncond_tokens.shape)} differ in shape")

    @property
    def width(self) -> int:
        return int(self.tokens.shape[-1])

    def describe(self) -> str:
        return f"{self.tokens.shape[1]} PuLID-FLUX ID tokens x {self.width} from {self.encoder}"


def save_pulid_embeds(embeds: PulidFluxEmbeds, path: str) -> str:
    """Write a safetensors file (atomically); returns the path."""
    metadata = {"format": FORMAT, "version": VERSION, "encoder": embeds.encoder, "sources": json.dumps(embeds.sources)}
    return atomic_save({"tokens": embeds.tokens, "uncond_tokens": embeds.uncond_tokens}, path, metadata)


def load_pulid_embeds(path: str) -> PulidFluxEmbeds:
    """Read a file written by :func:`save_pulid_embeds`; ModelFileError naming the file for anything else."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:
        raise ModelFileError(f"{path} is not a readable safetensors file ({exc}); save the embeds again.") from exc
    if metadata.get("format") != FORMAT or set(tensors) != {"tokens", "uncond_tokens"}:
        raise ModelFileError(f"{path} is not a Likeness PuLID-FLUX embeds file (metadata format "
                             f"{metadata.get('format')!r}, tensors {sorted(tensors)}). Save embeds with the Save "
                             "PuLID-FLUX Embeds node.")
    if metadata.get("version") != VERSION:
        raise ModelFileError(f"{path} has PuLID-FLUX embeds version {metadata.get('version')!r}; this pack reads "
                             f"{VERSION}.")
    try:
        sources = json.loads(metadata.get("sources", "[]"))
    except ValueError:
        sources = []
    try:
        return PulidFluxEmbeds(tensors["tokens"], tensors["uncond_tokens"], metadata.get("encoder", ""), sources)
    except InvalidInputError as exc:
        raise ModelFileError(f"{path}: {exc}") from exc
