"""The PuLID-FLUX nodes, driven through their real classes with tiny models in a temporary models folder:
loaders (file lists, missing files), Embed (no face = a clear error), Save / Load embeds, Apply on a tiny FLUX.1
(weight 0 = unpatched, two chained people with masks, a UNet refused)."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from pulid_support import EMBED_ENCODER, TINY_CA, TINY_EVA, seeded_, tiny_pulid
from test_attention_dit_host import _call

pytestmark = pytest.mark.host


@pytest.fixture
def pulid_files(models_root, monkeypatch):
    """models/pulid/pulid_tiny.safetensors, models/clip_vision/eva_tiny.pt, an antelopev2-named tiny insightface
    pack; the EVA loader builds the tiny tower (the release config is swapped for the tiny one)."""
    from likeness.face_analysis.analyzers import insightface_backend
    from likeness.techniques.pulid_flux import checkpoint, eva_clip
    from onnx_face_models import write_tiny_insightface_pack

    os.makedirs(os.path.join(models_root, "pulid"))
    save_file(checkpoint.state_dict_of(tiny_pulid(seed=2, count=4, encoder=EMBED_ENCODER, ca=TINY_CA)),
              os.path.join(models_root, "pulid", "pulid_tiny.safetensors"))
    os.makedirs(os.path.join(models_root, "clip_vision"))
    eva = seeded_(eva_clip.build_eva_vision(TINY_EVA), 5, 0.05)
    torch.save({f"visual.{k}": v for k, v in eva.state_dict().items()},
               os.path.join(models_root, "clip_vision", "eva_tiny.pt"))
    monkeypatch.setattr(eva_clip, "EVA02_L_336", TINY_EVA)
    write_tiny_insightface_pack(os.path.join(models_root, "insightface", "models", "antelopev2"))
    return insightface_backend.load_insightface("antelopev2", "CPU")


def face_photo(x: int = 320, y: int = 192) -> torch.Tensor:
    from onnx_face_models import square_image

    return torch.from_numpy(square_image(x=x, y=y, side=64)).float().unsqueeze(0) / 255.0


def loaded(pulid_files):
    from likeness.face_analysis.parsing import landmark_parser
    from likeness.nodes.pulid_flux import EvaClipLoader, PulidFluxLoader

    assert PulidFluxLoader.INPUT_TYPES()["required"]["pulid_file"][0] == ["pulid_tiny.safetensors"]
    assert EvaClipLoader.INPUT_TYPES()["required"]["eva_file"][0] == ["eva_tiny.pt"]
    assert PulidFluxLoader.VALIDATE_INPUTS("pulid_tiny.safetensors") is True
    (pulid,) = PulidFluxLoader().load("pulid_tiny.safetensors")
    (eva,) = EvaClipLoader().load("eva_tiny.pt")
    return pulid, eva, pulid_files, landmark_parser()


def test_loaders_embed_save_load_and_two_people(tiny_flux, pulid_files, models_root):
    from likeness.attention_patches import find_patch
    from likeness.nodes.pulid_flux import (
        ApplyPulidFlux,
        LoadPulidFluxEmbeds,
        PulidFluxEmbed,
        SavePulidFluxEmbeds,
    )

    pulid, eva, analyzer, parser = loaded(pulid_files)
    assert len(pulid.cross_attentions) == 4 and eva.image_size == 28
    (alice,) = PulidFluxEmbed().embed(pulid, eva, analyzer, parser, face_photo(), "largest", 0)
    (bob,) = PulidFluxEmbed().embed(pulid, eva, analyzer, parser, face_photo(x=96, y=64), "largest", 0)
    assert alice.tokens.shape == (1, EMBED_ENCODER.num_queries, EMBED_ENCODER.output_dim)
    assert alice.encoder == "pulid_tiny.safetensors"

    saved = SavePulidFluxEmbeds().save(alice, "alice", False)
    path = saved["result"][0]
    assert path == os.path.join(models_root, "likeness", "pulid_embeds", "alice.safetensors")
    assert LoadPulidFluxEmbeds.INPUT_TYPES()["required"]["file"][0] == ["alice.safetensors"]
    (reloaded,) = LoadPulidFluxEmbeds().load("alice.safetensors")
    assert torch.equal(reloaded.tokens, alice.tokens)

    other = type(reloaded)(reloaded.tokens, reloaded.uncond_tokens, "pulid_flux_v0.9.0.safetensors")
    shown = ApplyPulidFlux().apply(tiny_flux, pulid, other, 1.0, 0.0, 1.0, "none")
    assert "made with pulid_flux_v0.9.0.safetensors" in shown["ui"]["text"][0]

    reference = _call(tiny_flux)
    (off,) = ApplyPulidFlux().apply(tiny_flux, pulid, reloaded, 0.0, 0.0, 1.0, "zero ID (official true CFG)")
    assert torch.equal(_call(off), reference)

    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1.0
    (one,) = ApplyPulidFlux().apply(tiny_flux, pulid, reloaded, 1.0, 0.0, 1.0, "none", mask=left)
    (two,) = ApplyPulidFlux().apply(one, pulid, bob, 1.0, 0.0, 1.0, "none", mask=1.0 - left)
    assert [i.name for i in find_patch(two).injectors] == ["pulid_flux", "pulid_flux#2"]
    assert find_patch(one) is not find_patch(two) and len(find_patch(one).injectors) == 1
    with_one, with_two = _call(one), _call(two)
    assert not torch.allclose(with_one, reference) and not torch.allclose(with_two, with_one)


def test_bad_inputs_are_clear_messages(tiny_flux, tiny_sd15, pulid_files):
    from likeness.errors import InvalidInputError, ModelFileError, NoFaceError, UnsupportedModelError
    from likeness.nodes.pulid_flux import (
        NO_EMBEDS,
        ApplyPulidFlux,
        LoadPulidFluxEmbeds,
        PulidFluxEmbed,
        PulidFluxLoader,
    )

    pulid, eva, analyzer, parser = loaded(pulid_files)
    with pytest.raises(NoFaceError, match="PuLID-FLUX needs a visible face"):
        PulidFluxEmbed().embed(pulid, eva, analyzer, parser, torch.zeros(1, 480, 640, 3), "largest", 0)
    with pytest.raises(InvalidInputError, match="analyzer"):
        PulidFluxEmbed().embed(pulid, eva, object(), parser, face_photo(), "largest", 0)
    with pytest.raises(InvalidInputError, match="'image'"):
        PulidFluxEmbed().embed(pulid, eva, analyzer, parser, torch.full((1, 8, 8, 3), 2.0), "largest", 0)
    missing = PulidFluxLoader.VALIDATE_INPUTS("pulid_flux_v0.9.1.safetensors")
    assert isinstance(missing, str) and "models/pulid" in missing
    with pytest.raises(ModelFileError, match="pulid_embeds"):
        LoadPulidFluxEmbeds().load(NO_EMBEDS)
    (embeds,) = PulidFluxEmbed().embed(pulid, eva, analyzer, parser, face_photo(), "largest", 0)
    with pytest.raises(UnsupportedModelError, match="UNet"):
        ApplyPulidFlux().apply(tiny_sd15, pulid, embeds, 1.0, 0.0, 1.0, "none")
    with pytest.raises(InvalidInputError, match="embeds"):
        ApplyPulidFlux().apply(tiny_flux, pulid, torch.zeros(1, 4, 24), 1.0, 0.0, 1.0, "none")
    with pytest.raises(InvalidInputError, match="'mask'"):
        ApplyPulidFlux().apply(tiny_flux, pulid, embeds, 1.0, 0.0, 1.0, "none", mask=torch.full((1, 8, 8), 3.0))


def test_embed_chain_in_the_real_executor(execute_prompt, host_env, pack_loaded, monkeypatch):
    """Load Image -> insightface (antelopev2) + landmark parser + PuLID-FLUX / EVA-CLIP loaders -> Embed -> Save, in
    ComfyUI's own executor with the files in its models folder; the saved file loads back."""
    import importlib

    import numpy as np
    from PIL import Image

    from likeness.techniques.pulid_flux import checkpoint, eva_clip
    from likeness.techniques.pulid_flux.embeds import load_pulid_embeds
    from onnx_face_models import square_image, write_tiny_insightface_pack

    models = host_env.models
    os.makedirs(os.path.join(models, "pulid"), exist_ok=True)
    save_file(checkpoint.state_dict_of(tiny_pulid(seed=2, count=4, encoder=EMBED_ENCODER, ca=TINY_CA)),
              os.path.join(models, "pulid", "pulid_tiny_exec.safetensors"))
    os.makedirs(os.path.join(models, "clip_vision"), exist_ok=True)
    eva = seeded_(eva_clip.build_eva_vision(TINY_EVA), 5, 0.05)
    torch.save({f"visual.{k}": v for k, v in eva.state_dict().items()},
               os.path.join(models, "clip_vision", "eva_tiny_exec.pt"))
    write_tiny_insightface_pack(os.path.join(models, "insightface", "models", "antelopev2"))
    # the executor runs the pack as ComfyUI imported it: swap the release EVA config for the tiny one there
    hosted = importlib.import_module(f"{pack_loaded.__name__}.techniques.pulid_flux.eva_clip")
    monkeypatch.setattr(hosted, "EVA02_L_336", TINY_EVA)
    Image.fromarray(square_image(x=320, y=192, side=64)).save(os.path.join(host_env.input, "pulid_face.png"))
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "pulid_face.png"}},
        "2": {"class_type": "LikenessInsightFaceLoader", "inputs": {
            "pack": "antelopev2", "provider": "auto", "landmarks": "106", "det_size": 640, "det_threshold": 0.5}},
        "3": {"class_type": "LikenessFaceParserLoader", "inputs": {"parser": "landmarks (no weights)",
                                                                   "device": "auto"}},
        "4": {"class_type": "LikenessPulidFluxLoader", "inputs": {"pulid_file": "pulid_tiny_exec.safetensors"}},
        "5": {"class_type": "LikenessEvaClipLoader", "inputs": {"eva_file": "eva_tiny_exec.pt"}},
        "6": {"class_type": "LikenessPulidFluxEmbed", "inputs": {
            "pulid_flux": ["4", 0], "eva_clip": ["5", 0], "analyzer": ["2", 0], "face_parser": ["3", 0],
            "image": ["1", 0], "selection": "largest", "face_index": 0}},
        "7": {"class_type": "LikenessSavePulidFluxEmbeds", "inputs": {"embeds": ["6", 0], "name": "exec_person",
                                                                      "overwrite": True}},
    }
    outputs = execute_prompt(prompt)
    (path,) = outputs["7"]["text"]
    assert path == os.path.join(models, "likeness", "pulid_embeds", "exec_person.safetensors")
    embeds = load_pulid_embeds(path)
    assert embeds.tokens.shape == (1, EMBED_ENCODER.num_queries, EMBED_ENCODER.output_dim)
    assert embeds.encoder == "pulid_tiny_exec.safetensors" and np.isfinite(embeds.tokens.numpy()).all()
