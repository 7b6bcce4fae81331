"""insightface backend through insightface's own loading code, on tiny ONNX files with its real I/O conventions."""
from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import pytest

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")

from face_fixtures import as_image  # noqa: E402
from likeness.errors import ModelFileError  # noqa: E402
from likeness.face_analysis.analyzers import insightface_backend as backend  # noqa: E402
from onnx_face_models import expected_faces, square_image, write_tiny_insightface_pack  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_cache():
    backend.clear_session_cache()
    yield
    backend.clear_session_cache()


def _pack_dir(root: str, name: str) -> str:
    return os.path.join(root, "insightface", "models", name)


@pytest.mark.parametrize("outputs,batched", [(9, False), (15, True), (9, True), (15, False)])
def test_deterministic_detector_boxes_and_keypoints_exact(models_root, outputs, batched):
    write_tiny_insightface_pack(_pack_dir(models_root, "p"), outputs, batched, landmarks=False, genderage=False)
    analyzer = backend.load_insightface("p", "CPU")
    # two white 32x32 squares on the stride-32 grid: cells (3, 2) and (14, 9)
    image = square_image(x=96, y=64)
    image[288:320, 448:480] = 255
    faces = sorted(analyzer.detect(image), key=lambda f: float(f.bbox[0]))
    expected = expected_faces([(3, 2), (14, 9)])
    assert len(faces) == 2
    for face, (bbox, kps) in zip(faces, expected, strict=True):
        np.testing.assert_array_equal(face.bbox, bbox)
        np.testing.assert_array_equal(face.kps, kps)
        assert face.score > 0.99


def test_detector_coordinates_follow_the_letterbox_scale(models_root):
    write_tiny_insightface_pack(_pack_dir(models_root, "p"), landmarks=False, genderage=False)
    analyzer = backend.load_insightface("p", "CPU")
    # 1280x960 is letterboxed to 640x480 (scale 0.5): a 64 px square at (192, 128) becomes cell (3, 2)
    image = square_image(height=960, width=1280, x=192, y=128, side=64)
    faces = analyzer.detect(image, det_size=640)
    (bbox, kps), = expected_faces([(3, 2)], scale=0.5)
    assert len(faces) == 1
    np.testing.assert_array_equal(faces[0].bbox, bbox)
    np.testing.assert_array_equal(faces[0].kps, kps)


def test_our_loader_matches_insightface_face_analysis(tiny_pack, models_root):
    """Same boxes, keypoints and embeddings as insightface's own FaceAnalysis on the same files."""
    from insightface.app import FaceAnalysis

    analyzer = backend.load_insightface(tiny_pack, "CPU")
    image = square_image(x=96, y=64)
    ours = analyzer.embed(image, analyzer.detect(image, det_size=640))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app = FaceAnalysis(name=_pack_dir(models_root, tiny_pack), providers=["CPUExecutionProvider"],
                           allowed_modules=["detection", "recognition"])
        app.prepare(ctx_id=-1, det_size=(640, 640))
        theirs = app.get(np.ascontiguousarray(image[..., ::-1]))
    assert len(ours) == len(theirs) == 1
    np.testing.assert_array_equal(ours[0].bbox, theirs[0].bbox)
    np.testing.assert_array_equal(ours[0].kps, theirs[0].kps)
    np.testing.assert_allclose(ours[0].embedding, theirs[0].embedding, rtol=1e-5, atol=1e-5)
    assert analyzer.model_id == "insightface:tiny/w600k_r50" and analyzer.embedding_dim == 512


