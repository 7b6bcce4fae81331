"""SDXL FaceID family and InstantID through the one loader: the official SDXL layouts load key for key, the
variant and base are read from the keys, and the projectors match the official math (fidelity).

The fidelity references are the official modules' equations written out here from their layout (plain
scaled-dot-product attention, no shared code with the pack). When a checkout of the official repos is named by
``LIKENESS_IP_ADAPTER_SRC`` / ``LIKENESS_INSTANTID_SRC`` (the folders holding their ``ip_adapter`` package and,
for InstantID, ``pipeline_stable_diffusion_xl_instantid.py``), the official classes and ``draw_kps`` are also
executed test-only from those files and compared.
"""
from __future__ import annotations

import ast
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from faceid_support import (
    DTYPES,
    FACEID_PLUSV2_SDXL,
    FACEID_PORTRAIT_SDXL,
    FACEID_SDXL,
    INSTANTID,
    INSTANTID_CONTROLNET,
    expected_value,
    read_layout,
    state_dict_from_layout,
)
from likeness.errors import CheckpointLayoutError
from likeness.techniques.faceid.checkpoint import Variant, load_faceid_state_dict
from likeness.techniques.faceid.projection import IDResampler, MLPProjModel, ProjPlusModel

SDXL_SITES = 70


def assert_sdxl_adapter_consumed(checkpoint, layout_name: str, rank: int) -> None:
    """Every projector and processor key of the layout arrived, shaped as stored, values where they belong."""
    layout = read_layout(layout_name)["groups"]
    proj_state = checkpoint.projector.state_dict()
    assert {k: list(t.shape) for k, t in proj_state.items()} == {k: s["shape"] for k, s in layout["image_proj"].items()}
    seen = set()
    for proc in checkpoint.adapter.processors:
        for target in proc.lora:
            seen |= {f"{proc.index}.{target}_lora.down.weight", f"{proc.index}.{target}_lora.up.weight"}
        seen |= {f"{proc.index}.{n}.weight" for n in ("to_k_ip", "to_v_ip") if getattr(proc, n) is not None}
    assert seen == set(layout["ip_adapter"])
    assert len(checkpoint.adapter.processors) == 2 * SDXL_SITES and checkpoint.base == "SDXL"
    assert checkpoint.adapter.context_dim == 2048 and checkpoint.adapter.rank == rank
    stored = DTYPES[layout["ip_adapter"]["139.to_v_ip.weight"]["dtype"]]
    probe = checkpoint.adapter.processors[139].to_v_ip
    assert probe.shape == (1280, 2048) and torch.all(probe == expected_value("ip_adapter", "139.to_v_ip.weight", stored))


@pytest.mark.parametrize("layout_name, variant, projector_type, tokens, rank", [
    (FACEID_SDXL, Variant.FACEID, MLPProjModel, 4, 128),
    (FACEID_PLUSV2_SDXL, Variant.FACEID_PLUSV2, ProjPlusModel, 4, 128),
    (FACEID_PORTRAIT_SDXL, Variant.FACEID_PORTRAIT, MLPProjModel, 16, 0),
    (INSTANTID, Variant.INSTANTID, IDResampler, 16, 0),
])
def test_sdxl_layouts_load_key_for_key(layout_name, variant, projector_type, tokens, rank):
    released = read_layout(layout_name)["released_as"].split(": ")[-1]
    # loaded in the stored dtype: the broadcast views are not copied (these files are 0.75-1.7 GB)
    stored = DTYPES[next(iter(read_layout(layout_name)["groups"]["image_proj"].values()))["dtype"]]
    checkpoint = load_faceid_state_dict(state_dict_from_layout(layout_name), source=released, dtype=stored)
    assert checkpoint.variant == variant and isinstance(checkpoint.projector, projector_type)
    assert checkpoint.num_tokens == tokens and checkpoint.projector_config.cross_attention_dim == 2048
    assert checkpoint.needs_clip_vision == (variant == Variant.FACEID_PLUSV2)
    assert checkpoint.raw_arcface == (variant == Variant.INSTANTID)
    assert_sdxl_adapter_consumed(checkpoint, layout_name, rank)


