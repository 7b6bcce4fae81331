"""M3Face's multilingual text encoder against diffusers' RobertaSeriesModelWithTransformation, and the diffusers ->
ComfyUI config derivations of the AltDiffusion folder (plain tests: no ComfyUI)."""
from __future__ import annotations

import pytest
import torch

from likeness.errors import CheckpointLayoutError, InvalidInputError
from likeness.techniques.m3face import altdiffusion as alt
from likeness.techniques.m3face.multilingual import (
    IGNORED_KEY_PREFIXES,
    MultilingualTextEncoder,
    PromptTokenizer,
    encode_prompts,
    load_official_state_dict,
)
from m3face_generation_support import (
    build_official_text_encoder,
    build_tiny_tokenizer,
    tiny_text_encoder_config,
    tiny_unet_diffusers_config,
    write_tiny_altdiffusion_folder,
)

pytest.importorskip("diffusers")


@pytest.mark.parametrize("has_pre", [True, False])
def test_official_layout_loads_key_for_key_and_matches_the_class(has_pre):
    config = tiny_text_encoder_config(project_dim=48, has_pre_transformation=has_pre)
    official = build_official_text_encoder(config, seed=3)
    state = official.state_dict()
    ours = MultilingualTextEncoder(config).eval()
    expected_keys = {k for k in state if not k.startswith(IGNORED_KEY_PREFIXES)}
    assert set(ours.state_dict()) == expected_keys
    assert {k for k in state if k not in expected_keys} <= {"roberta.pooler.dense.weight", "roberta.pooler.dense.bias"}
    load_official_state_dict(ours, state, "tiny")
    tokenizer = PromptTokenizer(build_tiny_tokenizer(), 77)
    ids, mask = tokenizer(["this woman has narrow eyes and rosy cheeks.", "cette femme a les yeux étroits"])
    assert ids.shape == (2, 77) and int(mask[0].sum()) < 77  # padded to the prompt length, mask marks the text
    with torch.no_grad():
        for attention in (mask, None):
            reference = official(ids, attention_mask=attention)[0]
            assert reference.shape == (2, 77, 48)
            torch.testing.assert_close(ours(ids, attention_mask=attention), reference, atol=1e-4, rtol=0)


def test_encode_prompts_follows_the_mask_setting():
    config = tiny_text_encoder_config()
    official = build_official_text_encoder(config, seed=1)
    ours = MultilingualTextEncoder(config).eval()
    load_official_state_dict(ours, official.state_dict(), "tiny")
    tokenizer = PromptTokenizer(build_tiny_tokenizer(), 77)
    ids, mask = tokenizer(["diese frau hat schmale augen"])
    with torch.no_grad():
        masked, unmasked = official(ids, attention_mask=mask)[0], official(ids)[0]
    torch.testing.assert_close(encode_prompts(ours, tokenizer, ["diese frau hat schmale augen"]), masked,
                               atol=1e-4, rtol=0)  # auto = the config's use_attention_mask (True)
    torch.testing.assert_close(encode_prompts(ours, tokenizer, ["diese frau hat schmale augen"], "off"), unmasked,
                               atol=1e-4, rtol=0)
    assert not torch.allclose(masked, unmasked, atol=1e-4)
    with pytest.raises(InvalidInputError):
        encode_prompts(ours, tokenizer, ["x"], "sometimes")


def test_a_wrong_layout_is_refused_with_the_keys():
    config = tiny_text_encoder_config()
    state = build_official_text_encoder(config).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["transformation_pre.weight"]
    with pytest.raises(CheckpointLayoutError, match="transformation_pre.weight") as err:
        load_official_state_dict(MultilingualTextEncoder(config), state, "bad")
    assert "extra.weight" in str(err.value)


def test_tiny_folder_round_trip(tmp_path):
    folder = write_tiny_altdiffusion_folder(str(tmp_path))
    bundle = alt.load_text_encoder(folder)
    assert bundle.tokenizer.max_length == 77 and bundle.encoder.context_dim == 64
    official = build_official_text_encoder(tiny_text_encoder_config(), seed=2)  # the seed the folder was written with
    ids, mask = bundle.tokenizer(["this man smiles"])
    with torch.no_grad():
        torch.testing.assert_close(bundle.encoder(ids, mask), official(ids, attention_mask=mask)[0], atol=1e-4, rtol=0)
    assert alt.prediction_type(folder) == "epsilon" and alt.prediction_type(folder, "v_prediction") == "v_prediction"
    unet = alt.read_weights(folder, "unet")
    assert "conv_in.weight" in unet and "down_blocks.0.attentions.0.proj_in.weight" in unet


