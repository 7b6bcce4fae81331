"""M3Face Imagic: the embedding interpolation and file (plain), the official up-block subset, and both training
stages on the tiny SD1.5 with a tiny ComfyUI ControlNet (host): losses fall, exact resume after a cancel, LoRA
mode, the output MODEL's weight patches, and the nodes."""
from __future__ import annotations

import pytest
import torch

from likeness.errors import CheckpointLayoutError, InvalidInputError
from likeness.techniques.m3face.imagic_embedding import ImagicEmbedding, load_embedding, save_embedding
from likeness.techniques.m3face.imagic_weights import UP_BLOCK_LAYERS, trainable_copies, weight_diffs


def _embedding(seed: int = 0) -> ImagicEmbedding:
    generator = torch.Generator().manual_seed(seed)
    target, optimized = torch.randn(2, 1, 77, 64, generator=generator)
    return ImagicEmbedding(target, optimized, torch.randn(1, 64, generator=generator), {"steps": 3})


# ------------------------------------------------------------------------------------------------- plain

def test_interpolation_ends_are_the_target_and_the_optimised_embedding():
    emb = _embedding()
    assert torch.equal(emb.interpolate(1.0), emb.target)
    assert torch.equal(emb.interpolate(0.0), emb.optimized)
    assert torch.allclose(emb.interpolate(0.8), 0.8 * emb.target + 0.2 * emb.optimized)
    assert torch.allclose(emb.interpolate(1.1) - emb.target, 0.1 * (emb.target - emb.optimized), atol=1e-6)
    context, extras = emb.conditioning(emb.interpolate(0.9))[0]
    assert context.shape == (1, 77, 64) and torch.equal(extras["pooled_output"], emb.pooled)


def test_embedding_file_round_trip_and_a_foreign_file_is_refused(tmp_path):
    emb = _embedding(1)
    path = save_embedding(emb, str(tmp_path / "edit.safetensors"))
    loaded = load_embedding(path)
    assert torch.equal(loaded.target, emb.target) and torch.equal(loaded.optimized, emb.optimized)
    assert torch.equal(loaded.pooled, emb.pooled) and loaded.metadata == {"steps": 3}
    from likeness.safetensors_io import atomic_save

    other = atomic_save({"target": emb.target}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointLayoutError):
        load_embedding(other)
    with pytest.raises(InvalidInputError):
        ImagicEmbedding(emb.target, emb.optimized[:, :10])


def test_trainable_copies_are_swapped_in_and_the_originals_come_back():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    original_weight, original_bias = model[1].weight, model[1].bias
    with trainable_copies(model, ["1.weight", "1.bias"]) as copies:
        assert model[1].weight is copies["1.weight"] and copies["1.weight"] is not original_weight
        with torch.no_grad():
            copies["1.weight"].add_(1.0)
        diffs = weight_diffs(copies, {"1.weight": original_weight, "1.bias": original_bias})
    assert model[1].weight is original_weight and model[1].bias is original_bias
    assert set(diffs) == {"diffusion_model.1.diff", "diffusion_model.1.diff_b"}
    assert torch.allclose(diffs["diffusion_model.1.diff"], torch.ones(2, 4))
    assert torch.equal(diffs["diffusion_model.1.diff_b"], torch.zeros(2))


def test_verify_for_knows_the_files_the_imagic_trainer_writes():
    from likeness.cli.workflow_models import NODE_FILES
    from likeness.techniques.m3face.imagic import RUN_FILES

    written = [f"{folder}/{sub}/{name}" for folder, sub, name in (RUN_FILES[k] for k in ("embedding", "weights"))]
    assert list(NODE_FILES["LikenessM3FaceImagicTrain"].writes) == written
    assert NODE_FILES["LikenessM3FaceLoadImagicEmbedding"].reads["embedding_name"].folder == "likeness/m3face_imagic"


# ------------------------------------------------------------------------------------------------- host

@pytest.fixture
def _unload_models():
    yield
    import comfy.model_management

    comfy.model_management.unload_all_models()


