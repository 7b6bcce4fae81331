"""Likeness Metrics and Save Metrics in ComfyUI's real executor, with tiny CLIP / DINO folders in the models folder:
Load Image + an empty image -> Likeness Metrics (auto metrics, dlib judge) -> contact sheet, CSV and JSON files."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

pytestmark = pytest.mark.host


def metrics_prompt(image_name: str, prefix: str) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": 0}},
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "4": {"class_type": "LikenessMetrics", "inputs": {
            "images": ["3", 0], "references": ["1", 0], "metrics": "auto", "clip_model": "tiny-clip",
            "dino_model": "tiny-dino", "dlib_judge": True, "tile": 128, "prompt": "an astronaut",
            "second_photo": ["1", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 1], "filename_prefix": prefix}},
        "6": {"class_type": "LikenessSaveMetrics", "inputs": {
            "metrics": ["4", 2], "filename_prefix": prefix, "format": "csv+json"}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
    }


def test_metrics_nodes_run_in_a_graph(execute_prompt, host_env):
    pytest.importorskip("dlib")
    import skimage.data
    from PIL import Image

    from evaluation_support import write_tiny_evaluation_models
    from test_face_host import _save_input

    write_tiny_evaluation_models(host_env.models)
    image_name = _save_input(host_env, "likeness_metrics_astronaut.png", skimage.data.astronaut())
    outputs = execute_prompt(metrics_prompt(image_name, "likeness_metrics"))

    (sheet,) = outputs["5"]["images"]
    sheet_pixels = np.asarray(Image.open(os.path.join(host_env.output, sheet["subfolder"], sheet["filename"])))
    assert sheet_pixels.shape[1] == 2 * 128 + 3 * 6 and sheet_pixels.shape[0] > 128

    csv_name, json_name = outputs["6"]["text"]
    assert csv_name.startswith("likeness_metrics_") and csv_name.endswith("_metrics.csv")
    with open(os.path.join(host_env.output, csv_name), newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == ["0", "1"]
    assert float(rows[0]["facesim_dlib"]) == pytest.approx(1.0, abs=1e-5) and rows[0]["psnr"] == "inf"
    assert float(rows[0]["clip_i"]) == pytest.approx(1.0, abs=1e-5) and rows[0]["copy_flag"] == "0.0"
    assert rows[1]["facesim_dlib"] == "" and "no face in the image" in rows[1]["notes"]
    assert rows[1]["dino"] != "" and rows[1]["clip_t"] != ""             # whole-image metrics need no face
    with open(os.path.join(host_env.output, json_name), encoding="utf-8") as handle:
        data = json.load(handle)
    assert data["models"] == {"dlib": "dlib:resnet_v1", "clip": "tiny-clip", "dino": "tiny-dino"}
    assert data["summary"]["facesim_dlib"]["count"] == 1