def test_unet_config_from_diffusers_sd15_and_sd2_layouts():
    sd15 = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
            "attention_head_dim": 8, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    config = alt.unet_config_from_diffusers(sd15)
    assert config["transformer_depth"] == [1, 1, 1, 1, 1, 1, 0, 0]
    assert config["transformer_depth_output"] == [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    assert (config["num_heads"], config["num_head_channels"], config["use_linear_in_transformer"]) == (8, -1, False)
    sd2 = dict(sd15, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
    config = alt.unet_config_from_diffusers(sd2)
    assert (config["num_heads"], config["num_head_channels"], config["context_dim"]) == (-1, 64, 1024)
    assert "attn_precision" not in config
    assert alt.unet_config_from_diffusers(dict(sd2, upcast_attention=True))["attn_precision"] == torch.float32
    with pytest.raises(CheckpointLayoutError, match="down and"):
        alt.unet_config_from_diffusers(dict(sd15, down_block_types=["DownBlock2D"]))
    tiny = alt.unet_config_from_diffusers(tiny_unet_diffusers_config())
    assert tiny["channel_mult"] == [1, 2, 4, 4] and tiny["num_head_channels"] == 32
    with pytest.raises(CheckpointLayoutError, match="addition_embed_type"):
        alt.unet_config_from_diffusers(dict(sd15, addition_embed_type="text_time"))


def test_missing_folder_parts_are_model_file_errors(tmp_path):
    from likeness.errors import ModelFileError

    with pytest.raises(ModelFileError, match="not a diffusers AltDiffusion folder"):
        alt.read_config(str(tmp_path), "unet")
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelFileError, match="no weights found"):
        alt.read_weights(str(tmp_path), "unet")
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ModelFileError, match="not a readable PyTorch weights file"):
        alt.read_weights(str(tmp_path), "unet")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text('{"prediction_type": "sample"}')
    with pytest.raises(CheckpointLayoutError, match="sample"):
        alt.prediction_type(str(tmp_path))


def test_manifest_entries_install_a_folder_the_loader_finds(tmp_path, monkeypatch):
    """Every file the manifest installs for AltDiffusion-m18 (created empty here) makes the folder the M3Face
    AltDiffusion Loader lists, with the weight files its reader picks."""
    from likeness.cli.manifest import load_manifest
    from likeness.host import folders
    from likeness.nodes import m3face_generation

    entries = [e for e in load_manifest() if e.folder.startswith("likeness/m3face/AltDiffusion-m18/")]
    for entry in entries:
        path = tmp_path / entry.folder / entry.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    monkeypatch.setattr(folders, "folder_candidates", lambda folder: [str(tmp_path / folder)])
    assert m3face_generation._list_bases() == ["AltDiffusion-m18"]
    base = tmp_path / "likeness" / "m3face" / "AltDiffusion-m18"
    for component in ("unet", "vae", "text_encoder"):
        picked = next(p for p in alt._candidate_files(str(base), component) if (tmp_path / p).is_file())
        assert any(str(tmp_path / e.folder / e.filename) == picked for e in entries), component
    assert {e.filename for e in entries if e.folder.endswith("/tokenizer")} >= {"tokenizer_config.json"}
    assert any(e.folder.endswith("/scheduler") for e in entries)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pytorch_pickles_of_both_formats_are_read(tmp_path, zip_format):
    """diffusers folders of 2023 ship ``.bin`` pickles (memory-mapped when in the zip format)."""
    path = tmp_path / "diffusion_pytorch_model.bin"
    torch.save({"conv_in.weight": torch.arange(6.0).reshape(2, 3)}, path, _use_new_zipfile_serialization=zip_format)
    torch.testing.assert_close(alt.read_weight_file(str(path))["conv_in.weight"], torch.arange(6.0).reshape(2, 3))
