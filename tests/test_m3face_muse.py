"""M3Face Muse: text -> condition map and condition inpainting on tiny aMUSEd folders (real diffusers classes),
the loader's errors, and the pack without diffusers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


@pytest.fixture(scope="module")
def muse_dirs(tmp_path_factory):
    pytest.importorskip("diffusers")
    from m3face_support import write_tiny_muse

    models = str(tmp_path_factory.mktemp("models"))
    return write_tiny_muse(models), write_tiny_muse(models, multilingual=True)


@pytest.fixture(scope="module")
def muse(muse_dirs):
    from likeness.techniques.m3face.muse import load_muse

    return load_muse(muse_dirs[0], "cpu")


@pytest.fixture(scope="module")
def ml_muse(muse_dirs):
    from likeness.techniques.m3face.muse import load_muse

    return load_muse(muse_dirs[1], "cpu")


def test_prompt_gets_the_official_training_prefix():
    from likeness.errors import InvalidInputError
    from likeness.techniques.m3face.muse import prefixed_prompt

    assert prefixed_prompt(" a smiling man ", "segmentation") == "Generate face segmentation | a smiling man"
    assert prefixed_prompt("a smiling man", "landmark") == "Generate face landmark |a smiling man"
    with pytest.raises(InvalidInputError, match="modality"):
        prefixed_prompt("x", "depth")


@pytest.mark.parametrize("which", ["muse", "ml_muse"])
def test_text_to_condition_is_seed_deterministic(which, request):
    from likeness.techniques.m3face.muse import decode_tokens, text_to_condition

    model = request.getfixturevalue(which)
    first = text_to_condition(model, "a woman with bangs", "segmentation", steps=4, seed=7, batch_size=2)
    again = text_to_condition(model, "a woman with bangs", "segmentation", steps=4, seed=7, batch_size=2)
    other = text_to_condition(model, "a woman with bangs", "segmentation", steps=4, seed=8, batch_size=2)
    assert first.image.shape == (2, model.resolution, model.resolution, 3) == (2, 32, 32, 3)
    assert first.image.min() >= 0 and first.image.max() <= 1
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.image, again.image)
    assert not torch.equal(first.tokens, other.tokens)
    assert (first.tokens < model.transformer.config.codebook_size).all()  # every mask token was filled in
    assert torch.equal(decode_tokens(model, first.tokens), first.image)


def test_size_other_than_the_models(muse):
    from likeness.errors import InvalidInputError
    from likeness.techniques.m3face.muse import text_to_condition

    result = text_to_condition(muse, "a face", "landmark", steps=2, seed=0, size=48)
    assert result.image.shape == (1, 48, 48, 3) and result.tokens.shape == (1, 12, 12)
    with pytest.raises(InvalidInputError, match="not a multiple of the Muse VQ downscale 4"):
        text_to_condition(muse, "a face", "landmark", steps=2, size=50)


def test_modality_prefix_changes_the_result(muse):
    from likeness.techniques.m3face.muse import text_to_condition

    seg = text_to_condition(muse, "a face", "segmentation", steps=3, seed=1, guidance=30.0)
    lmk = text_to_condition(muse, "a face", "landmark", steps=3, seed=1, guidance=30.0)
    assert not torch.equal(seg.tokens, lmk.tokens)


@pytest.mark.parametrize("which", ["muse", "ml_muse"])
def test_edit_keeps_the_tokens_outside_the_mask(which, request):
    from likeness.techniques.m3face.muse import edit_condition, encode_tokens, text_to_condition

    model = request.getfixturevalue(which)
    condition = text_to_condition(model, "a face", "landmark", steps=3, seed=2, batch_size=2).image
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 4:16] = 1.0                        # token rows 2..5, columns 1..3 (grid 8x8, 4 px per token)
    mask[:, 0:2, 0:4] = 1.0                          # half of token (0, 0): regenerated too
    mask[:, 28:29, 28:32] = 1.0                      # a quarter of token (7, 7): kept
    edited = edit_condition(model, condition, mask, "a face with glasses", "landmark", steps=4, seed=3)
    again = edit_condition(model, condition, mask, "a face with glasses", "landmark", steps=4, seed=3)
    before = encode_tokens(model, condition)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:6, 1:4] = True
    inside[0, 0] = True
    assert edited.image.shape == condition.shape
    assert torch.equal(edited.tokens[:, ~inside], before[:, ~inside])
    assert not torch.equal(edited.tokens[:, inside], before[:, inside])
    assert torch.equal(edited.tokens, again.tokens)


def test_edit_with_a_mask_that_covers_no_token_keeps_every_token(muse, caplog):
    from likeness.techniques.m3face.muse import edit_condition, encode_tokens

    condition = torch.rand(1, 32, 32, 3)
    mask = torch.zeros(1, 32, 32)
    mask[0, 0:4, 0:4] = 0.45   # token (0, 0) grey, under 0.5
    mask[0, 4, 4:8] = 1.0      # token (1, 1): 7 of 16 pixels white
    mask[0, 5, 4:7] = 1.0
    edited = edit_condition(muse, condition, mask, "a face", "segmentation", steps=2)
    assert torch.equal(edited.tokens, encode_tokens(muse, condition))
    assert "covers no token" in caplog.text


def test_edit_refuses_sizes_the_token_grid_cannot_take(muse):
    from likeness.errors import InvalidInputError
    from likeness.techniques.m3face.muse import edit_condition

    with pytest.raises(InvalidInputError, match="multiples of 4"):
        edit_condition(muse, torch.rand(1, 30, 32, 3), torch.ones(1, 30, 32), "x", "segmentation", steps=2)
    with pytest.raises(InvalidInputError, match="2 masks for 3"):
        edit_condition(muse, torch.rand(3, 32, 32, 3), torch.ones(2, 32, 32), "x", "segmentation", steps=2)


def _broken_copy(source: str, target: str, edit) -> str:
    shutil.copytree(source, target)
    edit(target)
    return target


def _set_config(path: str, **values):
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(values)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)


def _config_widths(folder: str, **values):
    _set_config(os.path.join(folder, "transformer", "config.json"), **values)


LOADER_ERRORS = {
    "no scheduler": (lambda d: shutil.rmtree(os.path.join(d, "scheduler")), r"has no scheduler"),
    "no tokenizer": (lambda d: shutil.rmtree(os.path.join(d, "tokenizer")), r"has no tokenizer"),
    "vq is a KL VAE": (lambda d: _set_config(os.path.join(d, "vqvae", "config.json"), _class_name="AutoencoderKL"),
                       r"vqvae is a 'AutoencoderKL', expected VQModel"),
    "unknown text encoder": (lambda d: _set_config(os.path.join(d, "text_encoder", "config.json"), model_type="bert",
                                                   architectures=["BertModel"]), r"text_encoder names model_type 'bert'"),
    "other pooled width": (lambda d: _config_widths(d, cond_embed_dim=48), r"pooled text embedding .* width 32, the "
                           r"transformer expects 48"),
    "broken weights": (lambda d: open(os.path.join(d, "vqvae", "diffusion_pytorch_model.safetensors"), "wb").close(),
                       r"the vqvae cannot be loaded"),
}


@pytest.mark.parametrize("case", sorted(LOADER_ERRORS))
def test_loader_errors_name_the_folder_and_component(case, muse_dirs, tmp_path):
    from likeness.errors import ModelFileError
    from likeness.techniques.m3face.muse import load_muse

    edit, message = LOADER_ERRORS[case]
    folder = _broken_copy(muse_dirs[0], str(tmp_path / "broken-muse"), edit)
    with pytest.raises(ModelFileError, match=message) as caught:
        load_muse(folder, "cpu")
    assert folder in str(caught.value)


@pytest.mark.parametrize("index", [0, 1], ids=["clip", "mclip"])
def test_tokenizer_without_config_is_read_as_the_text_encoders(index, muse_dirs, tmp_path):
    from likeness.techniques.m3face.muse import load_muse

    source = muse_dirs[index]
    folder = str(tmp_path / "bare-tokenizer")
    shutil.copytree(source, folder)
    os.remove(os.path.join(folder, "tokenizer", "tokenizer_config.json"))
    model = load_muse(folder, "cpu")
    assert type(model.tokenizer).__name__.startswith(("CLIPTokenizer", "XLMRobertaTokenizer")[index])
    # no config: no model_max_length; the text encoder's positions bound it
    assert model.tokenizer.model_max_length == 48


def test_multilingual_model_uses_mclip_pooled_width(ml_muse):
    from likeness.techniques.m3face.mclip import MCLIPTextEncoder

    assert ml_muse.text_encoder_kind == "mclip" and isinstance(ml_muse.text_encoder, MCLIPTextEncoder)
    ids = ml_muse.tokenizer(["la visage", "le Gesicht viso"], padding="max_length", max_length=12,
                            return_tensors="pt").input_ids
    with torch.inference_mode():
        out = ml_muse.text_encoder(ids, return_dict=True, output_hidden_states=True)
        short = ml_muse.text_encoder(ids[:1, :6])
    assert out.text_embeds.shape == (2, ml_muse.transformer.config.cond_embed_dim)
    assert out.hidden_states[-2].shape == (2, 12, ml_muse.transformer.config.encoder_hidden_size)
    # padding is masked: the pooled vector does not depend on how far the prompt was padded
    torch.testing.assert_close(out.text_embeds[:1], short.text_embeds, atol=1e-5, rtol=1e-5)


def test_pack_without_diffusers_keeps_the_nodes_and_logs_one_line():
    code = f"""
import sys, logging, io
sys.modules['diffusers'] = None
stream = io.StringIO()
logging.basicConfig(stream=stream, level=logging.INFO)
sys.path.insert(0, {ROOT!r})
from _bootstrap import load_pack
pack = load_pack()
from likeness.nodes import FAILED_NODE_MODULES
from likeness.deps import MissingDependencyError
assert not FAILED_NODE_MODULES, FAILED_NODE_MODULES
lines = [l for l in stream.getvalue().splitlines() if 'diffusers' in l]
assert len(lines) == 1 and 'optional packages not installed' in lines[0], lines
loader = pack.NODE_CLASS_MAPPINGS['LikenessM3FaceMuseLoader']
assert 'LikenessM3FaceTextToCondition' in pack.NODE_CLASS_MAPPINGS
from likeness.techniques.m3face.muse import load_muse
try:
    load_muse('.', 'cpu')
except MissingDependencyError as exc:
    print('refused:', exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "refused: M3Face's Muse (aMUSEd) condition generator needs the Python package 'diffusers'" in out.stdout
    assert "pip install 'diffusers>=0.32,<0.43'" in out.stdout
