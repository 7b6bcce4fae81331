"""ConsistentID trainer on the real host: tiny SD1.5 + a scaled-down ConsistentID of the same architecture (random
weights) + real face photos (skimage's astronaut, the faces of insightface's t1.jpg), dlib for detection and
keypoints, the landmark face parser for the regions. Everything is built under inference mode, as ComfyUI's loader
nodes build it, so the trainer has to escape inference mode like in a real graph.

dlib's identity descriptor is 128-d; ConsistentID's projector takes 512-d buffalo_l vectors, so the test analyzer
projects dlib's descriptor to 512-d with a fixed random matrix (an identity signal of the right width).
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import host_support
from faceid_support import random_faceid_checkpoint

pytestmark = pytest.mark.host
logger = logging.getLogger(__name__)

LEARN = dict(steps=40, lr=3e-2, batch_size=2, seed=0, checkpoint_every=0, resolution=128)


@pytest.fixture(scope="module")
def one_thread():
    """The 2 shared cores are oversubscribed by parallel jobs; 2 torch threads then run ~10x slower than 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Projected512Analyzer:
    """dlib (HOG + 5 points) whose 128-d descriptor is projected to 512-d; reports itself as a 512-d analyzer."""

    embedding_dim = 512
    model_id = "test:dlib-resnet-projected-512"

    def __init__(self, inner):
        self.inner = inner
        self.projection = np.random.default_rng(0).standard_normal((512, 128)).astype(np.float32)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed(self, image, faces):
        return [replace(f, embedding=self.projection @ np.asarray(f.embedding, np.float32))
                for f in self.inner.embed(image, faces)]


def analyzer():
    pytest.importorskip("dlib")
    from likeness.face_analysis.analyzers.dlib_backend import load_dlib

    return Projected512Analyzer(load_dlib("HOG", "5"))


def face_photos():
    """(name, image [H, W, 3], caption): skimage's astronaut and face crops of insightface's t1.jpg."""
    from face_fixtures import astronaut, insightface_t1
    from likeness.face_analysis.analyze import analyze

    sources = [("astronaut", torch.from_numpy(astronaut()).float() / 255, "a photo of a woman astronaut")]
    group = torch.from_numpy(insightface_t1()).float() / 255
    found = analyze(analyzer(), group[None], selection="largest", on_no_face="pass_through", embed=False)
    height, width = group.shape[:2]
    for i, face in enumerate(found.detections[0][:5]):
        x1, y1, x2, y2 = (float(v) for v in face.bbox)
        cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * 1.2
        top, left = int(max(0, cy - half)), int(max(0, cx - half))
        crop = group[top:int(min(height, cy + half)), left:int(min(width, cx + half))]
        sources.append((f"t1_face{i}", crop, "a photo of a person"))
    return sources


def tiny_consistentid(model, clip_vision, seed: int = 0):
    """A scaled-down ConsistentID for ``model`` (random weights), loaded like the loader node does."""
    from likeness.techniques.consistentid.loader import load_consistentid_state_dict
    from likeness.techniques.faceid.lora import transformer_blocks

    channels = [r.channels for r in transformer_blocks(model)]
    hidden = host_support.clip_vision_width(clip_vision)
    groups = random_faceid_checkpoint(channels, 64, clip_dim=hidden, rank=4, facial_encoder=True, seed=seed)
    return groups, load_consistentid_state_dict(groups, source="tiny-consistentid.bin")


@pytest.fixture(scope="module")
def setup(comfy_ready, one_thread):
    import comfy.supported_models

    import host_support
    from likeness.face_analysis.parsing import landmark_parser
    from likeness.techniques.consistentid import training as T

    settings = T.ConsistentIDTrainSettings(**LEARN)
    with torch.inference_mode():
        model = host_support._patcher(comfy.supported_models.SD15, host_support.sd15_unet_config(), 3)
        host_support.init_weights(model.model.diffusion_model, 3, fan_in_gain=1.0)
        vae, clip = host_support.build_tiny_vae(), host_support.build_tiny_clip()
        clip_vision = host_support.build_tiny_clip_vision()
        groups, start = tiny_consistentid(model, clip_vision)
        data = T.prepare_training_data(model, vae, clip, clip_vision, analyzer(), landmark_parser(), face_photos(),
                                       settings)
    assert next(model.model.diffusion_model.parameters()).is_inference()
    return dict(model=model, vae=vae, clip=clip, clip_vision=clip_vision, start=start, groups=groups, data=data,
                settings=settings)


