"""ConsistentID-SDXL without a host: the official ``ConsistentID_SDXL-v1.bin`` layout through the loader, base
detection (SD1.5 vs SDXL), the SDXL prompt style, and the SDXL FacialEncoder against the official equations.

The layout ``consistentid_sdxl_v1.json`` was derived from the official classes (JackAILab/ConsistentID@e234008
``functions.py:ProjPlusModel``, ``attention.py:Consistent_(IP)AttProcessor`` + ``FacialEncoder``) built on the meta
device with the SDXL pipeline's dims (see its ``source`` / ``format_notes``).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from faceid_support import CONSISTENTID, expected_value, flatten, read_layout, state_dict_from_layout
from likeness.errors import CheckpointLayoutError
from likeness.techniques.consistentid import loader
from likeness.techniques.consistentid.facial_encoder import facial_encoder_config_from_state_dict
from likeness.techniques.consistentid.tokens import (
    DETAIL,
    DETAIL_SDXL,
    FIXED_FACIAL_CAPTION_SDXL,
    assemble_facial_prompt,
    mark_facial_caption,
)

CONSISTENTID_SDXL = "consistentid_sdxl_v1.json"
ALL_REGIONS = ["Face", "Left_Eye", "Left_Ear", "Nose", "Upper_Lip"]


# --------------------------------------------------------------------------------------------------------------
# Layout and base detection

def test_official_sdxl_layout_loads_key_for_key():
    layout = read_layout(CONSISTENTID_SDXL)
    groups = state_dict_from_layout(CONSISTENTID_SDXL)
    checkpoint = loader.load_consistentid_state_dict(groups, source="ConsistentID_SDXL-v1.bin")
    assert checkpoint.group_names == {"projector": "image_proj_model", "processors": "adapter_modules",
                                      "facial_encoder": "FacialEncoder"}
    info = loader.consistentid_base(checkpoint)
    assert (info.base, info.blocks, info.context_dim) == ("SDXL", 70, 2048)
    assert checkpoint.shortcut                     # the SDXL pipeline runs the projector with shortcut=True
    assert checkpoint.num_tokens == 4 and checkpoint.adapter.rank == 128
    # every key reached its parameter (each tensor is filled with a per-key constant)
    projector, encoder = checkpoint.projector.state_dict(), checkpoint.facial_encoder.state_dict()
    assert set(projector) == set(layout["groups"]["image_proj_model"])
    assert set(encoder) == set(layout["groups"]["FacialEncoder"])
    for key in ("perceiver_resampler.layers.3.0.to_kv.weight", "proj.2.bias", "norm.weight"):
        assert float(projector[key].flatten()[0]) == pytest.approx(expected_value("image_proj_model", key,
                                                                                   torch.float32))
    for key in ("visual_projection.latents", "visual_projection.proj_out.weight", "fuse_module.mlp1.fc1.weight"):
        assert float(encoder[key].flatten()[0]) == pytest.approx(expected_value("FacialEncoder", key, torch.float32))
    last = checkpoint.adapter.processors[139]
    assert last.to_k_ip.shape == (1280, 2048) and last.lora["to_k"][0].shape == (128, 2048)
    assert float(last.to_v_ip.flatten()[0]) == pytest.approx(expected_value("adapter_modules", "139.to_v_ip.weight",
                                                                             torch.float32))
    config = facial_encoder_config_from_state_dict(encoder)
    assert (config.embedding_dim, config.resampler_dim, config.output_dim, config.depth) == (1280, 1024, 2048, 8)


def test_sdxl_layout_flat_safetensors_names_and_sd15_alias():
    """The SDXL pipeline's safetensors branch reads flat ``group.key`` names; ``image_proj`` is accepted too."""
    groups = state_dict_from_layout(CONSISTENTID_SDXL)
    assert loader.consistentid_base(loader.load_consistentid_state_dict(flatten(groups))).base == "SDXL"
    groups["image_proj"] = groups.pop("image_proj_model")
    assert loader.load_consistentid_state_dict(groups).shortcut


