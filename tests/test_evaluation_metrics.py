"""Likeness metrics on known inputs: identical images, real same-/different-person photos, FGIS region swaps,
the copy-paste flag, missing faces, model folders, and the report files."""
from __future__ import annotations

import csv
import json
import math
import os

import cv2
import numpy as np
import pytest
import torch

from evaluation_support import write_tiny_evaluation_models
from face_fixtures import as_image, astronaut, insightface_t1, use_models_dir
from likeness.errors import InvalidInputError, ModelFileError
from likeness.evaluation import (
    COPY_PASTE_MARGIN,
    METRICS,
    MetricModels,
    compute_metrics,
    contact_sheet,
    format_table,
    metric_columns,
    parse_metric_names,
    summarize,
    write_csv,
    write_json,
)
from likeness.evaluation.pixels import outside_mask_change, psnr, ssim

pytest.importorskip("dlib")


@pytest.fixture(scope="module")
def evaluation_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("models"))
    write_tiny_evaluation_models(root)
    return root


@pytest.fixture
def models(evaluation_root, monkeypatch) -> MetricModels:
    use_models_dir(monkeypatch, evaluation_root)
    return MetricModels.from_folders(dlib=True, clip="tiny-clip", dino="tiny-dino", device="cpu")


def _blurred(image: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), 3)


def _low_resolution(image: np.ndarray) -> np.ndarray:
    """The same person as a 160 px capture shown at full size (another real photo, not a copy)."""
    height, width = image.shape[:2]
    return cv2.resize(cv2.resize(image, (160, 160), interpolation=cv2.INTER_AREA), (width, height))


def test_identical_images_score_one_and_infinite_psnr(models):
    photo = as_image(astronaut())
    mask = torch.zeros(1, 512, 512)
    mask[:, 150:350, 180:330] = 1.0
    row, = compute_metrics(photo, references=photo, prompts="an astronaut", masks=mask, models=models,
                           metrics="facesim_dlib,clip_i,dino,fgis,psnr_ssim,outside_mask,clip_t")
    for column in ("facesim_dlib", "clip_i", "dino", "fgis", "ssim"):
        assert row[column] == pytest.approx(1.0, abs=1e-5), column
    assert row["dlib_l2"] == pytest.approx(0.0, abs=1e-6)
    assert math.isinf(row["psnr"]) and math.isinf(row["outside_psnr"]) and row["outside_mad"] == 0.0
    assert -1.0 <= row["clip_t"] <= 1.0 and row["notes"] == ""


def test_arcface_and_second_recogniser_facesim_of_an_image_with_itself_is_one(tiny_pack):
    pytest.importorskip("insightface")
    from onnx_face_models import square_image

    models = MetricModels.from_folders(insightface_pack=tiny_pack, second_pack=tiny_pack)
    image = as_image(square_image(x=96, y=64))
    row, = compute_metrics(image, references=image, models=models,
                           metrics=["facesim_arcface", "facesim_second", "psnr_ssim"])
    assert row["facesim_arcface"] == pytest.approx(1.0, abs=1e-5) and math.isinf(row["psnr"])
    assert row["facesim_second"] == pytest.approx(1.0, abs=1e-5)


def test_dlib_scores_same_person_pairs_above_different_people(models):
    """Flip, crop and brightness changes of the astronaut (the dlib tests' same-person pairs) against people of
    insightface's t1.jpg (the best-matching face of two)."""
    photo = astronaut()
    same = [photo[:, ::-1].copy(), cv2.resize(photo[40:440, 100:500], (512, 512)),
            np.clip(photo.astype(np.int16) + 40, 0, 255).astype(np.uint8)]
    rows = compute_metrics(as_image(*same), references=as_image(photo), models=models, metrics="facesim_dlib")
    stranger, = compute_metrics(as_image(_strangers()), references=as_image(photo), models=models, metrics="facesim_dlib")
    assert min(r["facesim_dlib"] for r in rows) > stranger["facesim_dlib"]
    assert max(r["dlib_l2"] for r in rows) < 0.6 < stranger["dlib_l2"]


def _strangers() -> np.ndarray:
    """512 x 512 of insightface's t1.jpg with two people in it (neither is the astronaut)."""
    return np.ascontiguousarray(insightface_t1()[140:652, 260:772])


def _swap_mouth(image: np.ndarray) -> np.ndarray:
    """The astronaut with another person's mouth (t1.jpg's third face); boxes measured on dlib's 68 landmarks."""
    donor = cv2.resize(insightface_t1()[363:402, 476:536], (54, 28), interpolation=cv2.INTER_AREA)
    swapped = image.copy()
    swapped[134:162, 196:250] = donor
    return swapped


def test_fgis_is_one_with_itself_and_lower_with_a_region_swapped(models):
    photo = astronaut()
    rows = compute_metrics(as_image(photo, _swap_mouth(photo)), references=as_image(photo), models=models,
                           metrics="fgis")
    assert rows[0]["fgis"] == pytest.approx(1.0, abs=1e-5)
    assert rows[1]["fgis"] < 0.95                   # one region of five changed