@pytest.fixture(autouse=True)
def _unload_models():
    yield
    import comfy.model_management

    comfy.model_management.unload_all_models()


def _settings(**kw):
    from likeness.techniques.consistentid.training import ConsistentIDTrainSettings

    return ConsistentIDTrainSettings(**{**LEARN, **kw})


def _weights(setup):
    from likeness.techniques.consistentid.training import ConsistentIDWeights

    return ConsistentIDWeights.from_checkpoint(setup["start"])


def test_examples_carry_regions_tokens_and_masks(setup):
    data = setup["data"]
    assert len(data) == 6 and data.latents.shape == (6, 4, 16, 16)
    assert data.arcfaces.norm(dim=1).min() > 0.99                     # every photo has a face and an identity
    for text, regions, positions, masks, states in zip(data.texts, data.regions, data.positions, data.region_masks,
                                                       data.region_states, strict=True):
        assert "Detail:" in text and len(regions) >= 3, (text, regions)
        assert len(positions) == len(regions) == masks.shape[0] == states.shape[0]
        assert masks.shape[-2:] == (32, 32) and bool((masks.flatten(1).amax(1) > 0.1).all())
        assert regions[0] == "Face"
    assert 0.05 < float(data.foreground.mean()) < 0.95                 # a person mask, not everything


def test_facial_term_reaches_the_facial_encoder_through_the_engine(setup):
    """One micro-batch: 11 attn2 maps recorded (SD1.5's five middle blocks), the facial term is a proper value and
    its gradient reaches the FacialEncoder (compare with lambda = 0 on the same draws)."""
    from likeness.techniques.consistentid import training as T
    from likeness.trainers.autograd import autograd_enabled, release_inference_tensors
    from likeness.trainers.loop import StepContext

    data = setup["data"]
    grads = {}
    for weight in (0.0, 1.0):
        settings = _settings(localization_weight=weight, condition_dropout=0.0)
        task = T.ConsistentIDTask(setup["model"], data, settings, _weights(setup))
        with torch.inference_mode(), task.session():
            for module in task.frozen_modules():
                release_inference_tensors(module)  # what the loop does before training
            recorded = []
            original_end = task.state.recorder.end

            def end(original_end=original_end, recorded=recorded):
                records = original_end()
                recorded.append(records)
                return records

            task.state.recorder.end = end
            params = task.trainables()
            with autograd_enabled():
                for p in params.values():
                    p.requires_grad_(True)
                loss = task.loss(data.get_batch([0, 1]), StepContext(0, 0, torch.Generator().manual_seed(3), params))
                loss.backward()
        stats = task.stats
        grads[weight] = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
        noise, facial = stats[0]
        assert float(loss.detach()) == pytest.approx(noise + weight * facial, rel=1e-5)
        if weight:
            assert -1.0 <= facial <= 1.0 and facial != 0.0
            assert len(recorded[0]) == 11 and {g for _, g in recorded[0]} == {(8, 8), (4, 4), (2, 2)}
        else:
            assert facial == 0.0 and recorded[0] == []      # lambda 0: no maps computed at all
    encoder_keys = [k for k in grads[1.0] if k.startswith("FacialEncoder.visual_projection")]
    assert encoder_keys
    assert max(float((grads[1.0][k] - grads[0.0][k]).abs().max()) for k in encoder_keys) > 0