@pytest.mark.host
@pytest.mark.parametrize("layers", sorted(UP_BLOCK_LAYERS))
def test_layer_choices_are_the_edit_scripts_index_ranges_of_diffusers_up_blocks(comfy_ready, layers):
    """The DEV script slices the parameter list of diffusers' SD1.5 ``unet.up_blocks``; the same parameters,
    through ComfyUI's diffusers key map, are what the pack selects by output block."""
    import comfy.utils
    from diffusers import UNet2DConditionModel

    from host_support import sd15_unet_config
    from likeness.host.weights import meta_unet
    from likeness.techniques.m3face.imagic_weights import subset_parameter_names

    ranges = {"only1": (38, 154), "only2": (154, 270), "only3": (270, None), "1and2": (38, 270),
              "2and3": (154, None), "all": (0, None)}
    with torch.device("meta"):
        diffusers_unet = UNet2DConditionModel(cross_attention_dim=768)   # the SD1.5 UNet config
    up_params = [n for n, _ in diffusers_unet.named_parameters() if n.startswith("up_blocks")]
    assert len(up_params) == 384
    start, stop = ranges[layers]
    config = sd15_unet_config(model_channels=320, context_dim=768)
    to_comfy = comfy.utils.unet_to_diffusers(config)
    official = {to_comfy[n] for n in up_params[start:stop]}
    assert set(subset_parameter_names(meta_unet(config), layers)) == official


@pytest.mark.host
def test_fp32_copies_train_inside_a_half_precision_model(comfy_ready):
    """A GPU holds SD1.5 in fp16: the swapped fp32 weights reach its layers through ComfyUI's cast path."""
    import comfy.ops

    layer = comfy.ops.disable_weight_init.Linear(4, 3, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, 4))
        layer.bias.zero_()
    model = torch.nn.Sequential(layer)
    with trainable_copies(model, ["0.weight", "0.bias"]) as copies:
        assert layer.comfy_cast_weights and copies["0.weight"].dtype == torch.float32
        out = model(torch.randn(2, 4, dtype=torch.bfloat16))
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert copies["0.weight"].grad is not None and copies["0.weight"].grad.abs().sum() > 0
    assert layer.weight.dtype == torch.bfloat16 and "comfy_cast_weights" not in layer.__dict__


def _tiny_controlnet():
    from likeness.techniques.faceid.controlnet import build_id_controlnet
    from test_face_makeup_controlnet import TINY_SHAPE, random_controlnet_group

    return build_id_controlnet(random_controlnet_group(TINY_SHAPE), TINY_SHAPE)


@pytest.fixture
def imagic_inputs(tiny_vae, comfy_ready, _unload_models):
    """A tiny SD1.5 initialised N(0, 1/fan_in) (its output, unlike the default tiny model's, depends clearly on
    the text context, so the embedding stage has something to learn), the tiny VAE and ControlNet, one photo."""
    from host_support import build_tiny_sd15, init_weights

    model = build_tiny_sd15(seed=11, cached=False)
    init_weights(model.model.diffusion_model, 11, fan_in_gain=1.0)
    generator = torch.Generator().manual_seed(4)
    photo = torch.rand(1, 80, 64, 3, generator=generator)
    condition = (torch.rand(1, 64, 64, 3, generator=generator) > 0.5).float()
    target = torch.randn(1, 77, 64, generator=generator)
    return {"model": model, "vae": tiny_vae, "control_net": _tiny_controlnet(), "photo": photo,
            "condition": condition, "target": target}


@pytest.mark.host
def test_residual_patches_add_what_comfyuis_in_place_control_adds(imagic_inputs):
    from likeness.host.controlnet import training_control
    from likeness.host.training import load_for_training

    model, context = imagic_inputs["model"], imagic_inputs["target"]
    x, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([1.5])
    with training_control(imagic_inputs["control_net"], imagic_inputs["condition"], model, 0.8) as control, \
            torch.no_grad():
        load_for_training(model, control.patchers)
        base = model.model
        in_place = base.apply_model(x, sigma, c_crossattn=context, control=control.residuals(x, sigma, context))
        options = control.transformer_options({}, control.residuals(x, sigma, context))
        patched = base.apply_model(x, sigma, c_crossattn=context, transformer_options=options)
        plain = base.apply_model(x, sigma, c_crossattn=context)
    assert torch.allclose(patched, in_place, atol=1e-6, rtol=0)
    assert (patched - plain).abs().max() > 1e-3


