"""PuLID-FLUX's ID embedding: the pack's EVA02-CLIP tower (EVA-CLIP's own file layout, no timm) computes what the
official EVA-CLIP code computes; the reference-image pipeline (analyzer, alignment, parsing, EVA, IDFormer) on tiny
models; the embeds' safetensors files."""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from likeness.errors import CheckpointLayoutError, InvalidInputError, ModelFileError, NoFaceError
from likeness.techniques.pulid_flux.embeds import PulidFluxEmbeds, load_pulid_embeds, save_pulid_embeds
from likeness.techniques.pulid_flux.eva_clip import (
    EVA02_L_336,
    EvaVisionTower,
    build_eva_vision,
    eva_vision_from_state_dict,
    load_eva_clip,
)
from pulid_support import (
    EMBED_ENCODER,
    TINY_CA,
    TINY_EVA,
    official_eva,
    official_eva_vit,
    official_tiny_eva,
    seeded_,
    tiny_pulid,
)

needs_official_eva = pytest.mark.skipif(official_eva_vit() is None, reason="official PuLID eva_clip code not fetched")


def eva_clip_file_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A whole-CLIP state dict as EVA02_CLIP_L_336_psz14_s6B.pt stores it: ``visual.*`` plus the text tower."""
    state = {f"visual.{k}": v.clone() for k, v in model.state_dict().items()}
    state["text.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(6, 2)
    state["logit_scale"] = torch.tensor(1.0)
    return state


# --------------------------------------------------------------------------------------------------------------
# EVA02-CLIP

# EVA-CLIP's EVAVisionTransformer names for EVA02-CLIP-L-14-336 (eva_vit_model.py: subln attention with q/v biases,
# naive SwiGLU with ffn_ln, CLS pooling through `norm`), written out so this check needs no official code
EVA_GLOBAL_KEYS = {"cls_token": (1, 1, 1024), "pos_embed": (1, 577, 1024), "patch_embed.proj.weight": (1024, 3, 14, 14),
                   "patch_embed.proj.bias": (1024,), "norm.weight": (1024,), "norm.bias": (1024,),
                   "head.weight": (768, 1024), "head.bias": (768,)}
EVA_BLOCK_KEYS = {"norm1.weight": (1024,), "norm1.bias": (1024,), "attn.q_bias": (1024,), "attn.v_bias": (1024,),
                  "attn.q_proj.weight": (1024, 1024), "attn.k_proj.weight": (1024, 1024),
                  "attn.v_proj.weight": (1024, 1024), "attn.inner_attn_ln.weight": (1024,),
                  "attn.inner_attn_ln.bias": (1024,), "attn.proj.weight": (1024, 1024), "attn.proj.bias": (1024,),
                  "norm2.weight": (1024,), "norm2.bias": (1024,), "mlp.w1.weight": (2730, 1024), "mlp.w1.bias": (2730,),
                  "mlp.w2.weight": (2730, 1024), "mlp.w2.bias": (2730,), "mlp.ffn_ln.weight": (2730,),
                  "mlp.ffn_ln.bias": (2730,), "mlp.w3.weight": (1024, 2730), "mlp.w3.bias": (1024,)}
# a second tiny size: a 4x4 patch grid and 4 heads (head width 8), so the rotary table's row/column order shows
TINY_EVA_4X4 = replace(TINY_EVA, image_size=56, heads=4)


@needs_official_eva
@pytest.mark.parametrize("config", [TINY_EVA, TINY_EVA_4X4], ids=["2x2-grid", "4x4-grid"])
def test_eva_tower_matches_the_official_eva_clip_code_through_the_file(tmp_path, config):
    official = official_tiny_eva(seed=3, config=config)
    path = tmp_path / "EVA02_CLIP_L_336_psz14_s6B.pt"
    torch.save(eva_clip_file_layout(official), str(path))   # the official model's own keys, rope tables included
    ours = load_eva_clip(str(path), config)
    assert isinstance(ours.model, EvaVisionTower)
    assert ours.image_size == config.image_size and ours.name == path.name
    size = config.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, expected_hidden = official(x, return_all_features=False, return_hidden=True, shuffle=False)
        pooled, hidden = ours(x)
    torch.testing.assert_close(pooled, expected, atol=1e-4, rtol=1e-4)
    assert len(hidden) == len(expected_hidden) == 5
    for mine, theirs in zip(hidden, expected_hidden, strict=True):
        assert mine.shape == (2, 1 + config.grid ** 2, 32)   # CLS + the patches
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    assert float(expected.abs().max()) > 1e-2   # seeded weights: the comparison is not of near-zero outputs
    # the rotary tables are computed, not read, exactly as the official module computes them
    torch.testing.assert_close(ours.model.rope.freqs_cos, official.rope.freqs_cos, atol=0, rtol=0)
    torch.testing.assert_close(ours.model.rope.freqs_sin, official.rope.freqs_sin, atol=0, rtol=0)


@needs_official_eva
@pytest.mark.slow
def test_release_size_official_tower_loads_key_for_key():
    """The official EVA02-CLIP-L-14-336 visual tower at release size (random, stored in fp16 as a whole-CLIP file
    would be): every tensor lands under the same name, nothing is left over or missing."""
    official = official_eva(EVA02_L_336)
    official_state = {k: v.half() for k, v in official.state_dict().items()}
    del official
    weights = {k: v for k, v in official_state.items() if "freqs_" not in k}
    assert len(official_state) - len(weights) == 2 * 25   # the tower's rope tables and each block's shared copy
    ours = eva_vision_from_state_dict({f"visual.{k}": v for k, v in official_state.items()} | {"logit_scale": torch.ones(())},
                                      "EVA02_CLIP_L_336_psz14_s6B.pt")
    loaded = ours.model.state_dict()
    assert list(loaded) == list(weights)   # same names, same order
    for key, value in weights.items():
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], value.float()), key


def test_eva_release_config_has_eva_clip_key_layout():
    with torch.device("meta"):
        model = build_eva_vision(EVA02_L_336)
    expected = dict(EVA_GLOBAL_KEYS)
    expected.update({f"blocks.{i}.{k}": shape for i in range(24) for k, shape in EVA_BLOCK_KEYS.items()})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert EVA02_L_336.grid == 24 and EVA02_L_336.head_dim == 64


def test_eva_tower_needs_neither_timm_nor_torchvision(monkeypatch):
    """Blocked imports (how a broken torchvision beside CI's CPU torch behaves): build, load and run still work."""
    import sys

    for name in ("timm", "torchvision"):
        monkeypatch.setitem(sys.modules, name, None)
    eva = eva_vision_from_state_dict(eva_clip_file_layout(seeded_(build_eva_vision(TINY_EVA), 1, 0.05)), "eva.pt",
                                     TINY_EVA)
    with torch.no_grad():
        pooled, hidden = eva(torch.randn(1, 3, 28, 28))
    assert pooled.shape == (1, 24) and len(hidden) == 5


def _rope_angles(config, row: int, col: int) -> torch.Tensor:
    """EVA02's rotary angles for the patch at (row, col), from the paper's recipe: the first half of a head's
    channels turns with the row, the second with the column; positions scaled from the grid onto the 16-patch grid
    of pre-training; the frequency 10000^(-2k/half) shared by each adjacent channel pair."""
    half = config.head_dim // 2
    freqs = [10000 ** (-(2 * k) / half) for k in range(half // 2)]
    scale = config.rope_grid / config.grid
    per_pair = [row * scale * f for f in freqs] + [col * scale * f for f in freqs]
    return torch.tensor([a for a in per_pair for _ in range(2)])


def test_rotary_embedding_turns_channel_pairs_by_the_patch_position():
    """An independent check of the rotary embedding (runs without the official code): each adjacent channel pair
    of a patch token is rotated by its row / column angle; CLS is not rotated; the same content at two patches
    scores by their offset only."""
    from likeness.techniques.pulid_flux.eva_clip import RotaryEmbedding2d

    config = TINY_EVA_4X4
    rope = RotaryEmbedding2d(config)
    assert rope.freqs_cos.shape == (16, config.head_dim)
    x = torch.randn(config.head_dim, generator=torch.Generator().manual_seed(0))
    tokens = x.expand(16, -1)
    turned = rope(tokens)
    for index in range(16):
        row, col = divmod(index, config.grid)
        angles = _rope_angles(config, row, col)[::2]
        pairs = x.view(-1, 2)
        expected = torch.stack((pairs[:, 0] * angles.cos() - pairs[:, 1] * angles.sin(),
                                pairs[:, 0] * angles.sin() + pairs[:, 1] * angles.cos()), dim=-1).flatten()
        torch.testing.assert_close(turned[index], expected, atol=1e-5, rtol=1e-5)
    # relative position: (0,0)·(1,2) == (2,1)·(3,3)
    score = turned @ turned.T
    torch.testing.assert_close(score[0, 6], score[9, 15], atol=1e-4, rtol=1e-4)

    # in the tower, CLS (token 0) has no position: only the patch tokens' queries and keys turn
    tower = build_eva_vision(config)
    q = torch.randn(1, config.heads, 17, config.head_dim)
    rotated = tower.blocks[0].attn._rotate_patches(q)
    assert torch.equal(rotated[:, :, 0], q[:, :, 0]) and not torch.allclose(rotated[:, :, 1:], q[:, :, 1:])


def test_eva_safetensors_copy_and_refused_files(tmp_path):
    from safetensors.torch import save_file

    model = seeded_(build_eva_vision(TINY_EVA), 1, std=0.05)
    path = tmp_path / "eva.safetensors"
    save_file({k: v.contiguous() for k, v in eva_clip_file_layout(model).items()}, str(path))
    loaded = load_eva_clip(str(path), TINY_EVA)
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])
        # a tower-only copy (names without ``visual.``) in fp16 loads too, cast to fp32
        half = {k: v.half() for k, v in model.state_dict().items()}
        tower_only = eva_vision_from_state_dict(half, "eva_fp16.safetensors", TINY_EVA)
        assert next(tower_only.model.parameters()).dtype == torch.float32
        torch.testing.assert_close(tower_only(x)[0], model(x)[0], atol=2e-2, rtol=2e-2)

    with pytest.raises(CheckpointLayoutError, match="clip_l.safetensors is not an EVA-CLIP visual tower"):
        eva_vision_from_state_dict({"text_model.embeddings.x": torch.zeros(2)}, "clip_l.safetensors", TINY_EVA)
    state = eva_clip_file_layout(model)
    state["visual.head.weight"] = torch.zeros(7, 32)
    with pytest.raises(CheckpointLayoutError, match="'head.weight' has shape"):
        eva_vision_from_state_dict(state, "eva.pt", TINY_EVA)
    state = eva_clip_file_layout(model)
    state["visual.blocks.0.attn.k_bias"] = state.pop("visual.blocks.0.attn.v_bias")   # another EVA variant
    with pytest.raises(CheckpointLayoutError) as refused:
        eva_vision_from_state_dict(state, "eva.pt", TINY_EVA)
    assert "'blocks.0.attn.v_bias' missing" in str(refused.value)
    assert "unexpected key 'blocks.0.attn.k_bias'" in str(refused.value)
    broken = tmp_path / "EVA02_CLIP_L_336_psz14_s6B.pt"
    broken.write_bytes(b"not a zip file at all")
    with pytest.raises(ModelFileError, match="EVA02_CLIP_L_336_psz14_s6B.pt"):
        load_eva_clip(str(broken), TINY_EVA)
    with pytest.raises(InvalidInputError, match="EVA-CLIP takes 28x28 pixels"):
        loaded(torch.zeros(1, 3, 32, 32))


# --------------------------------------------------------------------------------------------------------------
# The reference-image pipeline on tiny models

@pytest.fixture
def antelope(models_root):
    from likeness.face_analysis.analyzers import insightface_backend
    from onnx_face_models import write_tiny_insightface_pack

    write_tiny_insightface_pack(os.path.join(models_root, "insightface", "models", "antelopev2"))
    return insightface_backend.load_insightface("antelopev2", "CPU")


def face_image(x: int = 320, y: int = 192) -> torch.Tensor:
    from onnx_face_models import square_image

    return torch.from_numpy(square_image(x=x, y=y, side=64)).float().unsqueeze(0) / 255.0


@pytest.fixture(scope="module")
def tiny_models():
    pulid = tiny_pulid(seed=2, count=4, encoder=EMBED_ENCODER, ca=TINY_CA)
    eva = eva_vision_from_state_dict(eva_clip_file_layout(seeded_(build_eva_vision(TINY_EVA), 5, 0.05)), "tiny-eva",
                                     TINY_EVA)
    return pulid, eva


def test_embed_faces_follows_the_official_steps(antelope, tiny_models):
    from likeness.face_analysis.analyze import analyze
    from likeness.face_analysis.parsing import landmark_parser
    from likeness.techniques.pulid_flux.encode import WHITE_LABELS, embed_faces, face_feature_images, id_tokens

    pulid, eva = tiny_models
    parser = landmark_parser()
    images = torch.cat([face_image(), face_image(x=128, y=96)])
    embeds = embed_faces(images, antelope, parser, eva, pulid)
    assert isinstance(embeds, PulidFluxEmbeds)
    assert embeds.tokens.shape == (1, EMBED_ENCODER.num_queries, EMBED_ENCODER.output_dim)
    assert embeds.encoder == "tiny" and embeds.sources[-1] == "mean of 2 faces"

    # the same steps by hand: raw antelopev2 vectors, grey-on-white aligned faces, EVA, IDFormer, mean
    analysis = analyze(antelope, images, embed=True).faces
    arcface = torch.from_numpy(np.stack([f.embedding for faces in analysis.faces for f in faces]))
    faces = face_feature_images(images, analysis, parser)
    assert faces.shape == (2, 3, 512, 512)
    assert float(faces.min()) >= 0.0 and float(faces.max()) <= 1.0
    assert torch.equal(faces[:, 0], faces[:, 1]) and torch.equal(faces[:, 1], faces[:, 2])   # grey
    assert float((faces == 1.0).float().mean()) > 0.1   # background and neck turned white
    assert 0 in WHITE_LABELS and 1 not in WHITE_LABELS   # skin stays
    tokens, uncond = id_tokens(pulid, eva, arcface, faces)
    torch.testing.assert_close(embeds.tokens, tokens.mean(0, keepdim=True))
    with torch.no_grad():
        zeros = pulid.encoder(torch.zeros(1, EMBED_ENCODER.id_dim), [torch.zeros(1, 5, 32)] * 5)
    torch.testing.assert_close(embeds.uncond_tokens, zeros)
    assert not torch.allclose(embeds.tokens, zeros)


def test_no_face_is_a_clear_error(antelope, tiny_models):
    from likeness.face_analysis.parsing import landmark_parser
    from likeness.techniques.pulid_flux.encode import embed_faces

    pulid, eva = tiny_models
    with pytest.raises(NoFaceError, match="PuLID-FLUX needs a visible face"):
        embed_faces(torch.zeros(1, 480, 640, 3), antelope, landmark_parser(), eva, pulid)
    with pytest.raises(InvalidInputError, match="EVA-CLIP Loader"):
        embed_faces(face_image(), antelope, landmark_parser(), object(), pulid)


# --------------------------------------------------------------------------------------------------------------
# Embeds files

def test_embeds_round_trip_and_refused_files(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    embeds = PulidFluxEmbeds(torch.randn(1, 4, 24, generator=g), torch.randn(1, 4, 24, generator=g),
                             "pulid_flux_v0.9.1.safetensors", ["image 0"])
    path = save_pulid_embeds(embeds, str(tmp_path / "alice.safetensors"))
    loaded = load_pulid_embeds(path)
    assert torch.equal(loaded.tokens, embeds.tokens) and torch.equal(loaded.uncond_tokens, embeds.uncond_tokens)
    assert loaded.encoder == embeds.encoder and loaded.sources == ["image 0"]

    other = tmp_path / "face_embeds.safetensors"
    save_file({"embeddings": torch.zeros(1, 512)}, str(other), {"format": "likeness.face_embeds"})
    with pytest.raises(ModelFileError, match="face_embeds.safetensors is not a Likeness PuLID-FLUX embeds file"):
        load_pulid_embeds(str(other))
    with pytest.raises(InvalidInputError, match="tokens \\[1, T, C\\]"):
        PulidFluxEmbeds(torch.zeros(4, 24), torch.zeros(4, 24), "x")
    with pytest.raises(InvalidInputError, match="NaN"):
        PulidFluxEmbeds(torch.full((1, 2, 3), float("nan")), torch.zeros(1, 2, 3), "x")


def test_eva_inputs_are_the_official_resize_and_normalisation():
    """``resize(img, 336, BICUBIC)`` (antialiased for tensors) + ``normalize(OpenAI mean/std)`` as
    pipeline_flux.get_id_embedding calls them: size, exact normalisation of flat colours, and a 1 px checkerboard
    averaged away (a resize without antialiasing keeps most of its contrast)."""
    from likeness.techniques.pulid_flux.encode import eva_inputs
    from likeness.techniques.pulid_flux.eva_clip import OPENAI_MEAN, OPENAI_STD, EvaClipVision

    with torch.device("meta"):
        eva = EvaClipVision(build_eva_vision(replace(TINY_EVA, image_size=336)), "tiny")
    colours = torch.tensor([[0.2, 0.5, 0.9], [1.0, 0.0, 0.3]]).view(2, 3, 1, 1)
    pixels = eva_inputs(colours.expand(2, 3, 512, 512), eva)
    assert pixels.shape == (2, 3, 336, 336)
    expected = (colours - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, expected.expand_as(pixels), atol=1e-5, rtol=1e-5)

    checker = ((torch.arange(512)[:, None] + torch.arange(512)[None, :]) % 2).float().expand(1, 3, 512, 512)
    shrunk = eva_inputs(checker, eva)[0, 0] * OPENAI_STD[0] + OPENAI_MEAN[0]
    inner = shrunk[8:-8, 8:-8]
    assert abs(float(inner.mean()) - 0.5) < 0.02 and float(inner.std()) < 0.15