def test_instantid_resampler_shape_and_a_broken_key_is_named():
    groups = state_dict_from_layout(INSTANTID)
    config = load_faceid_state_dict(groups, source="ip-adapter.bin").projector_config
    assert (config.kind, config.width, config.depth, config.heads, config.dim_head) == ("resampler", 1280, 4, 20, 64)
    broken = {"image_proj": dict(groups["image_proj"]), "ip_adapter": dict(groups["ip_adapter"])}
    del broken["image_proj"]["layers.3.1.3.weight"]
    with pytest.raises(CheckpointLayoutError, match=r"missing key 'image_proj\.layers\.3\.1\.3\.weight'"):
        load_faceid_state_dict(broken, source="ip-adapter.bin")
    broken = {"image_proj": dict(groups["image_proj"]), "ip_adapter": dict(groups["ip_adapter"])}
    broken["ip_adapter"]["69.to_k_ip.weight"] = torch.zeros(320, 2048)
    with pytest.raises(CheckpointLayoutError, match=r"mis-shaped key .ip_adapter\.69\.to_[kv]_ip\.weight"):
        load_faceid_state_dict(broken, source="ip-adapter.bin")


def test_identitynet_layout_is_validated_key_for_key():
    from likeness.techniques.faceid.controlnet_layout import validate_controlnet_state_dict

    layout = read_layout(INSTANTID_CONTROLNET)["groups"][""]
    sd = {k: torch.empty(spec["shape"], device="meta") for k, spec in layout.items()}
    shape = validate_controlnet_state_dict(sd, "IdentityNet")
    assert shape.block_out_channels == (320, 640, 1280) and shape.blocks_with_attention == (False, True, True)
    assert shape.transformer_depth == (0, 2, 10) and shape.mid_transformer_depth == 10
    assert shape.cross_attention_dim == 2048 and shape.addition_embed_dim == 2816 and shape.linear_projection
    del sd["add_embedding.linear_2.bias"]
    with pytest.raises(CheckpointLayoutError, match=r"missing key 'IdentityNet\.add_embedding\.linear_2\.bias'"):
        validate_controlnet_state_dict(sd, "IdentityNet")


# --------------------------------------------------------------------------------------------------------------
# Fidelity: the official equations, written out from the layout

def seeded_group(layout_name: str, group: str, seed: int) -> dict[str, torch.Tensor]:
    """fp32 random weights in the layout: matrices N(0, 1/fan_in), norms 1 + N(0, 0.1), biases N(0, 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, spec in read_layout(layout_name)["groups"][group].items():
        shape = spec["shape"]
        values = torch.randn(shape, generator=generator)
        if "norm" in key and key.endswith(".weight"):
            values = 1.0 + 0.1 * values
        elif len(shape) >= 2 and key != "latents":
            values = values / math.sqrt(shape[-1])
        else:
            values = 0.1 * values if key != "latents" else values
        out[key] = values
    return out


def with_views(layout_name: str, projector: dict[str, torch.Tensor]) -> dict:
    """The projector's real weights plus the processors as fp32 broadcast views (not copied by an fp32 load)."""
    return {"image_proj": projector,
            "ip_adapter": state_dict_from_layout(layout_name, as_dtype=torch.float32)["ip_adapter"]}


def ref_layer_norm(p, prefix, x):
    return F.layer_norm(x, x.shape[-1:], p[f"{prefix}.weight"], p[f"{prefix}.bias"], eps=1e-5)


def ref_linear(p, prefix, x, bias=True):
    return x @ p[f"{prefix}.weight"].T + (p[f"{prefix}.bias"] if bias else 0)


