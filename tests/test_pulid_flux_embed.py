"""PuLID-FLUX's ID embedding: the EVA02-CLIP tower (timm, loaded from EVA-CLIP's own file layout) computes what the
official EVA-CLIP code computes; the reference-image pipeline (analyzer, alignment, parsing, EVA, IDFormer) on tiny
models; the embeds' safetensors files."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from likeness.errors import CheckpointLayoutError, InvalidInputError, ModelFileError, NoFaceError
from likeness.techniques.pulid_flux.embeds import PulidFluxEmbeds, load_pulid_embeds, save_pulid_embeds
from likeness.techniques.pulid_flux.eva_clip import (
    EVA02_L_336,
    build_eva_vision,
    eva_vision_from_state_dict,
    load_eva_clip,
)
from pulid_support import EMBED_ENCODER, TINY_CA, TINY_EVA, official_eva_vit, official_tiny_eva, seeded_, tiny_pulid

needs_official_eva = pytest.mark.skipif(official_eva_vit() is None, reason="official PuLID eva_clip code not fetched")


def eva_clip_file_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A whole-CLIP state dict as EVA02_CLIP_L_336_psz14_s6B.pt stores it: ``visual.*`` plus the text tower."""
    state = {f"visual.{k}": v.clone() for k, v in model.state_dict().items()}
    state["text.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(6, 2)
    state["logit_scale"] = torch.tensor(1.0)
    return state


# --------------------------------------------------------------------------------------------------------------
# EVA02-CLIP

@needs_official_eva
def test_eva_tower_matches_the_official_eva_clip_code_through_the_file(tmp_path):
    official = official_tiny_eva(seed=3)
    path = tmp_path / "EVA02_CLIP_L_336_psz14_s6B.pt"
    torch.save(eva_clip_file_layout(official), str(path))
    ours = load_eva_clip(str(path), TINY_EVA)
    assert ours.image_size == 28 and ours.name == path.name
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, expected_hidden = official(x, return_all_features=False, return_hidden=True, shuffle=False)
        pooled, hidden = ours(x)
    torch.testing.assert_close(pooled, expected, atol=1e-4, rtol=1e-4)
    assert len(hidden) == len(expected_hidden) == 5
    for mine, theirs in zip(hidden, expected_hidden, strict=True):
        assert mine.shape == (2, 5, 32)   # CLS + 2x2 patches
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    assert float(expected.abs().max()) > 1e-2   # seeded weights: the comparison is not of near-zero outputs


def test_eva_release_config_builds_the_eva02_l_336_shapes():
    with torch.device("meta"):
        model = build_eva_vision(EVA02_L_336)
    state = model.state_dict()
    assert state["pos_embed"].shape == (1, 577, 1024) and state["head.weight"].shape == (768, 1024)
    assert sum(1 for k in state if k.endswith("attn.q_proj.weight")) == 24


def test_eva_safetensors_copy_and_refused_files(tmp_path):
    from safetensors.torch import save_file

    model = seeded_(build_eva_vision(TINY_EVA), 1, std=0.05)
    path = tmp_path / "eva.safetensors"
    save_file({k: v.contiguous() for k, v in eva_clip_file_layout(model).items()}, str(path))
    loaded = load_eva_clip(str(path), TINY_EVA)
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x))

    with pytest.raises(CheckpointLayoutError, match="clip_l.safetensors is not an EVA-CLIP visual tower"):
        eva_vision_from_state_dict({"text_model.embeddings.x": torch.zeros(2)}, "clip_l.safetensors", TINY_EVA)
    state = eva_clip_file_layout(model)
    state["visual.head.weight"] = torch.zeros(7, 32)
    with pytest.raises(CheckpointLayoutError, match="'head.weight' has shape"):
        eva_vision_from_state_dict(state, "eva.pt", TINY_EVA)
    broken = tmp_path / "EVA02_CLIP_L_336_psz14_s6B.pt"
    broken.write_bytes(b"not a zip file at all")
    with pytest.raises(ModelFileError, match="EVA02_CLIP_L_336_psz14_s6B.pt"):
        load_eva_clip(str(broken), TINY_EVA)


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
    """``resize(img, 336, BICUBIC)`` + ``normalize(OpenAI mean/std)`` as pipeline_flux.get_id_embedding calls them."""
    functional = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    from likeness.techniques.pulid_flux.encode import eva_inputs
    from likeness.techniques.pulid_flux.eva_clip import OPENAI_MEAN, OPENAI_STD, EvaClipVision

    eva = EvaClipVision(build_eva_vision(dict(TINY_EVA, img_size=336, depth=21)), "tiny")
    faces = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    expected = functional.normalize(functional.resize(faces, 336, InterpolationMode.BICUBIC), OPENAI_MEAN, OPENAI_STD)
    torch.testing.assert_close(eva_inputs(faces, eva), expected, atol=1e-5, rtol=1e-5)


def test_without_timm_the_eva_loader_says_what_to_install(monkeypatch):
    import sys

    from likeness.deps import MissingDependencyError

    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(MissingDependencyError, match="pip install timm"):
        build_eva_vision(TINY_EVA)
