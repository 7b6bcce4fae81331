"""Tiny ONNX files with insightface's real I/O conventions, built with ``onnx.helper`` (no torch export).

Reusable by any test (host tests, parsing/pose tests): ``write_tiny_insightface_pack(dir)`` writes a
buffalo_l-shaped pack that insightface's own ``model_zoo`` routes exactly like the real files
(see ``../shared/notes/offline_models.md`` §4):

- ``det_10g.onnx``: a deterministic SCRFD-layout detector. Input ``[1,3,H,W]`` (dynamic H/W), outputs
  scores, then boxes, then keypoints per stride, each rank 2 (``[N,k]``) or rank 3 (``[1,N,k]``,
  "batched"). Score = sigmoid(20 · mean of the preprocessed pixels over the cell) at stride 32 only (other
  strides ~0), box and keypoint distances constant. So a white square on black, aligned to the
  32-pixel grid, gives one face per fully white 32x32 cell, with an anchor at the cell's top-left
  corner: box = anchor + (-l, -t, +r, +b)·32, keypoints = anchor + d·32 (see :func:`expected_faces`).
- ``w600k_r50.onnx``: ArcFace-layout recogniser, ``[N,3,112,112] -> [N,512]`` (8x8 average pool,
  flatten, fixed random projection): deterministic, sensitive to where things are in the crop.
- ``2d106det.onnx`` (optional): landmark layout ``[1,3,192,192] -> [1,212]``.
- ``1k3d68.onnx`` (optional): 3D landmark layout ``[1,3,192,192] -> [1,3309]`` (gives 68 points + pose).
- ``genderage.onnx`` (optional): attribute layout ``[1,3,96,96] -> [1,3]``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import numpy as np

STRIDE = 32                                 # the only active stride of the deterministic detector
BOX_DISTANCES = (1.0, 0.5, 1.5, 2.0)        # left, top, right, bottom, in stride units
KPS_DISTANCES = (-0.5, -0.25, 0.5, -0.25, 0.0, 0.25, -0.375, 0.75, 0.375, 0.75)  # x,y of 5 points, stride units
OPSET = 17


def _helpers():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    return onnx, TensorProto, helper, numpy_helper


def _const(numpy_helper, name: str, value) -> object:
    return numpy_helper.from_array(np.asarray(value), name)


def deterministic_scrfd(outputs: int = 9, batched: bool = False, box=BOX_DISTANCES, kps=KPS_DISTANCES,
                        fixed_size: tuple[int, int] | None = None):
    """The deterministic SCRFD-layout detector as an ``onnx.ModelProto`` (9/15 outputs, or 6/10 without kps)."""
    onnx, TensorProto, helper, numpy_helper = _helpers()
    if outputs in (6, 9):
        strides, anchors = (8, 16, 32), 2
    elif outputs in (10, 15):
        strides, anchors = (8, 16, 32, 64, 128), 1
    else:
        raise ValueError("SCRFD layouts have 6, 9, 10 or 15 outputs")
    with_kps = outputs in (9, 15)
    height, width = fixed_size if fixed_size else ("height", "width")
    nodes, inits = [], [
        _const(numpy_helper, "gray_w", np.full((1, 3, 1, 1), 1.0 / 3.0, np.float32)),
        _const(numpy_helper, "zero", np.float32(0.0)),
        _const(numpy_helper, "gain", np.float32(20.0)),
        _const(numpy_helper, "off", np.float32(-20.0)),
        _const(numpy_helper, "box_d", np.tile(np.asarray(box, np.float32), anchors).reshape(1, 1, 1, 4 * anchors)),
        _const(numpy_helper, "kps_d", np.tile(np.asarray(kps, np.float32), anchors).reshape(1, 1, 1, 10 * anchors)),
        _const(numpy_helper, "shape1", np.array([1, -1, 1] if batched else [-1, 1], np.int64)),
        _const(numpy_helper, "shape4", np.array([1, -1, 4] if batched else [-1, 4], np.int64)),
        _const(numpy_helper, "shape10", np.array([1, -1, 10] if batched else [-1, 10], np.int64)),
    ]
    nodes.append(helper.make_node("Conv", ["input.1", "gray_w"], ["gray"], name="gray"))
    scores, boxes, points = [], [], []
    for s in strides:
        nodes.append(helper.make_node("AveragePool", ["gray"], [f"pool{s}"], kernel_shape=[s, s], strides=[s, s],
                                      name=f"pool{s}"))
        nodes.append(helper.make_node("Transpose", [f"pool{s}"], [f"cells{s}"], perm=[0, 2, 3, 1], name=f"t{s}"))
        if s == STRIDE:
            nodes.append(helper.make_node("Mul", [f"cells{s}", "gain"], [f"logit{s}"], name=f"gain{s}"))
        else:
            nodes.append(helper.make_node("Mul", [f"cells{s}", "zero"], [f"z{s}"], name=f"zero{s}"))
            nodes.append(helper.make_node("Add", [f"z{s}", "off"], [f"logit{s}"], name=f"off{s}"))
        nodes.append(helper.make_node("Sigmoid", [f"logit{s}"], [f"sig{s}"], name=f"sig{s}"))
        nodes.append(helper.make_node("Concat", [f"sig{s}"] * anchors, [f"sigA{s}"], axis=3, name=f"anc{s}"))
        nodes.append(helper.make_node("Reshape", [f"sigA{s}", "shape1"], [f"score_{s}"], name=f"score{s}"))
        nodes.append(helper.make_node("Mul", [f"cells{s}", "zero"], [f"zc{s}"], name=f"zc{s}"))
        nodes.append(helper.make_node("Add", [f"zc{s}", "box_d"], [f"bd{s}"], name=f"bd{s}"))
        nodes.append(helper.make_node("Reshape", [f"bd{s}", "shape4"], [f"bbox_{s}"], name=f"bbox{s}"))
        nodes.append(helper.make_node("Add", [f"zc{s}", "kps_d"], [f"kd{s}"], name=f"kd{s}"))
        nodes.append(helper.make_node("Reshape", [f"kd{s}", "shape10"], [f"kps_{s}"], name=f"kps{s}"))
        scores.append((f"score_{s}", 1))
        boxes.append((f"bbox_{s}", 4))
        points.append((f"kps_{s}", 10))
    out_specs = scores + boxes + (points if with_kps else [])
    graph_outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, f"n{name}", k] if batched else [f"n{name}", k])
        for name, k in out_specs]
    graph = helper.make_graph(nodes, "tiny_scrfd", [
        helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, height, width])], graph_outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _linear_model(name: str, input_hw: int, pool: int, out_dim: int, seed: int, activation: str | None = None,
                  batch="batch"):
    """[N,3,S,S] -> average pool -> flatten -> fixed random projection -> [N,out_dim]."""
    onnx, TensorProto, helper, numpy_helper = _helpers()
    cells = (input_hw // pool) ** 2 * 3
    weights = (np.random.default_rng(seed).standard_normal((cells, out_dim)) / np.sqrt(cells)).astype(np.float32)
    nodes = [helper.make_node("AveragePool", ["data"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool],
                              name="pool"),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"),
             helper.make_node("MatMul", ["flat", "proj_w"], ["proj" if activation else "fc1"], name="proj")]
    if activation:
        nodes.append(helper.make_node(activation, ["proj"], ["fc1"], name="act"))
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, input_hw, input_hw])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [batch, out_dim])],
        [numpy_helper.from_array(weights, "proj_w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny_arcface(dim: int = 512, size: int = 112, seed: int = 0):
    return _linear_model("tiny_arcface", size, 8, dim, seed)


def tiny_landmark_106(seed: int = 1):
    return _linear_model("tiny_2d106", 192, 16, 212, seed, activation="Tanh", batch=1)


def tiny_landmark_3d68(seed: int = 3):
    """insightface's 1k3d68 layout: ``[1,3,192,192] -> [1,3309]`` (the last 68 x/y/z rows are the landmarks)."""
    return _linear_model("tiny_3d68", 192, 16, 3309, seed, activation="Tanh", batch=1)