def _settings(**changes):
    from likeness.techniques.m3face.imagic import ImagicSettings

    values = dict(embedding_steps=4, embedding_lr=1e-2, finetune_steps=4, finetune_lr=1e-3, resolution=64,
                  precision="fp32", checkpoint_every=2, lora_rank=4)
    values.update(changes)
    return ImagicSettings(**values)


def _run(inputs, settings, **options):
    from likeness.techniques.m3face.imagic import run_imagic

    quiet = {"progress_factory": lambda total, label: _NoProgress(), "interrupt_check": lambda: None}
    return run_imagic(inputs["model"], inputs["vae"], inputs["control_net"], inputs["photo"], inputs["condition"],
                      inputs["target"], settings, **{**quiet, **options})


class _NoProgress:
    def update_absolute(self, value, preview=None):
        pass


def _mean_loss(inputs, model, embedding: torch.Tensor, rounds: int = 12) -> float:
    """The stage loss of ``model`` (its weight patches applied) with ``embedding``, over fixed noise draws."""
    from likeness.techniques.m3face.imagic import EmbeddingStage, EmbeddingStageSettings, ImagicData, encode_photo
    from likeness.trainers.task import StepContext

    latent = encode_photo(model, inputs["vae"], inputs["photo"], 64)
    task = EmbeddingStage(model, inputs["control_net"], inputs["condition"], ImagicData(latent, ""),
                          EmbeddingStageSettings(precision="fp32"), embedding)
    generator = torch.Generator().manual_seed(123)
    with task.session(), torch.no_grad():
        values = [float(task.loss({"latent": latent}, StepContext(0, 0, generator, {"embedding": embedding})))
                  for _ in range(rounds)]
    return sum(values) / rounds


def _unet_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


@pytest.mark.host
@pytest.mark.parametrize("mode", ["up_blocks", "lora"])
def test_both_stages_lower_the_loss_and_the_model_carries_the_fine_tune(imagic_inputs, mode):
    import comfy.model_management

    inputs = imagic_inputs
    before = _unet_weights(inputs["model"])
    out = _run(inputs, _settings(embedding_steps=30, finetune_steps=30, embedding_lr=5e-2, mode=mode,
                                 finetune_lr=1e-3 if mode == "up_blocks" else 1e-2))
    assert torch.equal(out.embedding.target, inputs["target"])
    assert len(out.embedding_result.losses) == 30 and len(out.finetune_result.losses) == 30
    assert out.loss_curve.shape == (1, 320, 1280, 3)
    comfy.model_management.unload_all_models()
    after = _unet_weights(inputs["model"])
    assert all(torch.equal(before[k], after[k]) for k in before)      # the input model is left as it was

    base, optimized = inputs["model"], out.embedding.optimized
    start, reconstructed = _mean_loss(inputs, base, inputs["target"]), _mean_loss(inputs, base, optimized)
    assert reconstructed < 0.95 * start                                             # stage 1
    assert _mean_loss(inputs, out.model, optimized) < 0.97 * reconstructed           # stage 2

    if mode == "up_blocks":
        key = "output_blocks.6.0.in_layers.2.weight"                   # a conv of up block 2
        assert set(k.rsplit(".", 1)[-1] for k in out.weights) == {"diff", "diff_b"}
        assert not any(k.startswith("diffusion_model.output_blocks.5.") for k in out.weights)
        comfy.model_management.load_models_gpu([out.model], force_full_load=True)
        patched = out.model.model.diffusion_model.state_dict()[key]
        expected = before[key] + out.weights["diffusion_model." + key.rsplit(".", 1)[0] + ".diff"]
        assert torch.allclose(patched, expected, atol=1e-6) and not torch.equal(patched, before[key])
    else:
        assert all(k.split(".")[2] in ("6", "7", "8", "9", "10", "11") for k in out.weights)
        assert {k.rsplit(".", 2)[-2] for k in out.weights if k.endswith("weight")} == {"lora_up", "lora_down"}