def test_copy_paste_flags_the_reference_itself_but_not_another_real_photo(models):
    photo = astronaut()
    rows = compute_metrics(as_image(photo, _blurred(photo)), references=as_image(photo),
                           second_photos=as_image(_low_resolution(photo)), models=models, metrics="copy_paste")
    copied, real = rows
    assert copied["copy_flag"] == 1.0 and real["copy_flag"] == 0.0
    assert copied["copy_sim_ref"] == pytest.approx(1.0)                 # dlib: 1 - L2, identical photo
    assert copied["copy_ceiling"] == real["copy_ceiling"] < 1.0
    assert copied["copy_excess"] > COPY_PASTE_MARGIN >= real["copy_excess"]
    assert copied["copy_sim_second"] == pytest.approx(copied["copy_ceiling"])


def test_an_image_without_a_face_is_a_missing_cell_with_its_reason(models):
    photo = astronaut()
    rows = compute_metrics(as_image(photo, np.zeros_like(photo)), references=as_image(photo), models=models,
                           metrics="facesim_dlib,psnr_ssim,fgis,dino")
    assert rows[0]["notes"] == ""
    blank = rows[1]
    assert blank["facesim_dlib"] is None and blank["psnr"] is None and blank["fgis"] is None
    assert blank["dino"] is not None                        # whole-image metrics need no face
    assert "no face in the image (dlib)" in blank["notes"] and "facesim_dlib, dlib_l2" in blank["notes"]
    assert "image 1:" in format_table(rows)


def test_reference_without_a_face_names_the_reference(models):
    photo = astronaut()
    row, = compute_metrics(as_image(photo), references=as_image(np.zeros_like(photo)), models=models,
                           metrics="facesim_dlib")
    assert row["facesim_dlib"] is None and "no face in references image 0" in row["notes"]


def test_mixing_balance_reuses_the_readout(models):
    photo = astronaut()
    row, = compute_metrics(as_image(photo), references=as_image(photo), mix_sources=as_image(photo, _strangers()),
                           models=models, metrics="mixing")
    assert row["mix_cos_0"] == pytest.approx(1.0, abs=1e-6) and row["mix_cos_0"] > row["mix_cos_1"]
    assert row["mix_share_0"] + row["mix_share_1"] == pytest.approx(1.0)


def test_clip_t_follows_the_prompt_and_checks_the_prompt_count(models):
    photo = as_image(astronaut())
    rows = compute_metrics(torch.cat([photo, photo]), references=photo, prompts=["an astronaut", "zzz qqq"],
                           models=models, metrics="clip_t")
    assert rows[0]["clip_t"] != pytest.approx(rows[1]["clip_t"])
    with pytest.raises(InvalidInputError, match="3 prompts for 2 images"):
        compute_metrics(torch.cat([photo, photo]), references=photo, prompts=["a", "b", "c"], models=models,
                        metrics="clip_t")


def test_metrics_without_their_model_or_input_are_refused_and_the_default_takes_what_is_given(models):
    photo = as_image(astronaut())
    with pytest.raises(InvalidInputError, match="needs the arcface model"):
        compute_metrics(photo, references=photo, models=models, metrics="facesim_arcface")
    with pytest.raises(InvalidInputError, match="'prompts' input"):
        compute_metrics(photo, references=photo, models=MetricModels(clip=models.clip), metrics="clip_t")
    row, = compute_metrics(photo, references=photo, models=MetricModels(dino=models.dino))
    assert set(row) == {"image", "dino", "notes"}
    with pytest.raises(InvalidInputError, match="unknown metric 'fid'"):
        parse_metric_names("dino, fid")


def test_wrong_model_folders_give_clear_messages(evaluation_root, monkeypatch):
    use_models_dir(monkeypatch, evaluation_root)
    with pytest.raises(ModelFileError, match="models/likeness/evaluation") as missing:
        MetricModels.from_folders(clip="no-such-clip")
    assert "models fetch clip-vit-large-patch14-weights clip-vit-large-patch14-config" in str(missing.value)
    with pytest.raises(ModelFileError, match="models fetch dino-vits16-weights dino-vits16-config"):
        MetricModels.from_folders(dino="dino-vits16")
    with pytest.raises(ModelFileError, match="'vit' model; CLIP-T and CLIP-I need a full CLIP"):
        MetricModels.from_folders(clip="tiny-dino")
    with pytest.raises(ModelFileError, match="needs a ViT"):
        MetricModels.from_folders(dino="tiny-clip")
    os.makedirs(os.path.join(evaluation_root, "likeness", "evaluation", "empty"), exist_ok=True)
    with pytest.raises(ModelFileError, match="no config.json"):
        MetricModels.from_folders(dino="empty")


