"""Plain: the input checks every node shares (face analyzer, output file names) and the output naming behind them.

The name check refuses, before any work, a name whose files the atomic writer could not create: the final
file and the temporary folder next to it (file name + ``TEMP_NAME_OVERHEAD``) must fit the file system's name
limit, and the temporary file's path its path limit. The tests write the longest accepted name for real and
show that one more character is refused up front, and would indeed have failed in the writer.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors import SafetensorError

from face_fixtures import models_root  # noqa: F401  (fixture)
from likeness.errors import InvalidInputError
from likeness.nodes._common import check_analyzer, checked_file_stem, longest_stem
from likeness.safetensors_io import TEMP_NAME_OVERHEAD, atomic_save, load_tensors

needs_pathconf = pytest.mark.skipif(not hasattr(os, "pathconf"), reason="the file system reports no limits here")


def _write(folder, stem: str) -> str:
    return atomic_save({"x": torch.arange(3.0)}, os.path.join(str(folder), f"{stem}.safetensors"))


def _refused_up_front(stem: str, outputs, longest: int) -> None:
    with pytest.raises(InvalidInputError) as error:
        checked_file_stem(stem, "name", outputs)
    assert "'name'" in str(error.value) and f"at most {longest}" in str(error.value)


@needs_pathconf
def test_the_longest_accepted_name_is_written_and_one_more_is_refused_up_front(tmp_path):
    outputs = [(str(tmp_path), "{}.safetensors")]
    longest = longest_stem(outputs)
    assert longest == os.pathconf(str(tmp_path), "PC_NAME_MAX") - TEMP_NAME_OVERHEAD - len(".safetensors")
    stem = checked_file_stem("a" * longest, "name", outputs)
    tensors, _ = load_tensors(_write(tmp_path, stem))
    assert torch.equal(tensors["x"], torch.arange(3.0))

    _refused_up_front("a" * (longest + 1), outputs, longest)
    with pytest.raises(OSError):             # the limit is the writer's real one: its temporary folder cannot exist
        _write(tmp_path, "b" * (longest + 1))
    assert sorted(os.listdir(tmp_path)) == [f"{stem}.safetensors"]


@needs_pathconf
def test_in_a_deep_folder_the_path_limit_decides(tmp_path):
    folder = str(tmp_path)
    while len(folder) < 3700:
        folder = os.path.join(folder, "d" * 200)
    os.makedirs(folder)
    outputs = [(folder, "{}.safetensors")]
    longest = longest_stem(outputs)
    assert 0 < longest < os.pathconf(folder, "PC_NAME_MAX") - TEMP_NAME_OVERHEAD - len(".safetensors")
    _write(folder, checked_file_stem("a" * longest, "name", outputs))
    _refused_up_front("a" * (longest + 1), outputs, longest)
    with pytest.raises((OSError, SafetensorError)):       # the temporary file's path would be too long
        _write(folder, "b" * (longest + 1))


@needs_pathconf
def test_every_output_counts_and_a_missing_folder_is_measured_at_its_parent(tmp_path):
    plain = longest_stem([(str(tmp_path), "{}.safetensors")])
    outputs = [(str(tmp_path / "not" / "yet"), "{}.safetensors"), (str(tmp_path), "facea_{}.safetensors")]
    assert longest_stem(outputs) == plain - len("facea_")
    assert longest_stem([(str(tmp_path), "{}_999.safetensors")]) == plain - 4


def test_a_name_must_be_a_plain_file_name(tmp_path):
    outputs = [(str(tmp_path), "{}.safetensors")]
    assert checked_file_stem(" anna b.safetensors ", "name", outputs) == "anna b"
    assert checked_file_stem("Zoë_2-x.y", "name", outputs) == "Zoë_2-x.y"
    for bad in ("", "  ", "..", ".", "../anna/bob", "a/b", "a\\b", "x:y", "q?", None):
        with pytest.raises(InvalidInputError, match="'identity_name' .* must be a plain file name"):
            checked_file_stem(bad, "identity_name", outputs)


def test_the_analyzer_check_names_its_input():
    class Analyzer:
        model_id = "test:analyzer"

        def detect(self, image):
            return []

    analyzer = Analyzer()
    assert check_analyzer(analyzer) is analyzer
    with pytest.raises(InvalidInputError, match="'face_analyzer' must come from a Likeness face analyzer"):
        check_analyzer("not an analyzer", "face_analyzer")
    with pytest.raises(InvalidInputError, match="'analyzer'"):
        check_analyzer(type("NoModelId", (), {"detect": lambda self, image: []})())


def test_embeds_are_numbered_when_the_name_is_taken(tmp_path):
    from likeness.face_analysis.embeds import EMBEDS_FILE_NAMES, NUMBERED_LIMIT, embeds_path

    folder = str(tmp_path)
    assert embeds_path(folder, "anna", False) == os.path.join(folder, "anna.safetensors")
    (tmp_path / "anna.safetensors").touch()
    assert embeds_path(folder, "anna", True) == os.path.join(folder, "anna.safetensors")
    assert embeds_path(folder, "anna", False) == os.path.join(folder, "anna_001.safetensors")
    for number in range(1, NUMBERED_LIMIT + 1):
        (tmp_path / f"anna_{number:03d}.safetensors").touch()
    with pytest.raises(InvalidInputError, match="choose another name or turn overwrite on"):
        embeds_path(folder, "anna", False)
    longest_made = max(len(name) for name in os.listdir(folder)) - len("anna")
    assert max(len(t.replace("{}", "")) for t in EMBEDS_FILE_NAMES) == longest_made


def test_a_trained_identity_is_saved_under_its_name(models_root):  # noqa: F811
    from likeness.techniques.facea_net.files import identity_file, identity_outputs, save_trained_identity
    from likeness.techniques.facea_net.identity import Identity, load_identity

    identity = Identity(feats={"face": torch.randn(4, 8)}, class_word="woman", metadata={"rank": 4})
    lora = {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight": torch.randn(8, 4)}
    lora_path, identity_path = save_trained_identity(identity, lora, "anna b")
    assert lora_path == os.path.join(models_root, "loras", "likeness", "anna b.safetensors")
    assert identity_path == os.path.join(models_root, "likeness", "identities", "anna b.safetensors")
    assert identity.name == "anna b" and identity.lora_name == "likeness/anna b.safetensors"
    stored, meta = load_tensors(lora_path)
    assert torch.equal(next(iter(stored.values())), next(iter(lora.values())))
    assert meta["likeness.kind"] == "facea_net_lora" and meta["ss_network_dim"] == "4"
    loaded = load_identity(identity_path)
    assert loaded.lora_name == identity.lora_name and torch.equal(loaded.feats["face"], identity.feats["face"])
    assert identity_file("checkpoint", "anna b") == os.path.join(models_root, "likeness", "training",
                                                                 "facea_anna b.safetensors")
    assert [template for _, template in identity_outputs()] == ["{}.safetensors", "{}.safetensors",
                                                               "facea_{}.safetensors"]
    assert [folder for folder, _ in identity_outputs(("lora",))] == [os.path.dirname(lora_path)]