@pytest.mark.host
@pytest.mark.parametrize("cancel_at", [3, 7])     # during stage 1 (step 3 of 4) / stage 2 (step 3 of 4)
def test_a_cancelled_run_resumes_bit_identically(imagic_inputs, tmp_path, cancel_at):
    from likeness.trainers.loop import TrainingCancelled

    def paths(folder):
        return {kind: str(tmp_path / folder / f"{kind}.safetensors") for kind in
                ("embedding", "weights", "embedding_checkpoint", "finetune_checkpoint")}

    full = _run(imagic_inputs, _settings(), paths=paths("full"))
    calls = []

    def stop(step, loss):
        calls.append(step)
        if len(calls) == cancel_at:
            raise TrainingCancelled()

    with pytest.raises(TrainingCancelled):
        _run(imagic_inputs, _settings(), paths=paths("cut"), step_callback=stop)
    resumed = _run(imagic_inputs, _settings(), paths=paths("cut"), resume="require")
    if cancel_at == 3:
        assert resumed.embedding_result.start_step == 2 and resumed.finetune_result.start_step == 0
    else:
        assert resumed.embedding_result.start_step == 4 and resumed.finetune_result.start_step == 2
    assert resumed.embedding_result.losses == full.embedding_result.losses
    assert resumed.finetune_result.losses == full.finetune_result.losses
    assert torch.equal(resumed.embedding.optimized, full.embedding.optimized)
    assert resumed.weights.keys() == full.weights.keys()
    assert all(torch.equal(resumed.weights[k], full.weights[k]) for k in full.weights)
    assert torch.equal(load_embedding(paths("cut")["embedding"]).optimized, full.embedding.optimized)


@pytest.mark.host
def test_the_target_prompt_is_encoded_as_clip_text_encode_does(tiny_clip):
    from likeness.techniques.m3face.imagic_embedding import encode_target

    context, pooled = encode_target(tiny_clip, "a woman with red hair")
    expected = tiny_clip.encode_from_tokens(tiny_clip.tokenize("a woman with red hair"))
    assert context.shape == (1, 77, 64) and torch.equal(context, expected) and pooled.shape == (1, 64)
    with pytest.raises(InvalidInputError):
        encode_target(tiny_clip, "  ")


@pytest.mark.host
def test_nodes_train_interpolate_and_reload(imagic_inputs, host_env):
    from likeness.nodes.m3face_imagic import (
        M3FaceImagicInterpolate,
        M3FaceImagicTrain,
        M3FaceLoadImagicEmbedding,
    )

    inputs = imagic_inputs
    target = [[inputs["target"], {}]]
    with torch.inference_mode():                      # as ComfyUI runs nodes
        model, embedding, optimized, target_out, curve = M3FaceImagicTrain().train(
            inputs["model"], inputs["vae"], inputs["control_net"], inputs["photo"], inputs["condition"],
            "imagic_node_test", "", 2, 1e-2, 2, 1e-3, "lora", "2and3", 4, 0, "fresh", target_conditioning=target,
            resolution=64, precision="fp32")
        (at_one,) = M3FaceImagicInterpolate().interpolate(embedding, 1.0)
        (at_zero,) = M3FaceImagicInterpolate().interpolate(embedding, 0.0)
    assert torch.equal(at_one[0][0], inputs["target"]) and torch.equal(target_out[0][0], inputs["target"])
    assert torch.equal(at_zero[0][0], optimized[0][0]) and not torch.equal(at_zero[0][0], inputs["target"])
    assert model is not inputs["model"] and curve.shape[-1] == 3
    (loaded,) = M3FaceLoadImagicEmbedding().load("imagic_node_test.safetensors")
    assert torch.equal(loaded.optimized, embedding.optimized)
    with pytest.raises(InvalidInputError):
        M3FaceImagicTrain().train(inputs["model"], inputs["vae"], inputs["control_net"], inputs["photo"],
                                  inputs["condition"], "x", "", 1, 1e-2, 1, 1e-3, "lora", "2and3", 4, 0, "fresh")