def tiny_genderage(seed: int = 2):
    return _linear_model("tiny_genderage", 96, 8, 3, seed, batch=1)


@contextlib.contextmanager
def tiny_pack_installed(models_root: str, name: str) -> Iterator[str]:
    """The tiny pack as ``models/insightface/models/<name>`` of a shared models folder while inside, removed after:
    a test that leaves it there would hide the missing-pack messages other tests check."""
    directory = os.path.join(models_root, "insightface", "models", name)
    existed = os.path.exists(directory)
    write_tiny_insightface_pack(directory)
    try:
        yield directory
    finally:
        if not existed:
            shutil.rmtree(directory, ignore_errors=True)


def write_tiny_insightface_pack(directory: str, detector_outputs: int = 9, batched: bool = False,
                                landmarks: bool = True, genderage: bool = True, embedding_dim: int = 512,
                                names: dict[str, str] | None = None, landmarks_3d: bool = False) -> str:
    """Write a buffalo_l-shaped tiny pack into ``directory`` (created); returns the directory.

    ``names`` renames files (keys ``det``, ``rec``, ``lmk``, ``ga``, ``lmk3d``) to test routing by graph
    shapes; ``landmarks_3d`` adds ``1k3d68.onnx`` (68 points + head pose through insightface's mean shape).
    """
    import onnx

    names = {"det": "det_10g.onnx", "rec": "w600k_r50.onnx", "lmk": "2d106det.onnx", "ga": "genderage.onnx",
             "lmk3d": "1k3d68.onnx", **(names or {})}
    os.makedirs(directory, exist_ok=True)
    onnx.save(deterministic_scrfd(detector_outputs, batched), os.path.join(directory, names["det"]))
    onnx.save(tiny_arcface(embedding_dim), os.path.join(directory, names["rec"]))
    if landmarks:
        onnx.save(tiny_landmark_106(), os.path.join(directory, names["lmk"]))
    if genderage:
        onnx.save(tiny_genderage(), os.path.join(directory, names["ga"]))
    if landmarks_3d:
        onnx.save(tiny_landmark_3d68(), os.path.join(directory, names["lmk3d"]))
    return directory