def test_psnr_and_ssim_match_their_definitions():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(64, 64, 3, generator=generator, dtype=torch.float64)
    b = (a + 0.1).clamp(0, 1)
    mse = float(((a - b) ** 2).mean())
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / mse)) and math.isinf(psnr(a, a))
    expected = skimage_metrics.structural_similarity(a.numpy(), b.numpy(), data_range=1.0, channel_axis=2,
                                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim(a, b) == pytest.approx(expected, abs=1e-6) and ssim(a, a) == pytest.approx(1.0)


def test_outside_mask_change_ignores_the_inside():
    source = torch.rand(32, 32, 3)
    mask = torch.zeros(32, 32)
    mask[8:24, 8:24] = 1.0
    edited = source.clone()
    edited[8:24, 8:24] = 0.0
    assert outside_mask_change(edited, source, mask) == (0.0, math.inf)
    edited[0, 0] = 1.0 - source[0, 0]
    mad, value = outside_mask_change(edited, source, mask)
    assert mad > 0 and math.isfinite(value)
    assert outside_mask_change(edited, source, torch.ones(32, 32)) == "the mask covers the whole image"
    assert "compare at one size" in outside_mask_change(edited, source[:16], mask)


def test_registry_columns_and_definitions():
    assert all(d.definition and d.columns for d in METRICS.values())
    assert metric_columns(["copy_paste", "mixing"], mix_count=2) == [
        "copy_sim_ref", "copy_sim_second", "copy_ceiling", "copy_excess", "copy_flag",
        "mix_cos_0", "mix_cos_1", "mix_share_0", "mix_share_1"]


def test_report_files_summary_and_contact_sheet(tmp_path):
    rows = [{"image": 0, "psnr": math.inf, "dino": 0.5, "notes": ""},
            {"image": 1, "psnr": 20.0, "dino": None, "notes": "dino: no face"},
            {"image": 2, "psnr": 30.0, "dino": 0.7, "notes": ""}]
    summary = summarize(rows)
    assert summary["dino"] == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1), "count": 2}
    assert math.isinf(summary["psnr"]["mean"])
    with open(write_csv(rows, str(tmp_path / "m.csv")), newline="", encoding="utf-8") as handle:
        read = list(csv.DictReader(handle))
    assert read[0]["psnr"] == "inf" and read[1]["dino"] == "" and read[1]["notes"] == "dino: no face"
    with open(write_json(rows, str(tmp_path / "m.json")), encoding="utf-8") as handle:
        data = json.load(handle)
    assert data["rows"][0]["psnr"] == "inf" and data["rows"][1]["dino"] is None
    assert data["summary"]["psnr"]["mean"] == "inf" and data["summary"]["dino"]["count"] == 2
    sheet = contact_sheet(torch.rand(3, 40, 60, 3), rows, tile=96, per_row=2)
    assert sheet.shape[0] == 1 and sheet.shape[-1] == 3 and sheet.shape[2] == 2 * 96 + 3 * 6
    assert 0.0 <= float(sheet.min()) and float(sheet.max()) <= 1.0


def test_grayscale_generations_are_measured_as_rgb(models):
    photo = astronaut()
    grey = torch.from_numpy(cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)).float()[None, ..., None] / 255
    row, = compute_metrics(grey, references=as_image(photo), models=models, metrics="facesim_dlib,dino")
    assert row["dlib_l2"] < 0.6 and row["dino"] is not None


def test_output_stems_are_numbered_and_held_to_the_output_folder(tmp_path, monkeypatch):
    from likeness.errors import PathNotAllowedError
    from likeness.host.folders import new_output_stem

    monkeypatch.setenv("LIKENESS_OUTPUT_DIR", str(tmp_path))
    first = new_output_stem("runs/portrait", "metrics")
    assert first == os.path.join(str(tmp_path), "runs", "portrait_00001_metrics")
    with open(first + ".csv", "w", encoding="utf-8"):
        pass
    assert new_output_stem("runs/portrait", "metrics").endswith("portrait_00002_metrics")
    with pytest.raises(PathNotAllowedError, match="leads out of the output folder"):
        new_output_stem("../elsewhere", "metrics")


def test_node_prompt_input_is_one_prompt_or_one_line_per_image():
    from likeness.nodes.metrics import split_prompts

    assert split_prompts("  ", 2) is None
    assert split_prompts("a cat\na dog", 2) == ["a cat", "a dog"]
    assert split_prompts("a portrait\nsoft light", 3) == "a portrait soft light"


def test_a_model_folder_of_the_wrong_kind_is_refused_naming_it(tmp_path):
    from evaluation_support import write_tiny_clip, write_tiny_dino
    from likeness.evaluation.encoders import load_clip, load_dino
    from likeness.host.paths import local_user_paths

    dino = write_tiny_dino(str(tmp_path / "dino"))
    clip = write_tiny_clip(str(tmp_path / "clip"))
    # the folders are outside ComfyUI's models folder: read them as the command line does (the server's path rule
    # has its own tests), so the check under test is the model kind also where ComfyUI is on the path
    with local_user_paths():
        with pytest.raises(ModelFileError, match="holds a 'vit' model; CLIP-T and CLIP-I need a full CLIP model"):
            load_clip(dino)
        with pytest.raises(ModelFileError, match="holds a 'clip' model; the DINO metric needs a ViT"):
            load_dino(clip)
