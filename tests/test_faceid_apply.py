"""Host: a scaled-down FaceID-Plus checkpoint applied to the tiny SD1.5 through the engine (LoRA + ID branch)."""
from __future__ import annotations

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


def _sample(model, seed=0):
    import comfy.sample

    from host_support import conditioning

    latent = torch.zeros(1, 4, 16, 16)
    with torch.inference_mode():
        return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), 2, 5.0, "euler", "normal",
                                   conditioning(seed=1), conditioning(seed=2), latent, seed=seed,
                                   disable_pbar=True)


@pytest.fixture
def tiny_plus(tiny_sd15, tiny_clip_vision):
    from likeness.techniques.faceid.checkpoint import load_faceid_state_dict
    from likeness.techniques.faceid.lora import transformer_blocks

    channels = [r.channels for r in transformer_blocks(tiny_sd15)]
    hidden = host_support.clip_vision_width(tiny_clip_vision)
    groups = random_faceid_checkpoint(channels, 64, clip_dim=hidden, rank=4)
    return load_faceid_state_dict(groups, source="tiny-faceid-plusv2.bin")


def test_id_tokens_and_adapter_change_the_output_and_zero_restores_it(tiny_sd15, tiny_clip_vision, tiny_plus):
    from likeness.techniques.faceid.apply import apply_faceid_adapter, clip_hidden_states, encode_id_tokens

    assert tiny_plus.shortcut                                          # "plusv2" in the name
    image = torch.rand(1, 48, 40, 3, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        clip = clip_hidden_states(tiny_clip_vision, image)
        zero = clip_hidden_states(tiny_clip_vision, None)
        arcface = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(4)), dim=-1)
        tokens = encode_id_tokens(tiny_plus, arcface, clip, zero)
    assert tokens.cond.shape == tokens.uncond.shape == (1, 4, 64)
    assert not torch.allclose(tokens.cond, tokens.uncond)

    base = _sample(tiny_sd15)
    lora_only = _sample(apply_faceid_adapter(tiny_sd15, tiny_plus, tokens, weight=0.0, lora_strength=1.0))
    id_only = _sample(apply_faceid_adapter(tiny_sd15, tiny_plus, tokens, weight=1.0, lora_strength=0.0))
    off = _sample(apply_faceid_adapter(tiny_sd15, tiny_plus, tokens, weight=0.0, lora_strength=0.0))
    for changed in (lora_only, id_only):
        assert (changed - base).abs().max() > 1e-4
    assert torch.equal(off, base)
    assert torch.equal(_sample(tiny_sd15), base)                       # the input model was never modified


def test_applied_twice_both_id_branches_act(tiny_sd15, tiny_clip_vision, tiny_plus):
    from likeness.attention_patches import find_patch
    from likeness.techniques.faceid.apply import apply_faceid_adapter, clip_hidden_states, encode_id_tokens

    with torch.inference_mode():
        arcface = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(4)), dim=-1)
        clip = clip_hidden_states(tiny_clip_vision, torch.rand(1, 48, 40, 3, generator=torch.Generator().manual_seed(3)))
        tokens = encode_id_tokens(tiny_plus, arcface, clip, clip_hidden_states(tiny_clip_vision, None))
    once = apply_faceid_adapter(tiny_sd15, tiny_plus, tokens, weight=1.0, lora_strength=0.0)
    twice = apply_faceid_adapter(once, tiny_plus, tokens, weight=1.0, lora_strength=0.0)
    names = [i.name for i in find_patch(twice).injectors]
    assert len(names) == 2 and names[1] == names[0] + "#2"
    double = apply_faceid_adapter(tiny_sd15, tiny_plus, tokens, weight=2.0, lora_strength=0.0)
    out_twice, out_double = _sample(twice), _sample(double)
    scale = float(out_double.abs().max())
    assert (out_twice - out_double).abs().max() <= 1e-5 * scale        # two decoupled branches add up (float order)
    assert (out_twice - _sample(once)).abs().max() > 1e-3 * scale


def test_apply_node_and_identity_mixing(tiny_sd15, tiny_clip_vision, tiny_plus):
    from likeness.nodes.faceid import FaceIDApply
    from likeness.techniques.faceid.references import faceid_tokens
    from test_consistentid_encode import fake_faces

    images = torch.rand(2, 96, 96, 3, generator=torch.Generator().manual_seed(7))
    faces = fake_faces(batch=2)
    with torch.inference_mode():
        single = faceid_tokens(tiny_plus, images[:1], fake_faces(batch=1), tiny_clip_vision, 1.0)
        mixed_10 = faceid_tokens(tiny_plus, images, faces, tiny_clip_vision, 1.0, "1, 0")
        mixed = faceid_tokens(tiny_plus, images, faces, tiny_clip_vision, 1.0, "0.5, 0.5")
        (model,) = FaceIDApply().apply(tiny_sd15, tiny_plus, images, faces, 1.0, 1.0, 1.0, 0.0, 1.0,
                                       clip_vision=tiny_clip_vision)
    assert torch.equal(mixed_10.cond, single.cond) and torch.equal(mixed_10.uncond, single.uncond)
    assert not torch.allclose(mixed.cond, single.cond)
    assert (_sample(model) - _sample(tiny_sd15)).abs().max() > 1e-4