def test_loss_falls_on_a_short_run(setup):
    from likeness.techniques.consistentid import training as T

    model, data, settings = setup["model"], setup["data"], setup["settings"]
    frozen_before = [p.detach().clone() for p in list(model.model.diffusion_model.parameters())[:20]]
    start_before = {k: v.clone() for k, v in setup["start"].facial_encoder.state_dict().items()}
    start = _weights(setup)
    with torch.inference_mode():
        before = T.evaluate_loss(model, start, data, settings, rounds=3)
        trained, result = T.train_on_data(model, data, settings, start)
        after = T.evaluate_loss(model, trained, data, settings, rounds=3)
    first, last = float(np.mean(result.losses[:5])), float(np.mean(result.losses[-5:]))
    logger.info(f"held-out noise loss {before[0]:.4f} -> {after[0]:.4f} ({1 - after[0] / before[0]:.1%}), facial "
                f"{before[1]:.4f} -> {after[1]:.4f}; curve {first:.4f} -> {last:.4f}")
    assert after[0] <= 0.9 * before[0]
    assert last < first
    for a, b in zip(frozen_before, list(model.model.diffusion_model.parameters())[:20], strict=True):
        assert torch.equal(a, b)                                  # the UNet stays frozen
    for k, v in setup["start"].facial_encoder.state_dict().items():
        assert torch.equal(v, start_before[k])                    # the input CONSISTENTID is untouched
    assert trained.metadata["trained_steps"] == str(settings.steps) and trained.metadata["final_facial_loss"]
    assert result.loss_curve.shape[0] == 1 and result.loss_curve.shape[-1] == 3
    assert all(not p.requires_grad for p in trained.trainable(True).values())


def test_localization_weight_pulls_the_maps_onto_the_regions(setup):
    """With lambda = 1 and the processors training (LoRA on to_q/to_k reshapes the maps), the held-out facial term
    recorded through the engine falls from ~0 (unlocalised maps) well below zero, and the noise loss falls too."""
    from likeness.techniques.consistentid import training as T

    model, data = setup["model"], setup["data"]
    settings = _settings(steps=25, localization_weight=1.0, train_processors=True)
    with torch.inference_mode():
        before = T.evaluate_loss(model, _weights(setup), data, settings, rounds=1)
        trained, _ = T.train_on_data(model, data, settings, _weights(setup))
        after = T.evaluate_loss(model, trained, data, settings, rounds=1)
    logger.info(f"held-out facial term {before[1]:.4f} -> {after[1]:.4f}, noise {before[0]:.4f} -> {after[0]:.4f}")
    assert abs(before[1]) < 0.05 and after[1] < -0.2
    assert after[0] < before[0]


def test_interrupted_and_resumed_equals_uninterrupted(setup, tmp_path):
    """With the processors training too (LoRA through ModelPatcher weight wrappers, to_k_ip/to_v_ip)."""
    from likeness.techniques.consistentid import training as T
    from likeness.trainers import TrainingCancelled
    from likeness.trainers import checkpoint as ckpt

    model, data = setup["model"], setup["data"]
    settings = _settings(steps=6, checkpoint_every=2, grad_accumulation=2, train_processors=True, lr=3e-3,
                         condition_dropout=0.3)

    def cancel_at_3(step, loss):
        if step == 3:
            raise TrainingCancelled("user pressed cancel")

    with torch.inference_mode():
        full, full_result = T.train_on_data(model, data, settings, _weights(setup),
                                            checkpoint_path=str(tmp_path / "a.safetensors"))
        with pytest.raises(TrainingCancelled):
            T.train_on_data(model, data, settings, _weights(setup), checkpoint_path=str(tmp_path / "b.safetensors"),
                            step_callback=cancel_at_3)
        assert ckpt.load_training_state(str(tmp_path / "b.safetensors")).step == 2
        resumed, resumed_result = T.train_on_data(model, data, settings, _weights(setup),
                                                  checkpoint_path=str(tmp_path / "b.safetensors"), resume="require")
    assert resumed_result.start_step == 2 and resumed_result.step == 6
    assert resumed_result.losses == full_result.losses
    full_params, resumed_params = full.trainable(True), resumed.trainable(True)
    diff = max(float((full_params[k] - resumed_params[k]).abs().max()) for k in full_params)
    assert diff <= 1e-6
    start = _weights(setup).trainable(True)
    changed = [k for k in start if not torch.equal(start[k], full_params[k])]
    assert any("_lora.up" in k for k in changed) and any("to_k_ip" in k for k in changed)
    assert any(k.startswith("FacialEncoder.") for k in changed) and any(k.startswith("image_proj.") for k in changed)
    # the weight wrappers are gone from the shared UNet
    assert not any(getattr(m, "weight_function", None) for m in model.model.modules())