def test_only_needed_models_are_loaded_and_sessions_are_cached(tiny_pack, monkeypatch):
    from insightface.model_zoo import model_zoo

    loaded = []
    real = model_zoo.get_model

    def spy(name, **kwargs):
        loaded.append(os.path.basename(name))
        return real(name, **kwargs)

    monkeypatch.setattr(model_zoo, "get_model", spy)
    first = backend.load_insightface(tiny_pack, "CPU")
    assert sorted(loaded) == ["det_10g.onnx", "w600k_r50.onnx"]        # no landmark, no genderage session
    second = backend.load_insightface(tiny_pack, "CPU")
    assert len(loaded) == 2 and second._models.detector is first._models.detector   # cached across calls
    assert second._models.recognizer is first._models.recognizer
    with_landmarks = backend.load_insightface(tiny_pack, "CPU", landmarks="106")
    assert loaded[2:] == ["2d106det.onnx"]                                # detector and recogniser reused
    face = with_landmarks.detect(square_image())[0]
    face, = with_landmarks.landmarks(square_image(), [face])
    assert face.landmarks.shape == (106, 2) and face.landmark_kind == "106"
    assert backend.cached_session_count() == 3


def test_both_landmark_models_give_106_and_68_points_and_a_head_pose(models_root):
    write_tiny_insightface_pack(_pack_dir(models_root, "lmk"), landmarks_3d=True)
    analyzer = backend.load_insightface("lmk", "CPU", landmarks="106+68")
    assert {"landmarks_106", "landmarks_68", "pose"} <= {c.value for c in analyzer.capabilities}
    image = square_image()
    face, = analyzer.landmarks(image, analyzer.detect(image))
    assert face.landmark_kind == "106" and face.landmarks.shape == (106, 2)
    assert face.landmark_sets["68"].shape == (68, 2) and face.landmark_sets["106"] is face.landmarks
    assert face.pose.shape == (3,) and np.isfinite(face.pose).all()
    only_68 = backend.load_insightface("lmk", "CPU", landmarks="68")
    face, = only_68.landmarks(image, only_68.detect(image))
    assert face.landmark_kind == "68" and set(face.landmark_sets) == {"68"}


def test_unknown_file_names_are_routed_by_graph_shapes(models_root):
    write_tiny_insightface_pack(_pack_dir(models_root, "renamed"), names={"det": "a_detector.onnx", "rec": "b_rec.onnx",
                                                                          "lmk": "c.onnx", "ga": "d.onnx"})
    files = backend.scan_pack(_pack_dir(models_root, "renamed"))
    assert files.tasks == {"detection": "a_detector.onnx", "recognition": "b_rec.onnx", "landmark": "c.onnx",
                           "genderage": "d.onnx"}
    analyzer = backend.load_insightface("renamed", "CPU")
    assert analyzer.model_id == "insightface:renamed/b_rec"
    assert len(analyzer.detect(square_image())) == 1


def test_list_packs_includes_nested_and_skips_empty(models_root):
    write_tiny_insightface_pack(_pack_dir(models_root, "good"), landmarks=False, genderage=False)
    write_tiny_insightface_pack(os.path.join(_pack_dir(models_root, "antelopev2"), "antelopev2"))
    os.makedirs(_pack_dir(models_root, "empty"))
    assert backend.list_packs() == ["antelopev2", "good"]


def test_nested_pack_folder_gives_a_clear_error_with_the_tree(models_root):
    write_tiny_insightface_pack(os.path.join(_pack_dir(models_root, "antelopev2"), "antelopev2"))
    with pytest.raises(ModelFileError) as error:
        backend.load_insightface("antelopev2", "CPU")
    message = str(error.value)
    assert "nested one folder too deep" in message and "Move them up" in message
    assert "antelopev2/\n" in message and "scrfd_10g_bnkps.onnx" in message     # the expected tree


def test_empty_pack_folder_gives_a_clear_error(models_root):
    os.makedirs(_pack_dir(models_root, "buffalo_l"))
    with pytest.raises(ModelFileError, match=r"has no \.onnx files \(it is empty\)") as error:
        backend.load_insightface("buffalo_l", "CPU")
    assert "w600k_r50.onnx" in str(error.value)


def test_partial_pack_names_what_is_missing(models_root):
    path = _pack_dir(models_root, "partial")
    write_tiny_insightface_pack(path, landmarks=False, genderage=False)
    os.remove(os.path.join(path, "w600k_r50.onnx"))
    with pytest.raises(ModelFileError, match="has no recognition model") as error:
        backend.load_insightface("partial", "CPU")
    assert "det_10g.onnx -> detection" in str(error.value)


