"""PuLID-FLUX modules and loader: the released layout loads key for key; ours compute what the official classes
(imported test-only from a fetched copy) and an independent transcription of the equations compute, to 1e-4;
bad files are refused with the file named."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from likeness.errors import CheckpointLayoutError, ModelFileError
from likeness.techniques.pulid_flux.checkpoint import (
    load_pulid_flux,
    pulid_flux_from_state_dict,
    state_dict_of,
)
from likeness.techniques.pulid_flux.encoders import IDCrossAttention, IDFormer, IDFormerConfig
from pulid_support import TINY_CA, TINY_ENCODER, cached_official, seeded_, tiny_pulid, tiny_state_dict, vit_hidden

LAYOUT = os.path.join(os.path.dirname(__file__), "data", "checkpoint_layouts", "pulid_flux_v0.9.1.json")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def layout_keys() -> dict[str, dict]:
    with open(LAYOUT, encoding="utf-8") as handle:
        return json.load(handle)["groups"][""]


def key_constant(key: str) -> float:
    return (sum(map(ord, key)) % 997) / 997.0 - 0.5


# --------------------------------------------------------------------------------------------------------------
# The released layout

def test_release_config_has_the_layouts_keys_and_shapes():
    keys = layout_keys()
    with torch.device("meta"):
        encoder = IDFormer()
        cas = [IDCrossAttention() for _ in range(20)]
    ours = {f"pulid_encoder.{k}": list(v.shape) for k, v in encoder.state_dict().items()}
    for i, ca in enumerate(cas):
        ours.update({f"pulid_ca.{i}.{k}": list(v.shape) for k, v in ca.state_dict().items()})
    assert ours == {k: spec["shape"] for k, spec in keys.items()}


def test_release_layout_loads_key_for_key():
    """Every tensor of the full-size layout reaches its parameter (each filled with a per-key constant)."""
    keys = layout_keys()
    state = {k: torch.tensor(key_constant(k), dtype=DTYPES[s["dtype"]]).expand(s["shape"]) for k, s in keys.items()}
    model = pulid_flux_from_state_dict(state, "pulid_flux_v0.9.1.safetensors")
    assert len(model.cross_attentions) == 20
    assert model.encoder_config == IDFormerConfig()
    assert model.ca_config.dim == 3072 and model.ca_config.id_dim == 2048 and model.ca_config.heads == 16
    loaded = state_dict_of(model)
    assert set(loaded) == set(keys)
    for key, tensor in loaded.items():
        assert tensor.dtype == torch.bfloat16
        expected = float(torch.tensor(key_constant(key)).to(torch.bfloat16))
        assert float(tensor.reshape(-1)[0]) == expected and float(tensor.reshape(-1)[-1]) == expected, key
    del model, loaded, state


# --------------------------------------------------------------------------------------------------------------
# Equations: an independent transcription (the paper / release, in plain tensor code)

def reference_attention(q_in, kv_in, p, heads):
    """Perceiver attention: LN, projections, softmax(q k^T / sqrt(d)) v, output projection (weights ``p``)."""
    q = q_in @ p["to_q.weight"].T
    k, v = (kv_in @ p["to_kv.weight"].T).chunk(2, dim=-1)
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ v).permute(0, 2, 1, 3).reshape(b, n, inner) @ p["to_out.weight"].T


def layer_norm(x, p, prefix):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], p[f"{prefix}.weight"], p[f"{prefix}.bias"])


def reference_ca(p, id_tokens, image_tokens, heads):
    return reference_attention(layer_norm(image_tokens, p, "norm2"), layer_norm(id_tokens, p, "norm1"), p, heads)


def reference_mlp(p, prefix, x):
    for i in (0, 3):
        x = torch.nn.functional.leaky_relu(layer_norm(x @ p[f"{prefix}.{i}.weight"].T + p[f"{prefix}.{i}.bias"], p,
                                                      f"{prefix}.{i + 1}"), 0.01)
    return x @ p[f"{prefix}.6.weight"].T + p[f"{prefix}.6.bias"]


def reference_idformer(p, config, id_vector, hidden):
    b = id_vector.shape[0]
    ids = reference_mlp(p, "id_embedding_mapping", id_vector).reshape(b, -1, config.dim)
    latents = torch.cat((p["latents"].repeat(b, 1, 1), ids), dim=1)
    per_scale = config.depth // 5
    for scale in range(5):
        context = torch.cat((ids, reference_mlp(p, f"mapping_{scale}", hidden[scale])), dim=1)
        for layer in range(scale * per_scale, (scale + 1) * per_scale):
            a = {k[len(f"layers.{layer}.0."):]: v for k, v in p.items() if k.startswith(f"layers.{layer}.0.")}
            normed = layer_norm(latents, a, "norm2")
            latents = latents + reference_attention(
                normed, torch.cat((layer_norm(context, a, "norm1"), normed), dim=1), a, config.heads)
            h = layer_norm(latents, p, f"layers.{layer}.1.0") @ p[f"layers.{layer}.1.1.weight"].T
            latents = latents + torch.nn.functional.gelu(h) @ p[f"layers.{layer}.1.3.weight"].T
    return latents[:, :config.num_queries] @ p["proj_out"]


def test_idformer_matches_the_equations():
    model = tiny_pulid(seed=3)
    p = model.encoder.state_dict()
    id_vector = torch.randn(2, TINY_ENCODER.id_dim, generator=torch.Generator().manual_seed(1))
    hidden = vit_hidden(TINY_ENCODER, batch=2)
    ours = model.encoder(id_vector, hidden)
    assert ours.shape == (2, TINY_ENCODER.num_queries, TINY_ENCODER.output_dim)
    torch.testing.assert_close(ours, reference_idformer(p, TINY_ENCODER, id_vector, hidden), atol=1e-4, rtol=1e-4)


def test_idformer_reads_several_reference_vectors_as_more_id_tokens():
    model = tiny_pulid(seed=4)
    vectors = torch.randn(1, 3, TINY_ENCODER.id_dim, generator=torch.Generator().manual_seed(2))
    hidden = vit_hidden(TINY_ENCODER)
    ours = model.encoder(vectors, hidden)
    reference = reference_idformer(model.encoder.state_dict(), TINY_ENCODER, vectors, hidden)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_cross_attention_matches_the_equations():
    model = tiny_pulid(seed=5, count=2)
    g = torch.Generator().manual_seed(3)
    ids = torch.randn(2, 4, TINY_CA.id_dim, generator=g)
    img = torch.randn(2, 30, TINY_CA.dim, generator=g)
    for ca in model.cross_attentions:
        torch.testing.assert_close(ca(ids, img), reference_ca(ca.state_dict(), ids, img, TINY_CA.heads),
                                   atol=1e-4, rtol=1e-4)


def test_a_wrong_transcription_is_caught():
    """The reference is sensitive: swapping the two LayerNorms of the cross-attention changes the output."""
    ca = tiny_pulid(seed=6, count=1).cross_attentions[0]
    p = dict(ca.state_dict())
    g = torch.Generator().manual_seed(4)
    ids, img = torch.randn(1, 4, TINY_CA.id_dim, generator=g), torch.randn(1, 9, TINY_CA.dim, generator=g)
    wrong = reference_attention(layer_norm(img, p, "norm2"), ids, p, TINY_CA.heads)   # norm1 left out
    assert not torch.allclose(ca(ids, img), wrong, atol=1e-3)


# --------------------------------------------------------------------------------------------------------------
# The official classes (test-only import from the fetched copy)

needs_official = pytest.mark.skipif(cached_official() is None, reason="official PuLID code not fetched "
                                    "(set PULID_OFFICIAL to a checkout or bare mirror of ToTheBeginning/PuLID)")

# the official IDFormer fixes the 1024-wide ViT mappings and the 1280-d ID vector; the rest is shrunk
OFFICIAL_TINY = IDFormerConfig(dim=64, depth=5, dim_head=16, heads=4, num_id_tokens=3, num_queries=6, output_dim=48,
                               ff_mult=2)


@needs_official
def test_official_idformer_and_ca_match_ours_through_the_loader():
    official = cached_official()
    c = OFFICIAL_TINY
    torch.manual_seed(0)
    encoder = seeded_(official.IDFormer(dim=c.dim, depth=c.depth, dim_head=c.dim_head, heads=c.heads,
                                        num_id_token=c.num_id_tokens, num_queries=c.num_queries,
                                        output_dim=c.output_dim, ff_mult=c.ff_mult), seed=11, std=0.05)
    cas = [seeded_(official.PerceiverAttentionCA(dim=96, dim_head=24, heads=4, kv_dim=c.output_dim), seed=20 + i)
           for i in range(3)]
    flat = {f"pulid_encoder.{k}": v for k, v in encoder.state_dict().items()}
    for i, ca in enumerate(cas):
        flat.update({f"pulid_ca.{i}.{k}": v for k, v in ca.state_dict().items()})

    ours = pulid_flux_from_state_dict(flat, "official-tiny", encoder_heads=c.heads, ca_heads=4)
    assert ours.encoder_config == c

    g = torch.Generator().manual_seed(5)
    id_vector = torch.randn(2, 1280, generator=g)
    hidden = [torch.randn(2, 11, 1024, generator=g) for _ in range(5)]
    with torch.no_grad():
        expected = encoder(id_vector, hidden)
        got = ours.encoder(id_vector, hidden)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, reference_idformer(encoder.state_dict(), c, id_vector, hidden), atol=1e-4,
                               rtol=1e-4)

    img = torch.randn(2, 40, 96, generator=g)
    for mine, theirs in zip(ours.cross_attentions, cas, strict=True):
        with torch.no_grad():
            torch.testing.assert_close(mine(expected, img), theirs(expected, img), atol=1e-4, rtol=1e-4)


@needs_official
def test_official_release_classes_build_the_layout_file():
    official = cached_official()
    with torch.device("meta"):
        keys = {f"pulid_encoder.{k}": list(v.shape) for k, v in official.IDFormer().state_dict().items()}
        keys.update({f"pulid_ca.{i}.{k}": list(v.shape) for i in range(20)
                     for k, v in official.PerceiverAttentionCA().state_dict().items()})
    assert keys == {k: s["shape"] for k, s in layout_keys().items()}


# --------------------------------------------------------------------------------------------------------------
# Files and bad input

def test_safetensors_round_trip(tmp_path):
    model = tiny_pulid(seed=7)
    path = tmp_path / "pulid_flux_tiny.safetensors"
    save_file(state_dict_of(model), str(path))
    loaded = load_pulid_flux(str(path), encoder_heads=TINY_ENCODER.heads, ca_heads=TINY_CA.heads)
    assert loaded.encoder_config == TINY_ENCODER and loaded.ca_config == TINY_CA
    for key, tensor in state_dict_of(loaded).items():
        assert torch.equal(tensor, state_dict_of(model)[key]), key


@pytest.mark.parametrize("damage, needle", [
    (lambda sd: sd.pop("pulid_ca.1.to_kv.weight"), "pulid_ca.1.to_kv.weight' missing"),
    (lambda sd: sd.__setitem__("pulid_encoder.extra.weight", torch.zeros(2)), "unexpected key 'pulid_encoder.extra"),
    (lambda sd: sd.__setitem__("pulid_ca.0.to_out.weight", torch.zeros(3, 3)), "pulid_ca.0.to_out.weight' has shape"),
    (lambda sd: sd.__setitem__("lora.down", torch.zeros(2)), "unexpected key 'lora.down'"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("pulid_ca.2.")], "'pulid_ca.2.*' missing"),
])
def test_damaged_layouts_are_refused_naming_the_key(damage, needle):
    state = tiny_state_dict(seed=1)
    damage(state)
    with pytest.raises(CheckpointLayoutError, match="pulid_flux_x.safetensors") as info:
        pulid_flux_from_state_dict(state, "pulid_flux_x.safetensors", TINY_ENCODER.heads, TINY_CA.heads)
    assert needle in str(info.value)


def test_an_sd15_pulid_file_is_named_as_such():
    state = {"id_adapter.latents": torch.zeros(1, 2, 3), "id_adapter_attn_layers.0.id_to_k.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointLayoutError, match="pulid_v1.1.safetensors.*SD1.5/SDXL"):
        pulid_flux_from_state_dict(state, "pulid_v1.1.safetensors")


def test_another_models_file_is_refused():
    with pytest.raises(CheckpointLayoutError, match="flux1-dev.safetensors is not a PuLID-FLUX file"):
        pulid_flux_from_state_dict({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, "flux1-dev.safetensors")


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "pulid_flux_v0.9.1.safetensors"
    save_file(tiny_state_dict(seed=2), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="pulid_flux_v0.9.1.safetensors.*truncated or corrupt"):
        load_pulid_flux(str(path))
    with pytest.raises(ModelFileError, match="not found"):
        load_pulid_flux(str(tmp_path / "nothing.safetensors"))


def test_residual_leaves_reference_tokens_after_the_grid_alone():
    """A Kontext-style stream (generated grid + reference tokens): only the grid's tokens get the ID residual, and
    the negative rows get the uncond tokens."""
    from likeness.attention_patches import BlockCall, ChunkLayout, DitSite
    from likeness.techniques.pulid_flux.embeds import PulidFluxEmbeds
    from likeness.techniques.pulid_flux.injector import PulidFluxInjector

    model = tiny_pulid(seed=8, count=1)
    g = torch.Generator().manual_seed(6)
    embeds = PulidFluxEmbeds(torch.randn(1, 4, TINY_CA.id_dim, generator=g), torch.randn(1, 4, TINY_CA.id_dim,
                                                                                         generator=g), "tiny")
    injector = PulidFluxInjector(model, embeds, {0: 0}, weight=0.5)
    site = DitSite(0, "double", 0, TINY_CA.dim, 4, 16)
    img = torch.randn(2, 16 + 6, TINY_CA.dim, generator=g)   # 4x4 grid + 6 reference tokens, rows [neg, pos]
    call = BlockCall(img, site, ChunkLayout((1, 0), 1), 0.5, (4, 4), 8, {})
    ((positive_rows, positive), (negative_rows, negative)) = injector.residual(call, injector.weight_at(site))
    ca = model.cross_attentions[0]
    assert (positive_rows, negative_rows) == ([1], [0])   # positive rows first, then the negative ones
    torch.testing.assert_close(positive[0, :16], 0.5 * ca(embeds.tokens, img[1:2, :16])[0])
    torch.testing.assert_close(negative[0, :16], 0.5 * ca(embeds.uncond_tokens, img[0:1, :16])[0])
    assert float(positive[:, 16:].abs().max()) == 0.0 and float(negative[:, 16:].abs().max()) == 0.0
    assert injector.weight_at(DitSite(1, "double", 1, TINY_CA.dim, 4, 16)) == 0.0
