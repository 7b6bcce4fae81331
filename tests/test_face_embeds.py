"""FACE_EMBEDS: collect, combine, save/load, never mix models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from likeness.errors import IncompatibleEmbedsError, InvalidInputError, ModelFileError
from likeness.face_analysis.embeds import FaceEmbeds, combine, concat, embeds_from_faces, load_embeds, save_embeds
from likeness.face_analysis.types import Face, FaceAnalysis


def _face(vector, index=0) -> Face:
    return Face(bbox=np.array([0, 0, 10, 10], np.float32), score=1.0, kps=np.zeros((5, 2), np.float32),
                image_index=index, embedding=np.asarray(vector, np.float32))


def _embeds(rows, model="insightface:p/w600k", backend="insightface") -> FaceEmbeds:
    return FaceEmbeds(torch.tensor(np.asarray(rows), dtype=torch.float32), model, backend, [f"#{i}" for i in range(len(rows))])


def test_embeds_from_faces_stacks_every_face_in_order():
    analysis = FaceAnalysis([[_face([1, 0, 0])], [], [_face([0, 2, 0], 2), _face([0, 0, 3], 2)]],
                            [(8, 8)] * 3, "insightface", "insightface:p/w600k", 3)
    embeds = embeds_from_faces(analysis)
    assert embeds.embeddings.shape == (3, 3) and embeds.dims == 3 and embeds.count == 3
    assert embeds.sources == ["image 0 face 0", "image 2 face 0", "image 2 face 1"]
    assert embeds.model_id == "insightface:p/w600k" and embeds.backend == "insightface"


def test_embeds_from_faces_without_embeddings_explains_why():
    no_faces = FaceAnalysis([[], []], [(8, 8)] * 2, "dlib", "dlib:resnet_v1")
    with pytest.raises(InvalidInputError, match="no face was found"):
        embeds_from_faces(no_faces)
    face = _face([1, 2])
    face.embedding = None
    no_vectors = FaceAnalysis([[face]], [(8, 8)], "insightface", "insightface:p/none")
    with pytest.raises(InvalidInputError, match="without a recognition model"):
        embeds_from_faces(no_vectors)


def test_combine_methods():
    rows = [[2.0, 0.0], [0.0, 4.0], [2.0, 2.0]]
    embeds = _embeds(rows)
    torch.testing.assert_close(combine(embeds, "mean").embeddings[0], torch.tensor([4 / 3, 2.0]))
    torch.testing.assert_close(combine(embeds, "median").embeddings[0], torch.tensor([2.0, 2.0]))
    normalized = combine(embeds, "normalized_mean").embeddings[0]
    direction = torch.tensor([1.0, 0.0]) + torch.tensor([0.0, 1.0]) + torch.tensor([1.0, 1.0]) / 2 ** 0.5
    mean_norm = (2 + 4 + 8 ** 0.5) / 3
    torch.testing.assert_close(normalized, direction / direction.norm() * mean_norm)
    assert combine(embeds, "normalized_mean").sources == ["normalized_mean of 3"]


def test_outlier_rejection_drops_the_odd_photo_and_says_so():
    rng = np.random.default_rng(0)
    identity = rng.standard_normal(128)
    rows = [identity + 0.1 * rng.standard_normal(128) for _ in range(5)] + [rng.standard_normal(128)]
    embeds = _embeds(np.stack(rows).tolist())
    combined = combine(embeds, "outlier_rejection")
    assert combined.sources == ["outlier_rejection of 5"]
    assert any("#5" in note for note in combined.notes)
    plain = combine(embeds, "normalized_mean").embeddings[0]
    cos = torch.nn.functional.cosine_similarity
    truth = torch.tensor(identity, dtype=torch.float32)
    assert cos(combined.embeddings[0], truth, dim=0) > cos(plain, truth, dim=0)
    two = combine(_embeds(np.stack(rows[:2])), "outlier_rejection")          # too few to judge: nothing dropped
    assert two.sources == ["outlier_rejection of 2"] and not two.notes


def test_mixing_models_or_sizes_is_an_incompatible_embeds_error():
    a = _embeds([[1.0, 0.0]])
    with pytest.raises(IncompatibleEmbedsError, match="dlib:resnet_v1"):
        concat([a, _embeds([[1.0, 0.0]], "dlib:resnet_v1", "dlib")])
    with pytest.raises(IncompatibleEmbedsError, match="3-D"):
        concat([a, _embeds([[1.0, 0.0, 0.0]])])
    both = concat([a, None, _embeds([[0.0, 1.0]])])
    assert both.count == 2 and both.sources == ["#0", "#0"]


def test_invalid_embeddings_are_refused():
    with pytest.raises(InvalidInputError, match="NaN"):
        _embeds([[float("nan"), 1.0]])
    with pytest.raises(InvalidInputError, match=r"\[N, D\]"):
        FaceEmbeds(torch.zeros(0, 4), "m", "b")
    with pytest.raises(InvalidInputError, match="combine method"):
        combine(_embeds([[1.0]]), "max")


def test_save_and_load_round_trip_with_metadata(tmp_path):
    embeds = _embeds([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], "dlib:resnet_v1", "dlib")
    path = save_embeds(embeds, str(tmp_path / "sub" / "anna.safetensors"))
    loaded = load_embeds(path)
    assert torch.equal(loaded.embeddings, embeds.embeddings)
    assert (loaded.model_id, loaded.backend, loaded.dims, loaded.sources) == ("dlib:resnet_v1", "dlib", 3, ["#0", "#1"])
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == "likeness.face_embeds" and meta["dims"] == "3" and meta["count"] == "2"
    assert json.loads(meta["sources"]) == ["#0", "#1"]
    assert not (tmp_path / "sub" / "anna.safetensors.tmp").exists()


def test_loading_a_foreign_or_broken_file_is_a_model_file_error(tmp_path):
    from safetensors.torch import save_file

    foreign = str(tmp_path / "lora.safetensors")
    save_file({"lora_up.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(ModelFileError, match="not a Likeness face-embeds file"):
        load_embeds(foreign)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_embeds(str(broken))
    lying = str(tmp_path / "lying.safetensors")
    save_file({"embeddings": torch.zeros(1, 4)}, lying, metadata={"format": "likeness.face_embeds", "version": "1",
                                                                  "model_id": "m", "dims": "8"})
    with pytest.raises(ModelFileError, match="metadata says 8-D"):
        load_embeds(lying)