def test_resume_policy_with_changed_settings(setup, tmp_path, caplog):
    """require: ResumeMismatchError naming the fields; auto: a new run and one warning; fresh: a new run."""
    from likeness.errors import ResumeMismatchError
    from likeness.techniques.consistentid import training as T

    model, data = setup["model"], setup["data"]
    path = str(tmp_path / "p.safetensors")
    changed = _settings(steps=2, localization_weight=0.05, condition_dropout=0.2)
    with torch.inference_mode():
        T.train_on_data(model, data, _settings(steps=2), _weights(setup), checkpoint_path=path)
        with pytest.raises(ResumeMismatchError) as caught:
            T.train_on_data(model, data, changed, _weights(setup), checkpoint_path=path, resume="require")
        assert caught.value.fields == ["condition_dropout", "localization_weight"]
        assert "localization_weight: checkpoint 0.01 vs now 0.05" in str(caught.value)
        caplog.clear()
        with caplog.at_level("INFO", logger="likeness"):
            _, auto = T.train_on_data(model, data, changed, _weights(setup), checkpoint_path=path, resume="auto")
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "likeness"]
        assert auto.start_step == 0 and len(warnings) == 1 and "condition_dropout: checkpoint 0.1" in warnings[0]
        _, fresh = T.train_on_data(model, data, _settings(steps=3), _weights(setup), checkpoint_path=path,
                                   resume="fresh")
    assert fresh.start_step == 0 and fresh.step == 3


def test_saved_file_round_trips_through_the_loader_and_encodes(setup, tmp_path):
    from likeness.face_analysis.parsing import landmark_parser
    from likeness.techniques.consistentid import training as T
    from likeness.techniques.consistentid.encode import encode_consistentid
    from likeness.techniques.consistentid.loader import load_consistentid

    model, data = setup["model"], setup["data"]
    with torch.inference_mode():
        trained, _ = T.train_on_data(model, data, _settings(steps=2, train_processors=True), _weights(setup))
        path = T.save_trained(trained, str(tmp_path / "me.safetensors"))
        loaded = load_consistentid(path)
    assert loaded.variant.value == "consistentid" and loaded.facial_encoder is not None
    reread = T.ConsistentIDWeights(loaded).trainable(True)
    for name, tensor in trained.trainable(True).items():
        assert torch.equal(reread[name], tensor), name
    # the loaded file drives the encode path (tokens, fusion, LoRA patches, ID injector)
    from face_fixtures import astronaut
    from likeness.face_analysis.analyze import analyze
    from likeness.face_analysis.parsing import parse_faces

    image = torch.from_numpy(astronaut()).float()[None] / 255
    with torch.inference_mode():
        faces = analyze(analyzer(), image, selection="largest").faces
        labels = parse_faces(landmark_parser(), image, faces).labels[0]
        arcface = torch.as_tensor(faces.faces[0][0].normed_embedding)[None]
        result = encode_consistentid(model, setup["clip"], setup["clip_vision"], loaded, image, arcface, labels,
                                     "a photo of a woman", "blurry")
    assert result.regions and len(result.positions) == len(result.regions)


def test_fresh_model_starts_as_the_official_init(setup, tmp_path):
    from likeness.techniques.consistentid import training as T
    from likeness.techniques.consistentid.loader import load_consistentid
    from likeness.techniques.faceid.lora import transformer_blocks

    model = setup["model"]
    small = T.FreshArchitecture(projector_depth=2, resampler_dim=64, resampler_depth=2, resampler_heads=1,
                                lora_rank=4)
    with torch.inference_mode():
        fresh = T.ConsistentIDWeights.fresh(model, 64, small, seed=1)
    sd = model.model.state_dict()
    for ref in transformer_blocks(model):
        proc = fresh.adapter.processors[ref.attn2_processor]
        assert torch.equal(proc.to_k_ip, sd[f"{ref.prefix}.attn2.to_k.weight"].float())
        assert float(proc.lora["to_q"][1].abs().max()) == 0.0           # up = 0: the LoRA starts as a no-op
    loaded = load_consistentid(T.save_trained(fresh, str(tmp_path / "fresh.safetensors")))
    assert loaded.facial_encoder.visual_projection.proj_in.in_features == 64
    assert not any(t.is_inference() for t in fresh.trainable(True).values())