def test_sd15_layout_is_sd15_without_shortcut():
    checkpoint = loader.load_consistentid_state_dict(state_dict_from_layout(CONSISTENTID))
    info = loader.consistentid_base(checkpoint)
    assert (info.base, info.blocks, info.context_dim) == ("SD1.5", 16, 768)
    assert not checkpoint.shortcut
    assert loader.load_consistentid_state_dict(state_dict_from_layout(CONSISTENTID), shortcut=True).shortcut


def test_sdxl_layout_missing_or_misshaped_key_is_named():
    groups = state_dict_from_layout(CONSISTENTID_SDXL)
    del groups["adapter_modules"]["77.to_k_ip.weight"]
    with pytest.raises(CheckpointLayoutError, match=r"adapter_modules\.77\.to_k_ip\.weight"):
        loader.load_consistentid_state_dict(groups)
    groups = state_dict_from_layout(CONSISTENTID_SDXL)
    groups["FacialEncoder"]["fuse_module.layer_norm.weight"] = torch.zeros(768)
    with pytest.raises(CheckpointLayoutError, match="fuse_module"):
        loader.load_consistentid_state_dict(groups)


def test_base_from_widths_counts_distinct_attention_widths():
    sd15 = [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
    sdxl = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10
    assert loader.base_from_widths(sd15) == "SD1.5" and loader.base_from_widths(sdxl) == "SDXL"
    assert loader.base_from_widths([64, 128]) == "SDXL"              # a scaled-down SDXL shape
    assert "unknown" in loader.base_from_widths([64])


# --------------------------------------------------------------------------------------------------------------
# The SDXL pipeline's prompt

def test_sdxl_prompt_style_caption_and_joiner():
    marked, paired = mark_facial_caption(FIXED_FACIAL_CAPTION_SDXL, ALL_REGIONS)
    assert marked == ("The person has one face <|facial|>, two ears <|facial|>, two eyes <|facial|>, one nose "
                      "<|facial|>, and a mouth <|facial|>,")
    assert paired == ALL_REGIONS                   # region order (the official pairing quirk, see tokens.py)

    def count(text):
        return len(text.split()) + 2

    assert assemble_facial_prompt("a woman", marked, count, detail=DETAIL_SDXL) == "a woman; Detail:" + marked
    assert assemble_facial_prompt("a woman", marked, count) == "a woman" + DETAIL + marked
    long_prompt = " ".join(["word"] * 70)
    assert assemble_facial_prompt(long_prompt, marked, count, detail=DETAIL_SDXL) == (
        "; Detail:" + marked + " Caption:" + long_prompt)


# --------------------------------------------------------------------------------------------------------------
# Fidelity: the SDXL FacialEncoder (real dims) against the official equations

def _layout_state_dict(group: str, seed: int) -> dict[str, torch.Tensor]:
    """Seeded tensors of the layout's shapes: LayerNorms near 1/0, the rest N(0, 1/fan_in) (stable activations)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, spec in read_layout(CONSISTENTID_SDXL)["groups"][group].items():
        shape = spec["shape"]
        noise = torch.randn(shape, generator=generator)
        if "norm" in key:
            out[key] = (1.0 if key.endswith("weight") else 0.0) + 0.1 * noise
        else:
            out[key] = noise / math.sqrt(shape[-1])
    return out


def _linear(sd, prefix, x, bias=True):
    return F.linear(x, sd[f"{prefix}.weight"], sd.get(f"{prefix}.bias") if bias else None)


def _layer_norm(sd, prefix, x):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])


def _official_perceiver_attention(sd, prefix, x, latents, heads):
    """functions.py:PerceiverAttention: q from LN2(latents), k/v from [LN1(x); LN2(latents)], both scaled by
    dh^-1/4, fp32 softmax, to_out (no biases)."""
    x, latents = _layer_norm(sd, f"{prefix}.norm1", x), _layer_norm(sd, f"{prefix}.norm2", latents)
    b, n, _ = latents.shape
    q = _linear(sd, f"{prefix}.to_q", latents, bias=False)
    k, v = _linear(sd, f"{prefix}.to_kv", torch.cat([x, latents], dim=-2), bias=False).chunk(2, dim=-1)

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
    weight = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1)
    return _linear(sd, f"{prefix}.to_out", (weight @ v).permute(0, 2, 1, 3).reshape(b, n, -1), bias=False)


def _official_attention_mlp(sd, features, heads=16):
    """functions.py:AttentionMLP (one learned query, no pos_emb / mean-pooled latents)."""
    latents = sd["visual_projection.latents"].repeat(features.shape[0], 1, 1)
    x = _linear(sd, "visual_projection.proj_in", features)
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("visual_projection.layers."))
    for i in range(depth):
        prefix = f"visual_projection.layers.{i}"
        latents = _official_perceiver_attention(sd, f"{prefix}.0", x, latents, heads) + latents
        ff = F.gelu(_linear(sd, f"{prefix}.1.1", _layer_norm(sd, f"{prefix}.1.0", latents), bias=False))
        latents = _linear(sd, f"{prefix}.1.3", ff, bias=False) + latents
    return _layer_norm(sd, "visual_projection.norm_out", _linear(sd, "visual_projection.proj_out", latents))


def _official_mlp(sd, prefix, x, residual):
    y = _linear(sd, f"{prefix}.fc2", F.gelu(_linear(sd, f"{prefix}.fc1", _layer_norm(sd, f"{prefix}.layernorm", x))))
    return y + x if residual else y


def _official_facial_encoder(sd, prompt_embeds, region_features, token_mask, valid_mask):
    """attention.py:FacialEncoder.forward + FuseModule.forward (masked_scatter of the fused valid regions)."""
    bs, num_inputs, tokens, dim = region_features.shape
    id_embeds = _official_attention_mlp(sd, region_features.view(bs * num_inputs, tokens, dim)).view(bs, num_inputs,
                                                                                                      1, -1)
    valid = id_embeds.view(-1, 1, id_embeds.shape[-1])[valid_mask.flatten()].view(-1, id_embeds.shape[-1])
    flat = prompt_embeds.reshape(-1, prompt_embeds.shape[-1]).clone()
    chosen = flat[token_mask.view(-1)]
    stacked = _official_mlp(sd, "fuse_module.mlp1", torch.cat([chosen, valid], dim=-1), False) + chosen
    stacked = _layer_norm(sd, "fuse_module.layer_norm", _official_mlp(sd, "fuse_module.mlp2", stacked, True))
    flat.masked_scatter_(token_mask.view(-1)[:, None], stacked)
    return flat.view_as(prompt_embeds)


def test_sdxl_facial_encoder_matches_the_official_equations():
    from likeness.techniques.faceid.checkpoint import build_module, load_module_strict

    sd = _layout_state_dict("FacialEncoder", seed=7)
    encoder = load_module_strict(build_module(facial_encoder_config_from_state_dict(sd).build), sd, "FacialEncoder")
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randn(1, 77, 2048, generator=generator)
    regions = torch.zeros(1, 3, 257, 1280)                                  # CLIP-H: 257 tokens of 1280
    regions[0, :2] = torch.randn(2, 257, 1280, generator=generator)        # 2 regions found, 1 padded slot
    token_mask = torch.zeros(1, 77, dtype=torch.bool)
    token_mask[0, [12, 23]] = True
    valid = torch.tensor([[True, True, False]])
    with torch.no_grad():
        expected = _official_facial_encoder(sd, prompt, regions, token_mask, valid)
        ours = encoder(prompt, regions, token_mask, valid)
        direct = encoder.fuse(prompt, encoder.encode_regions(regions[0, :2]), [12, 23])
    assert not torch.allclose(expected[0, 12], prompt[0, 12])
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(direct, expected, rtol=1e-4, atol=1e-4)
