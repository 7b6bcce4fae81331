"""ConsistentID encode end to end on tiny SD1.5-shaped models (host): a scaled-down ConsistentID of the same
architecture with random weights, the real SD1 tokenizer, tiny CLIP vision, the landmark face parser."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import host_support
from faceid_support import random_faceid_checkpoint

pytestmark = pytest.mark.host


@pytest.fixture(autouse=True)
def _unload_patched_models():
    """Sampling leaves the patched model loaded (weights patched in place on CPU); unload it so the shared tiny
    models are clean for the next test."""
    yield
    import comfy.model_management

    comfy.model_management.unload_all_models()


def fake_faces(batch: int = 1, seed: int = 0):
    """FACES for a 96x96 image: one face with keypoints, box and a buffalo_l-sized embedding."""
    from likeness.face_analysis.types import Face, FaceAnalysis

    rng = np.random.default_rng(seed)
    kps = np.array([[36, 42], [60, 42], [48, 54], [39, 66], [57, 66]], dtype=np.float32)
    faces = [[Face(bbox=np.array([24, 24, 72, 80], dtype=np.float32), score=0.99, kps=kps, image_index=i,
                   embedding=rng.standard_normal(512).astype(np.float32))] for i in range(batch)]
    return FaceAnalysis(faces, [(96, 96)] * batch, "insightface", "insightface:buffalo_l/w600k_r50", 512)


@pytest.fixture
def tiny_consistentid(tiny_sd15, tiny_clip_vision):
    from likeness.techniques.consistentid.loader import load_consistentid_state_dict
    from likeness.techniques.faceid.lora import transformer_blocks

    channels = [r.channels for r in transformer_blocks(tiny_sd15)]
    hidden = host_support.clip_vision_width(tiny_clip_vision)
    groups = random_faceid_checkpoint(channels, 64, clip_dim=hidden, rank=4, facial_encoder=True)
    return load_consistentid_state_dict(groups, source="tiny-consistentid.bin")


def _sample(model, positive, negative, seed=0, wrapper=None, steps=2):
    import comfy.sample

    if wrapper is not None:
        model = model.clone()
        model.set_model_unet_function_wrapper(wrapper)
    latent = torch.zeros(1, 4, 16, 16)
    with torch.inference_mode():
        return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), steps, 5.0, "euler", "normal",
                                   positive, negative, latent, seed=seed, disable_pbar=True)


def _encode(node_inputs, **overrides):
    from likeness.nodes.consistentid import ConsistentIDEncode

    with torch.inference_mode():
        return ConsistentIDEncode().encode(**{**node_inputs, **overrides})


@pytest.fixture
def node_inputs(tiny_sd15, tiny_clip, tiny_clip_vision, tiny_consistentid):
    from likeness.face_analysis.parsing.parser import landmark_parser

    image = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(5))
    return dict(model=tiny_sd15, clip=tiny_clip, clip_vision=tiny_clip_vision, consistentid=tiny_consistentid,
                image=image, faces=fake_faces(), parser=landmark_parser(), prompt="a photo of a woman",
                negative="blurry", id_weight=1.0, merge_at=0.5, lora_strength=1.0)


def test_encode_fuses_only_the_feature_words_and_splits_the_schedule(node_inputs, tiny_clip):
    model, positive, negative, text = _encode(node_inputs)
    assert "Detail:" in text and text.count("<|facial|>") >= 3
    (plain, plain_opts), (fused, fused_opts) = positive
    assert (plain_opts["start_percent"], plain_opts["end_percent"]) == (0.0, 0.5)
    assert (fused_opts["start_percent"], fused_opts["end_percent"]) == (0.5, 1.0)
    assert plain.shape == fused.shape == (1, 77, 64)
    changed = (plain - fused).abs().amax(dim=-1)[0].nonzero().flatten().tolist()
    from likeness.techniques.consistentid.tokens import tokenize_facial_prompt

    assert changed == tokenize_facial_prompt(tiny_clip, text).flat_positions    # only the feature words
    assert negative[0][0].shape == (1, 77, 64)


def test_merge_step_plain_before_fused_after(node_inputs):
    """A counting wrapper: which positive context the UNet saw at each step."""
    model, positive, negative, _ = _encode(node_inputs)
    plain, fused = positive[0][0], positive[1][0]
    seen = []

    def wrapper(apply_model, args):
        context = args["c"]["c_crossattn"]
        for chunk, kind in enumerate(args["cond_or_uncond"]):
            if kind == 0:
                rows = context.shape[0] // len(args["cond_or_uncond"])
                ctx = context[chunk * rows:(chunk + 1) * rows][:1, :77].cpu()
                seen.append("plain" if torch.allclose(ctx, plain) else "fused" if torch.allclose(ctx, fused) else "?")
        return apply_model(args["input"], args["timestep"], **args["c"])

    _sample(model, positive, negative, wrapper=wrapper, steps=4)
    assert seen == ["plain", "plain", "fused", "fused"]


def test_adapter_changes_output_and_zero_restores_it(node_inputs, tiny_sd15):
    model, positive, negative, _ = _encode(node_inputs)
    base = _sample(tiny_sd15, positive, negative)
    assert (_sample(model, positive, negative) - base).abs().max() > 1e-4
    off, *_ = _encode(node_inputs, id_weight=0.0, lora_strength=0.0)
    assert torch.equal(_sample(off, positive, negative), base)


def test_no_face_means_plain_prompt(node_inputs):
    from likeness.face_analysis.types import FaceAnalysis

    empty = FaceAnalysis([[]], [(96, 96)], "insightface", "insightface:buffalo_l/w600k_r50", 512)
    with pytest.raises(Exception, match="no identity embedding"):
        _encode(node_inputs, faces=empty)