# The shipped training workflow made tiny: test loaders, the tiny insightface pack, small sizes, 2 steps.
TINY_LOADERS = {"CheckpointLoaderSimple": ("LikenessTestTinySD15Loader", {"seed": 0}),
                "CLIPVisionLoader": ("LikenessTestTinyCLIPVision", {"clip_name": "tiny"})}
TINY_INPUTS = {
    "LikenessInsightFaceLoader": {"pack": "likeness_tiny", "det_size": 192},
    "LikenessFaceParserLoader": {"parser": "landmarks (no weights)"},
    "LikenessConsistentIDLoader": {"model_name": "tiny_start.safetensors"},
    "LikenessTrainConsistentID": {"steps": 2, "resolution": 64, "grad_accumulation": 1, "checkpoint_every": 1,
                                  "name": "workflow_cid", "folder": "likeness_consistentid_faces"},
    "LoadImage": {"image": "likeness_cid_reference.png"},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 2, "sampler_name": "euler", "scheduler": "normal"},
}


def test_example_workflow_runs_in_the_executor(execute_prompt, host_test_nodes, host_env, one_thread, monkeypatch):
    """The shipped training workflow with tiny models: the tiny insightface pack on synthetic 'faces' (white
    squares its deterministic detector finds), the landmark parser, a tiny ConsistentID file to start from."""
    import nodes as comfy_nodes
    from PIL import Image

    import host_support
    from likeness.techniques.consistentid.loader import load_consistentid
    from likeness.techniques.consistentid.training import ConsistentIDWeights, save_trained
    from onnx_face_models import square_image, write_tiny_insightface_pack

    class TinyCLIPVisionLoader:
        RETURN_TYPES = ("CLIP_VISION",)
        FUNCTION = "load"
        CATEGORY = "Likeness/Tests"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"clip_name": ("STRING", {"default": "tiny"})}}

        def load(self, clip_name):
            return (host_support.build_tiny_clip_vision(),)

    monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, "LikenessTestTinyCLIPVision", TinyCLIPVisionLoader)
    write_tiny_insightface_pack(os.path.join(host_env.models, "insightface", "models", "likeness_tiny"))
    with torch.inference_mode():
        model = host_support.build_tiny_sd15()
        _, start = tiny_consistentid(model, host_support.build_tiny_clip_vision())
        save_trained(ConsistentIDWeights.from_checkpoint(start),
                     os.path.join(host_env.models, "likeness", "consistentid", "tiny_start.safetensors"))
    folder = os.path.join(host_env.input, "likeness_consistentid_faces")
    os.makedirs(folder, exist_ok=True)
    for i, (x, y) in enumerate([(64, 64), (96, 64)]):
        Image.fromarray(square_image(192, 192, x, y)).save(os.path.join(folder, f"square{i}.png"))
        with open(os.path.join(folder, f"square{i}.txt"), "w") as handle:
            handle.write("a photo of a person")
    Image.fromarray(square_image(192, 192, 64, 96)).save(os.path.join(host_env.input, "likeness_cid_reference.png"))
    prompt = host_support.example_prompt("ConsistentID - fine-tune on your photos")
    for node in prompt.values():
        replacement = TINY_LOADERS.get(node["class_type"])
        if replacement:
            node.update(class_type=replacement[0], inputs=dict(replacement[1]))
        node["inputs"].update(TINY_INPUTS.get(node["class_type"], {}))
    outputs = execute_prompt(prompt)
    preview = [k for k, n in prompt.items() if n["class_type"] == "PreviewImage"]
    saved = [k for k, n in prompt.items() if n["class_type"] == "SaveImage"]
    assert outputs[preview[0]]["images"] and outputs[saved[0]]["images"]
    trained = load_consistentid(os.path.join(host_env.models, "likeness", "consistentid", "workflow_cid.safetensors"))
    assert trained.facial_encoder is not None
    assert os.path.isfile(os.path.join(host_env.models, "likeness", "training", "consistentid",
                                       "workflow_cid.safetensors"))
