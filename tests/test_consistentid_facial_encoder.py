"""ConsistentID's FacialEncoder against the formulas of the official code (plain tensors, small widths)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from likeness.errors import InvalidInputError
from likeness.techniques.consistentid import facial_encoder
from likeness.techniques.consistentid.facial_encoder import FacialEncoder, FuseModule


def seeded(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return module.eval()


def small_encoder():
    return seeded(FacialEncoder(embedding_dim=24, output_dim=32, resampler_dim=48, depth=2, heads=3, dim_head=16))


def ln(x, module):
    return F.layer_norm(x, (x.shape[-1],), module.weight, module.bias)


def mlp(x, m):
    return m.fc2(F.gelu(m.fc1(ln(x, m.layernorm))))


def test_official_key_names():
    keys = set(FacialEncoder().state_dict())
    assert {"visual_projection.latents", "visual_projection.proj_in.weight", "visual_projection.norm_out.bias",
            "visual_projection.layers.7.0.to_kv.weight", "visual_projection.layers.7.1.3.weight",
            "fuse_module.mlp1.layernorm.weight", "fuse_module.mlp2.fc2.bias", "fuse_module.layer_norm.bias"} <= keys
    assert len(keys) == 109
    config = facial_encoder.facial_encoder_config_from_state_dict(FacialEncoder().state_dict())
    assert (config.embedding_dim, config.output_dim, config.resampler_dim, config.depth, config.heads,
            config.dim_head, config.num_queries) == (1280, 768, 1024, 8, 16, 64, 1)


def test_fuse_module_formula():
    fuse = seeded(FuseModule(16))
    tok, img = torch.randn(5, 16), torch.randn(5, 16)
    stage1 = mlp(torch.cat([tok, img], -1), fuse.mlp1) + tok          # MLP1(cat) + token
    stage2 = mlp(stage1, fuse.mlp2) + stage1                          # residual MLP2
    torch.testing.assert_close(fuse(tok, img), ln(stage2, fuse.layer_norm))


def test_region_resampler_one_query_per_region():
    encoder = small_encoder()
    regions = torch.randn(3, 11, 24)                                  # 3 crops, 11 CLIP tokens each
    vectors = encoder.encode_regions(regions)
    assert vectors.shape == (3, 32)
    # each region is encoded independently of the others
    torch.testing.assert_close(encoder.encode_regions(regions[1:2])[0], vectors[1], rtol=1e-5, atol=1e-6)


def test_fuse_replaces_only_marked_tokens_in_sequence_order():
    encoder = small_encoder()
    prompt = torch.randn(1, 20, 32)
    regions = torch.randn(2, 32)
    out = encoder.fuse(prompt, regions, [4, 9])
    untouched = [i for i in range(20) if i not in (4, 9)]
    assert torch.equal(out[:, untouched], prompt[:, untouched])
    torch.testing.assert_close(out[0, 4], encoder.fuse_module(prompt[0, 4], regions[0]))
    torch.testing.assert_close(out[0, 9], encoder.fuse_module(prompt[0, 9], regions[1]))
    assert not torch.equal(out[:, 4], prompt[:, 4])
    assert torch.equal(prompt, prompt.clone())                         # input not modified in place


def test_official_style_forward_pairs_valid_regions_with_marked_tokens():
    """valid regions (region order) <-> marked tokens (sequence order); padded regions are ignored."""
    encoder = small_encoder()
    prompt = torch.randn(2, 16, 32)
    regions = torch.randn(2, 5, 7, 24)
    token_mask = torch.zeros(2, 16, dtype=torch.bool)
    token_mask[0, [3, 6, 12]] = True
    token_mask[1, [2]] = True
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = encoder(prompt, regions, token_mask, valid)
    vectors0 = encoder.encode_regions(regions[0, :3])
    expected0 = encoder.fuse(prompt[:1], vectors0, [3, 6, 12])
    torch.testing.assert_close(out[:1], expected0)
    expected1 = encoder.fuse(prompt[1:], encoder.encode_regions(regions[1, :1]), [2])
    torch.testing.assert_close(out[1:], expected1)


def test_count_mismatch_and_range_errors():
    encoder = small_encoder()
    with pytest.raises(InvalidInputError, match="exactly one facial region"):
        encoder.fuse(torch.randn(1, 10, 32), torch.randn(2, 32), [3])
    with pytest.raises(InvalidInputError, match="outside"):
        encoder.fuse(torch.randn(1, 10, 32), torch.randn(1, 32), [10])
    torch.testing.assert_close(encoder.fuse(torch.ones(1, 4, 32), torch.zeros(0, 32), []), torch.ones(1, 4, 32))
