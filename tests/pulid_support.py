"""PuLID-FLUX test helpers: the official classes imported test-only from a fetched copy, tiny configs, seeded
modules in the released layout.

The official ``pulid/encoders_transformer.py`` is read from ``PULID_OFFICIAL`` (a checkout or a bare git mirror;
default ``/work/.mirror/ToTheBeginning+PuLID/repo``) into a temporary folder and imported from there; tests that
need it skip when no copy is present. Nothing of it is copied into the pack.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import subprocess
import tempfile
import types

import torch

from likeness.techniques.pulid_flux.checkpoint import build_pulid_flux, state_dict_of
from likeness.techniques.pulid_flux.encoders import CrossAttentionConfig, IDFormerConfig
from likeness.techniques.pulid_flux.eva_clip import EvaVisionConfig

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


# --------------------------------------------------------------------------------------------------------------
# EVA02-CLIP: a tiny tower of the same class (21 blocks so that the states entering block 20 exist)

TINY_EVA = EvaVisionConfig(image_size=28, patch_size=14, width=32, depth=21, heads=2, output_dim=24)
# an IDFormer reading the tiny tower (width 32) and a 512-d ArcFace vector + the tower's 24-d projection
EMBED_ENCODER = IDFormerConfig(dim=32, depth=5, dim_head=8, heads=4, num_id_tokens=2, num_queries=4, output_dim=24,
                               ff_mult=2, vit_dim=32, id_dim=512 + 24, mapping_dim=16)
EVA_FILES = ("eva_vit_model", "transformer", "rope", "utils")


def _stand_in_modules() -> dict[str, types.ModuleType]:
    """What the official files import from timm and torchvision, as small stand-ins: the tower only calls timm's
    ``to_2tuple`` / ``trunc_normal_`` / ``drop_path`` (initialisation and training-time helpers; every parameter
    is seeded afterwards) and ``utils.py`` imports ``FrozenBatchNorm2d`` for a function the tower never calls. So
    the fidelity test needs neither package (torchvision cannot even be imported beside CI's CPU torch)."""
    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    def drop_path(x, drop_prob=0.0, training=False):
        assert not training or not drop_prob, "the stand-in drop_path only runs in eval"
        return x

    layers = types.ModuleType("timm.layers")
    layers.to_2tuple, layers.drop_path, layers.trunc_normal_ = to_2tuple, drop_path, torch.nn.init.trunc_normal_
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    return {"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
            "timm.models.layers": layers, "timm.layers": layers, "torchvision": types.ModuleType("torchvision"),
            "torchvision.ops": types.ModuleType("torchvision.ops"), "torchvision.ops.misc": misc}


@contextlib.contextmanager
def _stand_ins():
    """The stand-ins in ``sys.modules`` while the official files import, whatever was there put back after."""
    import sys

    stand_ins = _stand_in_modules()
    before = {name: sys.modules.get(name, _ABSENT) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in before.items():
            if module is _ABSENT:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


_ABSENT = object()


@functools.lru_cache(maxsize=1)
def official_eva_vit():
    """The official ``eva_clip.eva_vit_model`` module (its four files as a package in a temp folder), or None."""
    import sys

    folder = tempfile.mkdtemp(prefix="pulid_official_eva_")
    package = os.path.join(folder, "pulid_official_eva")
    os.makedirs(package)
    for name in EVA_FILES:
        try:
            text = subprocess.run(["git", "-C", OFFICIAL_REPO, "show", f"HEAD:eva_clip/{name}.py"], check=True,
                                  capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError):
            plain = os.path.join(OFFICIAL_REPO, "eva_clip", f"{name}.py")
            if not os.path.isfile(plain):
                return None
            with open(plain, encoding="utf-8") as handle:
                text = handle.read()
        with open(os.path.join(package, f"{name}.py"), "w", encoding="utf-8") as handle:
            handle.write(text)
    open(os.path.join(package, "__init__.py"), "w").close()
    sys.path.insert(0, folder)
    try:
        with _stand_ins():
            return importlib.import_module("pulid_official_eva.eva_vit_model")
    except ImportError:   # einops missing
        return None
    finally:
        sys.path.remove(folder)


def official_eva(config: EvaVisionConfig = TINY_EVA):
    """The official ``EVAVisionTransformer`` with EVA02-CLIP-L-14-336's switches (model.py's ``_build_vision_tower``
    for EVA02-CLIP-L-14-336.json; apex's FusedLayerNorm and xformers are the same math) at ``config``'s size."""
    from functools import partial

    module = official_eva_vit()
    return module.EVAVisionTransformer(
        img_size=config.image_size, patch_size=config.patch_size, num_classes=config.output_dim,
        use_mean_pooling=False, init_values=None, patch_dropout=0.0, embed_dim=config.width, depth=config.depth,
        num_heads=config.heads, mlp_ratio=config.mlp_ratio, qkv_bias=True, drop_path_rate=0.0,
        norm_layer=partial(torch.nn.LayerNorm, eps=config.eps), xattn=False, rope=True, postnorm=False,
        pt_hw_seq_len=config.rope_grid, intp_freq=True, naiveswiglu=True, subln=True).eval()


def official_tiny_eva(seed: int = 0, config: EvaVisionConfig = TINY_EVA):
    """:func:`official_eva` at a tiny size, every parameter seeded."""
    return seeded_(official_eva(config), seed, std=0.1)