def square_image(height: int = 480, width: int = 640, x: int = 320, y: int = 192, side: int = 32) -> np.ndarray:
    """uint8 RGB black image with one white square (put it on the 32-pixel grid for exact results)."""
    image = np.zeros((height, width, 3), np.uint8)
    image[y:y + side, x:x + side] = 255
    return image


def expected_faces(white_cells: list[tuple[int, int]], scale: float = 1.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(bbox, kps) the deterministic detector gives for fully white stride-32 cells ``(col, row)``, in order.

    Independent of insightface: anchor = (col, row)·32 (insightface anchors sit on cell corners), box =
    anchor + (-l, -t, r, b)·32, keypoints = anchor + d·32, divided by the letterbox scale of the image.
    """
    out = []
    left, top, right, bottom = BOX_DISTANCES
    for col, row in white_cells:
        ax, ay = col * STRIDE, row * STRIDE
        bbox = np.array([ax - left * STRIDE, ay - top * STRIDE, ax + right * STRIDE, ay + bottom * STRIDE], np.float32)
        kps = np.array([[ax + KPS_DISTANCES[2 * i] * STRIDE, ay + KPS_DISTANCES[2 * i + 1] * STRIDE] for i in range(5)],
                       np.float32)
        out.append((bbox / scale, kps / scale))
    return out
