"""PuLID-FLUX test helpers: the official classes imported test-only from a fetched copy, tiny configs, seeded
modules in the released layout.

The official ``pulid/encoders_transformer.py`` is read from ``PULID_OFFICIAL`` (a checkout or a bare git mirror;
default ``/work/.mirror/ToTheBeginning+PuLID/repo``) into a temporary folder and imported from there; tests that
need it skip when no copy is present. Nothing of it is copied into the pack.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import tempfile

import torch

from likeness.techniques.pulid_flux.checkpoint import build_pulid_flux, state_dict_of
from likeness.techniques.pulid_flux.encoders import CrossAttentionConfig, IDFormerConfig

OFFICIAL_REPO = os.environ.get("PULID_OFFICIAL", "/work/.mirror/ToTheBeginning+PuLID/repo")
SOURCE_FILE = "pulid/encoders_transformer.py"

# a tiny IDFormer / cross-attention pair for a tiny Flux of width 64 (the official class fixes the 1024-wide
# mappings and the 1280-d ID vector, so those stay at release size in the fidelity test)
TINY_ENCODER = IDFormerConfig(dim=32, depth=5, dim_head=8, heads=4, num_id_tokens=2, num_queries=4, output_dim=24,
                              ff_mult=2, vit_dim=16, id_dim=20, mapping_dim=16)
TINY_CA = CrossAttentionConfig(dim=64, dim_head=16, heads=4, id_dim=24)


def official_encoders(repo: str = OFFICIAL_REPO):
    """The official module, or None when no copy is present. Returns ``(module, commit)``."""
    path = os.path.join(repo, SOURCE_FILE)
    commit = "working tree"
    if not os.path.isfile(path):
        try:
            text = subprocess.run(["git", "-C", repo, "show", f"HEAD:{SOURCE_FILE}"], check=True,
                                  capture_output=True, text=True).stdout
            commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], check=True, capture_output=True,
                                    text=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None, None
        path = os.path.join(tempfile.mkdtemp(prefix="pulid_official_"), "encoders_transformer.py")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    spec = importlib.util.spec_from_file_location("pulid_official_encoders", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, commit


@functools.lru_cache(maxsize=1)
def cached_official():
    return official_encoders()[0]


def seeded_(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Every parameter random (LayerNorms too, so their affine terms are exercised), from one seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith("weight") and p.ndim == 1 else 0.0
            p.copy_(base + torch.randn(p.shape, generator=generator) * std)
    return module


def tiny_pulid(seed: int = 0, count: int = 4, encoder: IDFormerConfig = TINY_ENCODER,
               ca: CrossAttentionConfig = TINY_CA, std: float = 0.2):
    """A seeded tiny PuLID-FLUX model (IDFormer + ``count`` cross-attentions)."""
    model = build_pulid_flux(encoder, ca, count, source="tiny")
    seeded_(model.encoder, seed, std)
    for index, module in enumerate(model.cross_attentions):
        seeded_(module, seed * 1000 + index + 1, std)
    return model


def tiny_state_dict(seed: int = 0, count: int = 4, **kw) -> dict[str, torch.Tensor]:
    return state_dict_of(tiny_pulid(seed, count, **kw))


def vit_hidden(config: IDFormerConfig, batch: int = 1, tokens: int = 7, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, config.vit_dim, generator=generator) for _ in range(5)]