def ref_perceiver_attention(p, prefix, context, latents, heads):
    """softmax(q k^T / sqrt(d_head)) v over [context; latents], queries from the latents (both LayerNorm-ed)."""
    context, latents = ref_layer_norm(p, f"{prefix}.norm1", context), ref_layer_norm(p, f"{prefix}.norm2", latents)
    q = latents @ p[f"{prefix}.to_q.weight"].T
    k, v = (torch.cat([context, latents], dim=1) @ p[f"{prefix}.to_kv.weight"].T).chunk(2, dim=-1)
    b, n, inner = q.shape
    d = inner // heads
    split = [t.reshape(b, t.shape[1], heads, d).permute(0, 2, 1, 3) for t in (q, k, v)]
    weights = torch.softmax(split[0] @ split[1].transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ split[2]).permute(0, 2, 1, 3).reshape(b, n, inner) @ p[f"{prefix}.to_out.weight"].T


def ref_feed_forward(p, prefix, x):
    hidden = F.gelu(ref_layer_norm(p, f"{prefix}.0", x) @ p[f"{prefix}.1.weight"].T)
    return hidden @ p[f"{prefix}.3.weight"].T


def ref_perceiver(p, prefix, latents, features, heads, depth):
    context = ref_linear(p, f"{prefix}proj_in", features)
    for i in range(depth):
        latents = ref_perceiver_attention(p, f"{prefix}layers.{i}.0", context, latents, heads) + latents
        latents = ref_feed_forward(p, f"{prefix}layers.{i}.1", latents) + latents
    return ref_layer_norm(p, f"{prefix}norm_out", ref_linear(p, f"{prefix}proj_out", latents))


def ref_mlp_tokens(p, id_embeds, tokens, width):
    """MLPProjModel: Linear -> GELU -> Linear, reshaped to tokens, LayerNorm per token."""
    hidden = F.gelu(ref_linear(p, "proj.0", id_embeds))
    return ref_layer_norm(p, "norm", ref_linear(p, "proj.2", hidden).reshape(-1, tokens, width))


def arcface(batch: int = 2, seed: int = 11, raw: bool = False) -> torch.Tensor:
    vectors = torch.randn(batch, 512, generator=torch.Generator().manual_seed(seed))
    return vectors * 20.0 if raw else F.normalize(vectors, dim=-1)


def test_faceid_sdxl_projector_matches_the_official_math():
    from likeness.techniques.faceid.apply import encode_id_tokens

    p = seeded_group(FACEID_SDXL, "image_proj", seed=1)
    checkpoint = load_faceid_state_dict(with_views(FACEID_SDXL, p), source="ip-adapter-faceid_sdxl.bin")
    ids = arcface()
    tokens = encode_id_tokens(checkpoint, ids)
    assert tokens.cond.shape == (2, 4, 2048)
    torch.testing.assert_close(tokens.cond, ref_mlp_tokens(p, ids, 4, 2048), rtol=0, atol=1e-4)
    torch.testing.assert_close(tokens.uncond, ref_mlp_tokens(p, torch.zeros_like(ids), 4, 2048), rtol=0, atol=1e-4)
    official = official_ip_adapter_faceid()
    if official is not None:
        module = official["MLPProjModel"](2048, 512, 4)
        module.load_state_dict(p)
        with torch.no_grad():
            torch.testing.assert_close(tokens.cond, module(ids), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_faceid_plusv2_sdxl_projector_matches_the_official_math():
    from likeness.techniques.faceid.apply import encode_id_tokens

    p = seeded_group(FACEID_PLUSV2_SDXL, "image_proj", seed=2)
    checkpoint = load_faceid_state_dict(with_views(FACEID_PLUSV2_SDXL, p), source="ip-adapter-faceid-plusv2_sdxl.bin")
    ids = arcface(batch=1)
    clip = torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(5))
    zero_clip = torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(6))
    tokens = encode_id_tokens(checkpoint, ids, clip, zero_clip, s_scale=0.7)
    mlp = ref_mlp_tokens(p, ids, 4, 2048)
    expected = mlp + 0.7 * ref_perceiver(p, "perceiver_resampler.", mlp, clip, heads=32, depth=4)
    torch.testing.assert_close(tokens.cond, expected, rtol=0, atol=1e-4)
    official = official_ip_adapter_faceid()
    if official is not None:
        module = official["ProjPlusModel"](2048, 512, 1280, 4)
        module.load_state_dict(p)
        with torch.no_grad():
            torch.testing.assert_close(tokens.cond, module(ids, clip, shortcut=True, scale=0.7), rtol=0, atol=1e-4)


