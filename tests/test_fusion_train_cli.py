"""``python <pack> train fusion ...``: arguments, and (host) a run on a tiny single-file SD1.5 checkpoint that writes
the adapter the Train Face Fusion node writes for the same photos and settings."""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch

from likeness.cli import main as cli_main
from likeness.cli import train as cli_train

SMALL = ["--steps", "2", "--resolution", "64", "--reference-size", "128", "--batch-size", "2", "--lr", "0.01",
         "--checkpoint-every", "1", "--device", "cpu"]


def test_train_help_and_usage_errors(capsys):
    assert cli_main.main(["train", "--help"]) == 0
    assert "--data DIR" in capsys.readouterr().out
    assert cli_main.main(["train", "fusion"]) == cli_train.EXIT_USAGE          # --data and --checkpoint missing
    assert cli_main.main(["train", "dreambooth", "--data", "x", "--checkpoint", "y"]) == cli_train.EXIT_USAGE
    capsys.readouterr()


def test_missing_inputs_are_reported_before_anything_loads(tmp_path, capsys):
    weights = tmp_path / "sd15.safetensors"
    weights.write_bytes(b"")
    base = ["--checkpoint", str(weights)]
    assert cli_main.main(["train", "fusion", "--data", str(tmp_path / "none"), *base]) == cli_train.EXIT_USAGE
    assert "no such folder" in capsys.readouterr().err
    assert cli_main.main(["train", "consistentid", "--data", str(tmp_path), *base]) == cli_train.EXIT_USAGE
    assert "needs --clip-vision" in capsys.readouterr().err


def test_only_given_options_override_the_settings_defaults():
    from likeness.techniques.face_fusion.training import FusionTrainSettings

    parser = argparse.ArgumentParser()
    cli_train.add_train_arguments(parser)
    args = parser.parse_args(["fusion", "--data", "d", "--checkpoint", "c", "--steps", "7", "--face-weight", "2",
                              "--reference-noise", "clean"])
    settings = cli_train.settings_from_args(FusionTrainSettings, args)
    assert (settings.steps, settings.face_weight, settings.reference_noise) == (7, 2.0, "clean")
    assert settings.lr == FusionTrainSettings().lr and settings.resolution == FusionTrainSettings().resolution


def _photo_folder(folder) -> str:
    from PIL import Image

    from face_fixtures import astronaut

    image = np.ascontiguousarray(astronaut())
    os.makedirs(folder, exist_ok=True)
    for i, (y, x) in enumerate([(0, 0), (60, 120), (150, 40)]):
        Image.fromarray(image[y:y + 300, x:x + 300]).save(os.path.join(folder, f"photo{i}.png"))
        with open(os.path.join(folder, f"photo{i}.txt"), "w", encoding="utf-8") as handle:
            handle.write(f"a photo of a woman, view {i}")
    return str(folder)


@pytest.mark.host
@pytest.mark.slow
def test_cli_writes_the_nodes_adapter(comfy_ready, host_env, tmp_path, isolated_runner_state, capsys):
    from host_support import cached_tiny_sd15_checkpoint
    from likeness.host.training import load_checkpoint_file
    from likeness.nodes.face_fusion_train import TrainFaceFusion
    from likeness.techniques.face_fusion.adapter import load_fusion_adapter
    from likeness.trainers.checkpoint import load_training_state

    # In ComfyUI's input folder: the node (as a server runs it) reads only there; the CLI takes any path.
    data, checkpoint = _photo_folder(os.path.join(host_env.input, "cli_photos")), cached_tiny_sd15_checkpoint()
    code = cli_main.main(["train", "fusion", "--data", data, "--checkpoint", checkpoint, "--name", "cli_face",
                          "--comfyui", host_env.comfy_path, *SMALL])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "step 2/2" in out and "fusion: 2 steps (started at 0)" in out
    models = os.path.join(host_env.models, "likeness")
    from_cli = load_fusion_adapter(os.path.join(models, "fusion", "cli_face.safetensors"))
    assert load_training_state(os.path.join(models, "training", "fusion", "cli_face.safetensors")).step == 2

    model, clip, vae = load_checkpoint_file(checkpoint)
    with torch.inference_mode():
        TrainFaceFusion().train(model, vae, clip, "node_face", steps=2, learning_rate=0.01, batch_size=2,
                                grad_accumulation=1, seed=0, checkpoint_every=1, resume="auto", resolution=64,
                                reference_size=128, folder="cli_photos")
    from_node = load_fusion_adapter(os.path.join(models, "fusion", "node_face.safetensors"))
    source = {"source"}  # the loader records the file name
    assert {k: v for k, v in from_cli.metadata.items() if k not in source} == \
        {k: v for k, v in from_node.metadata.items() if k not in source}
    assert from_cli.metadata["trained_steps"] == "2"
    for (name, a), (_, b) in zip(from_cli.named_parameters(), from_node.named_parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.host
def test_model_files_that_are_missing_or_partial_are_model_file_errors(comfy_ready, tmp_path):
    from likeness.errors import ModelFileError
    from likeness.host.training import load_checkpoint_file, load_clip_vision_file, load_vae_file

    for load in (load_checkpoint_file, load_vae_file, load_clip_vision_file):
        with pytest.raises(ModelFileError, match="does not exist"):
            load(str(tmp_path / "missing.safetensors"))
