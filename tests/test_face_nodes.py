"""The face analysis nodes called as ComfyUI calls them (thin wrappers, clear errors)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("insightface")

from face_fixtures import as_image  # noqa: E402
from likeness.errors import InvalidInputError, ModelFileError  # noqa: E402
from likeness.nodes import face_analysis as nodes  # noqa: E402
from onnx_face_models import square_image  # noqa: E402


def _image():
    first = square_image(x=96, y=64)
    second = square_image(x=96, y=64)
    second[288:320, 448:480] = 255
    return as_image(first, second)


def test_loader_lists_packs_and_explains_an_empty_folder(models_root):
    choices = nodes.InsightFaceAnalyzerLoader.INPUT_TYPES()["required"]["pack"][0]
    assert choices == [nodes.NO_PACK]
    with pytest.raises(ModelFileError, match="No insightface model pack found in models/insightface/models") as error:
        nodes.InsightFaceAnalyzerLoader().load(nodes.NO_PACK, "CPU", "none", 640, 0.5)
    assert os.path.join(models_root, "insightface", "models") in str(error.value)


def test_full_chain_analyze_align_paste_embeds_save_load_similarity(tiny_pack, models_root):
    assert nodes.InsightFaceAnalyzerLoader.INPUT_TYPES()["required"]["pack"][0] == [tiny_pack]
    analyzer, = nodes.InsightFaceAnalyzerLoader().load(tiny_pack, "auto", "106", 640, 0.5)
    image = _image()
    faces, preview, count = nodes.AnalyzeFaces().analyze(analyzer, image, "all", 0, "error", True)
    assert count == 3 and preview.shape == image.shape
    assert faces.faces[1][0].landmarks.shape == (106, 2)
    crops, aligned_faces = nodes.AlignFaces().align(faces, image, "224", 1.0)
    assert crops.shape == (3, 224, 224, 3) and aligned_faces.alignment is not None and faces.alignment is None
    pasted, = nodes.PasteFacesBack().paste(image, aligned_faces, crops, 8)
    assert pasted.shape == image.shape
    embeds, number = nodes.FaceEmbedsFromFaces().collect(faces)
    assert number == 3 and embeds.dims == 512
    combined, = nodes.CombineFaceEmbeds().combine(embeds, "normalized_mean", 2.5, embeds_2=embeds)
    assert combined.count == 1 and combined.sources == ["normalized_mean of 6"]
    with pytest.raises(InvalidInputError, match="'name' '../anna/bob' must be a plain file name"):
        nodes.SaveFaceEmbeds().save(combined, "../anna/bob", False)
    saved = nodes.SaveFaceEmbeds().save(combined, "annabob", False)
    path = saved["result"][0]
    assert os.path.dirname(path) == os.path.join(models_root, "likeness", "embeds")
    assert os.path.basename(path) == "annabob.safetensors"
    again = nodes.SaveFaceEmbeds().save(combined, "annabob", False)["result"][0]
    assert again.endswith("annabob_001.safetensors")
    files = nodes.LoadFaceEmbeds.INPUT_TYPES()["required"]["file"][0]
    assert files == ["annabob.safetensors", "annabob_001.safetensors"]
    assert isinstance(nodes.LoadFaceEmbeds.IS_CHANGED("annabob.safetensors"), float)
    loaded, = nodes.LoadFaceEmbeds().load("annabob.safetensors")
    assert torch.equal(loaded.embeddings, combined.embeddings)
    result = nodes.FaceSimilarity().compare(analyzer, image, 0.0, reference_embeds=loaded)
    annotated, report, mean_cosine, all_passed = result["result"]
    assert annotated.shape == image.shape and "identity similarity" in report and isinstance(all_passed, bool)
    assert result["ui"]["text"] == [report]


def test_node_input_errors_are_clear(tiny_pack):
    analyzer, = nodes.InsightFaceAnalyzerLoader().load(tiny_pack, "CPU", "none", 640, 0.5)
    image = _image()
    with pytest.raises(InvalidInputError, match="must come from a Likeness face analyzer"):
        nodes.AnalyzeFaces().analyze("not an analyzer", image, "largest", 0, "error", True)
    faces, _, _ = nodes.AnalyzeFaces().analyze(analyzer, image, "largest", 0, "error", True)
    with pytest.raises(InvalidInputError, match="carries no alignment"):
        nodes.PasteFacesBack().paste(image, faces, torch.zeros(2, 112, 112, 3), 8)
    crops, aligned = nodes.AlignFaces().align(faces, image, "112", 1.0)
    with pytest.raises(InvalidInputError, match="takes a mask the size of the crops"):
        nodes.PasteFacesBack().paste(image, aligned, crops, 8, mask=torch.ones(1, 50, 70))
    with pytest.raises(InvalidInputError, match="connect reference_faces or reference_embeds"):
        nodes.FaceSimilarity().compare(analyzer, image, 0.0)
    with pytest.raises(InvalidInputError, match="must be FACES"):
        nodes.FaceEmbedsFromFaces().collect(torch.zeros(1))


def test_align_with_every_image_skipped_returns_one_black_crop(tiny_pack):
    analyzer, = nodes.InsightFaceAnalyzerLoader().load(tiny_pack, "CPU", "none", 640, 0.5)
    blank = torch.zeros(1, 128, 128, 3)
    output = nodes.AnalyzeFaces().analyze(analyzer, blank, "largest", 0, "skip", True)
    faces, preview, count = output["result"]
    assert count == 0 and faces.faces == [[]]
    assert output["ui"]["text"] == ["Likeness Analyze Faces: image 0: no face detected (also retried smaller and padded)"]
    crops, _ = nodes.AlignFaces().align(faces, blank, "112", 1.0)
    assert crops.shape == (1, 112, 112, 3) and crops.abs().sum() == 0