def test_instantid_resampler_matches_the_official_math():
    from likeness.techniques.faceid.apply import encode_id_tokens

    p = seeded_group(INSTANTID, "image_proj", seed=3)
    checkpoint = load_faceid_state_dict(with_views(INSTANTID, p), source="ip-adapter.bin")
    ids = arcface(raw=True)
    tokens = encode_id_tokens(checkpoint, ids)
    latents = p["latents"].expand(2, -1, -1)
    expected = ref_perceiver(p, "", latents, ids.reshape(2, 1, 512), heads=20, depth=4)
    assert tokens.cond.shape == (2, 16, 2048)
    torch.testing.assert_close(tokens.cond, expected, rtol=0, atol=1e-4)
    uncond = ref_perceiver(p, "", latents[:1], torch.zeros(1, 1, 512), heads=20, depth=4)
    torch.testing.assert_close(tokens.uncond[:1], uncond, rtol=0, atol=1e-4)   # the pipeline's zeros_like branch
    official = official_instantid_module("ip_adapter/resampler.py", ["FeedForward", "reshape_tensor",
                                                                     "PerceiverAttention", "Resampler"])
    if official is not None:
        module = official["Resampler"](dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=512,
                                       output_dim=2048, ff_mult=4)
        module.load_state_dict(p)
        with torch.no_grad():
            torch.testing.assert_close(tokens.cond, module(ids.reshape(2, 1, 512)), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# The official code itself, executed test-only from a checkout when one is named

def _definitions(path: str, names: list[str], namespace: dict) -> dict:
    """Execute only the named top-level classes / functions of ``path`` in ``namespace`` (no module imports)."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    body = [node for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in names]
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), namespace)  # noqa: S102 (test-only)
    return namespace


def official_instantid_module(relative: str, names: list[str]) -> dict | None:
    root = os.environ.get("LIKENESS_INSTANTID_SRC")
    if not root:
        return None
    import cv2
    import PIL.Image

    return _definitions(os.path.join(root, relative), names, {"torch": torch, "nn": torch.nn, "math": math,
                                                               "np": np, "cv2": cv2, "PIL": PIL})


def official_ip_adapter_faceid() -> dict | None:
    root = os.environ.get("LIKENESS_IP_ADAPTER_SRC")
    if not root:
        return None
    namespace = _definitions(os.path.join(root, "ip_adapter", "resampler.py"),
                             ["FeedForward", "reshape_tensor", "PerceiverAttention"],
                             {"torch": torch, "nn": torch.nn, "math": math})
    return _definitions(os.path.join(root, "ip_adapter", "ip_adapter_faceid.py"),
                        ["FacePerceiverResampler", "MLPProjModel", "ProjPlusModel"], namespace)


def test_kps_map_equals_the_official_draw_kps_when_a_checkout_is_named():
    official = official_instantid_module("pipeline_stable_diffusion_xl_instantid.py", ["draw_kps"])
    if official is None:
        pytest.skip("LIKENESS_INSTANTID_SRC is not set (test_face_pose.py checks the map against its equations)")
    import PIL.Image

    from likeness.face_analysis.pose import draw_kps_map

    rng = np.random.default_rng(7)
    for width, height in ((640, 480), (333, 517)):
        centre = rng.uniform([80, 80], [width - 80, height - 80])
        kps = (centre + rng.normal(0, 40, (5, 2))).astype(np.float32)
        reference = np.asarray(official["draw_kps"](PIL.Image.new("RGB", (width, height)), kps))
        np.testing.assert_array_equal(draw_kps_map(kps, width, height), reference)