def test_missing_pack_never_downloads_and_hints_at_the_models_level(models_root, monkeypatch):
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(requests, "get", no_network)
    write_tiny_insightface_pack(os.path.join(models_root, "insightface", "misplaced"), landmarks=False, genderage=False)
    with pytest.raises(ModelFileError, match="was not found") as error:
        backend.load_insightface("misplaced", "CPU")
    assert "note the 'models' level" in str(error.value)


def test_detector_without_keypoints_is_refused(models_root):
    import onnx

    from onnx_face_models import deterministic_scrfd, tiny_arcface

    path = _pack_dir(models_root, "nokps")
    os.makedirs(path)
    onnx.save(deterministic_scrfd(6), os.path.join(path, "det_10g.onnx"))
    onnx.save(tiny_arcface(), os.path.join(path, "w600k_r50.onnx"))
    with pytest.raises(ModelFileError, match="no keypoint outputs"):
        backend.load_insightface("nokps", "CPU")


def test_truncated_file_is_a_model_file_error(models_root):
    path = _pack_dir(models_root, "broken")
    write_tiny_insightface_pack(path, landmarks=False, genderage=False)
    with open(os.path.join(path, "w600k_r50.onnx"), "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(ModelFileError, match="truncated"):
        backend.load_insightface("broken", "CPU")
    with open(os.path.join(path, "extra_model.onnx"), "wb") as handle:     # unknown name, unreadable: ignored
        handle.write(b"garbage")
    assert backend.scan_pack(path).ignored == ["extra_model.onnx (unreadable)"]


def test_provider_resolution_auto_is_cpu_without_torch_cuda(monkeypatch, caplog):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend.resolve_providers("auto") == ["CPUExecutionProvider"]
    assert backend.resolve_providers("CPU") == ["CPUExecutionProvider"]
    monkeypatch.setattr(backend, "available_ort_providers", lambda: ["CPUExecutionProvider"])
    backend._LOGGED.clear()
    with caplog.at_level(logging.WARNING, logger="likeness"):
        assert backend.resolve_providers("DirectML") == ["CPUExecutionProvider"]
        assert backend.resolve_providers("DirectML") == ["CPUExecutionProvider"]
    assert sum("DirectML" in r.getMessage() for r in caplog.records) == 1      # said once, not on every run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend, "available_ort_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(backend, "_provider_starts", lambda name: True)
    assert backend.resolve_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ValueError):
        backend.resolve_providers("TPU")


def test_listed_but_broken_gpu_provider_falls_back_quietly(monkeypatch, caplog):
    """onnxruntime-gpu lists CUDA without its libraries: probe once, one log line, CPU."""
    monkeypatch.setattr(backend, "available_ort_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(backend, "_provider_starts", lambda name: False)
    backend._LOGGED.clear()
    with caplog.at_level(logging.WARNING, logger="likeness"):
        for _ in range(3):
            assert backend.resolve_providers("CUDA") == ["CPUExecutionProvider"]
    assert sum("cannot start it" in r.getMessage() for r in caplog.records) == 1


def test_provider_probe_runs_a_real_session():
    assert backend._provider_starts("CPUExecutionProvider") is True
    assert backend._provider_starts("NoSuchExecutionProvider") is False


def test_analyze_batch_through_the_tiny_pack(tiny_pack):
    from likeness.face_analysis.analyze import analyze, draw_preview

    analyzer = backend.load_insightface(tiny_pack, "CPU")
    image_a = square_image(x=96, y=64)
    image_b = square_image(x=96, y=64)
    image_b[288:320, 448:480] = 255
    result = analyze(analyzer, as_image(image_a, image_b), selection="all")
    counts = [len(f) for f in result.faces.faces]
    assert counts == [1, 2]
    assert all(f.embedding.shape == (512,) for f in result.faces.all_faces())
    assert [f.image_index for f in result.faces.faces[1]] == [1, 1]
    preview = draw_preview(result)
    assert preview.shape == (2, 480, 640, 3)
