"""Projectors of the FaceID family against the formulas of the official code (plain tensors, small widths)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from likeness.errors import InvalidInputError
from likeness.techniques.faceid.mixing import average_identities, mix_identities
from likeness.techniques.faceid.projection import (
    FacePerceiverResampler,
    MLPProjModel,
    PerceiverAttention,
    ProjPlusModel,
    feed_forward,
    projector_config_from_state_dict,
    projector_tokens,
)


def seeded(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" not in name else 0.1) + (1.0 if name.endswith("norm.weight")
                                                                                  else 0.0))
    return module.eval()


def reference_perceiver_attention(attn: PerceiverAttention, context, latents):
    """Formula: q from LN2(latents), k/v from [LN1(context); LN2(latents)], softmax(q k^T / sqrt(dh)) v, to_out."""
    ctx = F.layer_norm(context, (context.shape[-1],), attn.norm1.weight, attn.norm1.bias)
    lat = F.layer_norm(latents, (latents.shape[-1],), attn.norm2.weight, attn.norm2.bias)
    q = lat @ attn.to_q.weight.T
    k, v = (torch.cat([ctx, lat], 1) @ attn.to_kv.weight.T).chunk(2, -1)
    split = lambda x: x.view(x.shape[0], x.shape[1], attn.heads, attn.dim_head).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))   # standard 1/sqrt(dh) scaling
    return out.transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1) @ attn.to_out.weight.T


def test_perceiver_split_scale_equals_standard_scaled_attention():
    attn = seeded(PerceiverAttention(dim=48, dim_head=16, heads=3)).double()
    context, latents = torch.randn(2, 9, 48, dtype=torch.float64), torch.randn(2, 4, 48, dtype=torch.float64)
    torch.testing.assert_close(attn(context, latents), reference_perceiver_attention(attn, context, latents))


def test_perceiver_softmax_runs_in_fp32(monkeypatch):
    attn = seeded(PerceiverAttention(dim=32, dim_head=16, heads=2)).to(torch.bfloat16)
    seen = []
    real_softmax = torch.softmax

    def spy(x, dim=None, **kw):
        seen.append(x.dtype)
        return real_softmax(x, dim=dim, **kw)

    monkeypatch.setattr(torch, "softmax", spy)
    out = attn(torch.randn(1, 5, 32, dtype=torch.bfloat16), torch.randn(1, 4, 32, dtype=torch.bfloat16))
    assert seen == [torch.float32] and out.dtype == torch.bfloat16


def test_feed_forward_key_names_and_formula():
    ff = seeded(feed_forward(16, 4))
    assert set(ff.state_dict()) == {"0.weight", "0.bias", "1.weight", "3.weight"}
    x = torch.randn(2, 3, 16)
    expected = F.gelu(F.layer_norm(x, (16,), ff[0].weight, ff[0].bias) @ ff[1].weight.T) @ ff[3].weight.T
    torch.testing.assert_close(ff(x), expected)


def test_face_perceiver_resampler_formula_and_shapes():
    resampler = seeded(FacePerceiverResampler(dim=32, depth=2, dim_head=16, heads=2, embedding_dim=24,
                                              output_dim=32))
    assert not any("latents" in k for k in resampler.state_dict())   # queries come from outside
    latents, features = torch.randn(2, 4, 32), torch.randn(2, 7, 24)
    context = features @ resampler.proj_in.weight.T + resampler.proj_in.bias
    x = latents
    for attn, ff in resampler.layers:
        x = reference_perceiver_attention(attn, context, x) + x
        x = ff(x) + x
    expected = F.layer_norm(x @ resampler.proj_out.weight.T + resampler.proj_out.bias, (32,),
                            resampler.norm_out.weight, resampler.norm_out.bias)
    out = resampler(latents, features)
    assert out.shape == (2, 4, 32)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def mlp_tokens(model, id_embeds):
    """proj.0 -> GELU -> proj.2, reshape to tokens, LayerNorm per token."""
    hidden = F.gelu(id_embeds @ model.proj[0].weight.T + model.proj[0].bias)
    flat = hidden @ model.proj[2].weight.T + model.proj[2].bias
    tokens = flat.reshape(id_embeds.shape[0], model.num_tokens, model.cross_attention_dim)
    return F.layer_norm(tokens, (model.cross_attention_dim,), model.norm.weight, model.norm.bias)


def test_mlp_proj_model_formula():
    model = seeded(MLPProjModel(cross_attention_dim=32, id_embeddings_dim=16, num_tokens=4))
    assert set(model.state_dict()) == {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias",
                                       "norm.weight", "norm.bias"}
    id_embeds = torch.randn(3, 16)
    out = model(id_embeds)
    assert out.shape == (3, 4, 32)
    torch.testing.assert_close(out, mlp_tokens(model, id_embeds))


def test_proj_plus_shortcut_and_scale():
    model = seeded(ProjPlusModel(cross_attention_dim=32, id_embeddings_dim=16, clip_embeddings_dim=24,
                                 num_tokens=4, depth=2, heads=2, dim_head=16))
    id_embeds, clip = torch.randn(2, 16), torch.randn(2, 9, 24)
    x = mlp_tokens(model, id_embeds)
    refined = model.perceiver_resampler(x, clip)
    plus = model(id_embeds, clip)                                     # FaceID-Plus / ConsistentID
    torch.testing.assert_close(plus, refined)
    for s_scale in (0.0, 0.5, 1.0, 2.0):                              # PlusV2 / Face-MakeUp
        torch.testing.assert_close(model(id_embeds, clip, shortcut=True, scale=s_scale), x + s_scale * refined)
    assert plus.shape == (2, 4, 32)


def test_projector_config_read_from_official_shapes():
    model = ProjPlusModel()  # official sizes: 768 tokens, 512 ArcFace, 1280 CLIP-H, 4 layers, 12 heads
    config = projector_config_from_state_dict(model.state_dict())
    assert (config.kind, config.cross_attention_dim, config.id_embeddings_dim, config.clip_embeddings_dim,
            config.num_tokens, config.depth, config.heads, config.dim_head) == ("plus", 768, 512, 1280, 4, 4, 12, 64)
    assert projector_config_from_state_dict(MLPProjModel().state_dict()).kind == "mlp"


def test_projector_tokens_checks_inputs():
    model = seeded(ProjPlusModel(32, 16, 24, 4, depth=1, heads=2, dim_head=16))
    assert projector_tokens(model, torch.randn(16), torch.randn(9, 24), shortcut=True).shape == (1, 4, 32)
    with pytest.raises(InvalidInputError, match="CLIP vision hidden states"):
        projector_tokens(model, torch.randn(1, 16))
    with pytest.raises(InvalidInputError, match="width 24"):
        projector_tokens(model, torch.randn(1, 16), torch.randn(1, 9, 20))
    with pytest.raises(InvalidInputError, match="16-d identity"):
        projector_tokens(model, torch.randn(1, 512), torch.randn(1, 9, 24))


# --------------------------------------------------------------------------------------------------------------
# Identity mixing

def test_mixing_weight_one_zero_is_the_single_identity():
    a = (torch.nn.functional.normalize(torch.randn(1, 16), dim=-1), torch.randn(1, 9, 24))
    b = (torch.nn.functional.normalize(torch.randn(1, 16), dim=-1), torch.randn(1, 9, 24))
    arc, clip = mix_identities([a, b], [1.0, 0.0])
    assert torch.equal(arc, a[0]) and torch.equal(clip, a[1])
    arc, clip = mix_identities([a, b], [0.0, 3.0])
    assert torch.equal(arc, b[0]) and torch.equal(clip, b[1])
    model = seeded(ProjPlusModel(32, 16, 24, 4, depth=1, heads=2, dim_head=16))
    torch.testing.assert_close(model(*mix_identities([a, b], [1, 0]), shortcut=True), model(*a, shortcut=True),
                               rtol=0, atol=0)


def test_mixing_blends_like_the_demo():
    a, b = (torch.randn(1, 16), torch.randn(1, 9, 24)), (torch.randn(1, 16), torch.randn(1, 9, 24))
    arc, clip = mix_identities([a, b])                                # equal weights = the demo's 0.5 / 0.5
    torch.testing.assert_close(arc, 0.5 * a[0] + 0.5 * b[0])
    torch.testing.assert_close(clip, 0.5 * a[1] + 0.5 * b[1])
    arc, _ = mix_identities([a, b], [3, 1])                           # weights normalised to sum to one
    torch.testing.assert_close(arc, 0.75 * a[0] + 0.25 * b[0])
    arc, clip = mix_identities([(a[0], None), (b[0], None)], [1, 1])  # FaceID: no CLIP input
    assert clip is None
    mean_arc, mean_clip = average_identities(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
    torch.testing.assert_close(mean_arc, 0.5 * (a[0] + b[0]))
    assert mean_clip.shape == (1, 9, 24)


def test_mixing_rejects_bad_inputs():
    a, b = (torch.randn(1, 16), torch.randn(1, 9, 24)), (torch.randn(1, 16), None)
    with pytest.raises(InvalidInputError):
        mix_identities([])
    with pytest.raises(InvalidInputError, match="all present or all None|either every identity"):
        mix_identities([a, b])
    with pytest.raises(InvalidInputError, match="sum to zero"):
        mix_identities([a, a], [0, 0])
    with pytest.raises(InvalidInputError, match="weights"):
        mix_identities([a, a], [1])
    assert math.isfinite(float(mix_identities([a, a], [2, 2])[0].sum()))
