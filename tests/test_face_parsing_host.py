"""Parsing and pose nodes in ComfyUI's real executor (in-process): Load Image -> dlib analyzer -> Analyze
-> Face Regions (landmark parser and a BiSeNet file) / Keypoint Map / Landmark Map / Head Pose.

The chain reuses :func:`test_face_host.face_chain` (nodes 1-11) and adds nodes 30+.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.host


def _saved(host_env, outputs: dict, node_id: str) -> np.ndarray:
    from PIL import Image

    (item,) = outputs[node_id]["images"]
    return np.asarray(Image.open(os.path.join(host_env.output, item["subfolder"], item["filename"])))


def parsing_and_pose_nodes(bisenet_name: str) -> dict:
    save = lambda source, prefix: {"class_type": "SaveImage", "inputs": {"images": source, "filename_prefix": prefix}}  # noqa: E731
    return {
        "30": {"class_type": "LikenessFaceParserLoader", "inputs": {"parser": "landmarks (no weights)", "device": "auto"}},
        "31": {"class_type": "LikenessFaceRegions", "inputs": {
            "image": ["1", 0], "faces": ["3", 0], "parser": ["30", 0], "region": "left_eye", "grow": 2, "feather": 2,
            "extra_regions": "right_eye, nose, mouth_and_lips", "face_index": -1, "crop_scale": 2.2}},
        "32": {"class_type": "MaskToImage", "inputs": {"mask": ["31", 0]}},
        "33": save(["32", 0], "likeness_parse_mask"),
        "34": save(["31", 1], "likeness_parse_map"),
        "35": {"class_type": "LikenessFaceKeypointMap", "inputs": {"faces": ["3", 0], "face_index": -1}},
        "36": save(["35", 0], "likeness_kps_map"),
        "37": {"class_type": "LikenessFaceLandmarkMap", "inputs": {
            "faces": ["3", 0], "style": "lines", "thickness": 0, "point_radius": 3, "face_index": -1}},
        "38": save(["37", 0], "likeness_landmark_map"),
        "39": {"class_type": "LikenessHeadPose", "inputs": {"faces": ["3", 0], "image_index": 0, "face_index": 0}},
        "40": {"class_type": "PreviewAny", "inputs": {"source": ["39", 0]}},
        "41": {"class_type": "LikenessFaceParserLoader", "inputs": {"parser": bisenet_name, "device": "cpu"}},
        "42": {"class_type": "LikenessFaceRegions", "inputs": {
            "image": ["1", 0], "faces": ["3", 0], "parser": ["41", 0], "region": "whole_face", "grow": 0, "feather": 0}},
        "43": save(["42", 1], "likeness_bisenet_map"),
        "44": {"class_type": "EmptyImage", "inputs": {"width": 256, "height": 384, "batch_size": 1, "color": 0}},
        "45": {"class_type": "LikenessFaceKeypointMap", "inputs": {
            "faces": ["3", 0], "face_index": -1, "size_from": ["44", 0], "resize_mode": "fit"}},
        "46": save(["45", 0], "likeness_kps_map_resized"),
    }


def test_parsing_and_pose_nodes_in_the_real_executor(execute_prompt, host_env):
    pytest.importorskip("dlib")
    import skimage.data
    import torch

    from test_face_host import _save_input, face_chain
    from test_face_parsing import state_dict_from_layout

    parsing_dir = os.path.join(host_env.models, "likeness", "parsing")
    os.makedirs(parsing_dir, exist_ok=True)
    torch.save(state_dict_from_layout(), os.path.join(parsing_dir, "likeness_random_bisenet.pth"))
    image = skimage.data.astronaut()
    image_name = _save_input(host_env, "likeness_parse_astronaut.png", image)
    loader = {"class_type": "LikenessDlibFaceLoader", "inputs": {
        "detector": "HOG", "landmarks": "68", "jitters": 0, "det_size": 1600, "upsample": 0}}
    prompt = face_chain(loader, image_name, "likeness_parse")
    prompt.update(parsing_and_pose_nodes("likeness_random_bisenet.pth"))
    outputs = execute_prompt(prompt)

    mask = _saved(host_env, outputs, "33")[..., 0]
    assert mask.shape == (512, 512)
    ys, xs = np.nonzero(mask > 127)
    assert len(ys) > 200 and 150 < xs.mean() < 300 and 80 < ys.mean() < 180  # eyes, nose, mouth of the face

    parse_map = _saved(host_env, outputs, "34")
    assert parse_map.shape == (512, 512, 3)
    assert (parse_map.reshape(-1, 3) == (204, 0, 0)).all(axis=1).sum() > 1000  # CelebAMask-HQ skin colour

    kps_map = _saved(host_env, outputs, "36")
    assert kps_map.shape == (512, 512, 3)
    colours = {tuple(c) for c in kps_map.reshape(-1, 3).tolist()}
    assert {(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (153, 0, 0)} <= colours

    assert _saved(host_env, outputs, "38").shape == (512, 512, 3)
    readout = outputs["40"]["text"][0]
    assert readout.startswith("image 0 face 0: yaw") and "68 landmarks" in readout
    assert _saved(host_env, outputs, "43").shape == (512, 512, 3)
    assert _saved(host_env, outputs, "46").shape == (384, 256, 3)
