"""Benchmark: our insightface loader vs insightface's FaceAnalysis built per call, same images, same ONNX files.

    python benchmarks/face_analysis.py [--calls 5] [--keep DIR]

Builds a buffalo_l-shaped pack of realistic structure in a temp dir (exported with
``torch.onnx.export(dynamo=False)``): an SCRFD-layout detector (conv backbone, three FPN levels,
9 outputs, dynamic input), an ArcFace-layout ResNet recogniser (112 px, 512-D), a 106-point landmark
model, a 3D 68-point landmark model and a gender/age model. Small, but every model does real
convolution work. The detector's decisions are deterministic (white 32 px cells are "faces", so both
sides see the same faces), its convolutions still run in full.

Configurations, each analysing the same image list once per call:

- ours: ``load_insightface`` + ``analyze`` (IMAGE tensors in, FACES out; detection + recognition only,
  sessions cached across calls, as in a ComfyUI session);
- insightface per call: ``FaceAnalysis(name=<pack>)`` + ``prepare`` + ``get`` per image, every model of
  the pack, built on every call (what packs that build the analyser inside their apply node do);
- for reference, insightface built once and reused (all models, no rebuild).

Prints images per second of each and ``ratio N.NN`` = ours / insightface-per-call.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

DET_SIZE = 640


# ----------------------------------------------------------------------------------------- models

def _conv(cin, cout, stride=1, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class BenchSCRFD(nn.Module):
    """SCRFD layout: strides 8/16/32, 2 anchors, outputs scores x3, boxes x3, keypoints x3 (rank 2)."""

    anchors = 2

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, 24, 2), _conv(24, 32, 2), _conv(32, 32))
        self.c8 = nn.Sequential(_conv(32, 64, 2), _conv(64, 64))
        self.c16 = nn.Sequential(_conv(64, 96, 2), _conv(96, 96))
        self.c32 = nn.Sequential(_conv(96, 128, 2), _conv(128, 128))
        self.heads = nn.ModuleList(nn.Sequential(_conv(c, 64), _conv(64, 64)) for c in (64, 96, 128))
        self.score = nn.ModuleList(nn.Conv2d(64, self.anchors, 1) for _ in range(3))
        self.box = nn.ModuleList(nn.Conv2d(64, 4 * self.anchors, 1) for _ in range(3))
        self.kps = nn.ModuleList(nn.Conv2d(64, 10 * self.anchors, 1) for _ in range(3))
        self.register_buffer("box_d", torch.tensor([1.0, 0.5, 1.5, 2.0]).repeat(self.anchors))
        self.register_buffer("kps_d", torch.tensor([-.5, -.25, .5, -.25, 0, .25, -.375, .75, .375, .75]).repeat(self.anchors))

    def forward(self, x):
        gray = x.mean(1, keepdim=True)
        f8 = self.c8(self.stem(x))
        f16 = self.c16(f8)
        f32 = self.c32(f16)
        scores, boxes, points = [], [], []
        for level, (feature, stride) in enumerate(zip((f8, f16, f32), (8, 16, 32), strict=True)):
            head = self.heads[level](feature)
            raw_score = self.score[level](head)
            if stride == 32:   # deterministic decision: fully white 32 px cells (preprocessed ~+0.996)
                logit = 200.0 * (nn.functional.avg_pool2d(gray, 32) - 0.98) + 1e-4 * raw_score
            else:
                logit = -20.0 + 1e-4 * raw_score
            scores.append(torch.sigmoid(logit).permute(0, 2, 3, 1).reshape(-1, 1))
            box = self.box_d.view(1, -1, 1, 1) + 1e-4 * self.box[level](head)
            boxes.append(box.permute(0, 2, 3, 1).reshape(-1, 4))
            kps = self.kps_d.view(1, -1, 1, 1) + 1e-4 * self.kps[level](head)
            points.append(kps.permute(0, 2, 3, 1).reshape(-1, 10))
        return (*scores, *boxes, *points)


class BenchResNet(nn.Module):
    """A small ResNet-style encoder ``[N,3,S,S] -> [N,out]``."""

    def __init__(self, out: int, widths=(32, 64, 128, 256), activation=None):
        super().__init__()
        layers, cin = [_conv(3, widths[0], 2)], widths[0]
        for width in widths:
            layers += [_conv(cin, width, 2), _conv(width, width)]
            cin = width
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, out)
        self.activation = activation

    def forward(self, x):
        out = self.fc(self.pool(self.body(x)).flatten(1))
        return torch.tanh(out) * 0.5 if self.activation == "tanh" else out


def _export(module: nn.Module, shape, path: str, outputs: list[str], dynamic: dict) -> None:
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p, 0, 0.05)
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, torch.randn(*shape), path, input_names=["input.1"], output_names=outputs,
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)


def build_pack(directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    det_outputs = [f"score_{s}" for s in (8, 16, 32)] + [f"bbox_{s}" for s in (8, 16, 32)] + \
                  [f"kps_{s}" for s in (8, 16, 32)]
    _export(BenchSCRFD(), (1, 3, 640, 640), os.path.join(directory, "det_10g.onnx"), det_outputs,
            {"input.1": {2: "height", 3: "width"}, **{name: {0: f"n_{name}"} for name in det_outputs}})
    _export(BenchResNet(512), (1, 3, 112, 112), os.path.join(directory, "w600k_r50.onnx"), ["fc1"],
            {"input.1": {0: "batch"}, "fc1": {0: "batch"}})
    _export(BenchResNet(212, (32, 64, 96, 128), "tanh"), (1, 3, 192, 192), os.path.join(directory, "2d106det.onnx"),
            ["fc1"], {})
    _export(BenchResNet(3309, (32, 64, 96, 128), "tanh"), (1, 3, 192, 192), os.path.join(directory, "1k3d68.onnx"),
            ["fc1"], {})
    _export(BenchResNet(3, (16, 32, 64, 64)), (1, 3, 96, 96), os.path.join(directory, "genderage.onnx"), ["fc1"], {})
    return directory


# ----------------------------------------------------------------------------------------- images

def bench_images() -> list[np.ndarray]:
    """Packaged photos with white squares on the detector's 32 px grid (after letterboxing to 640)."""
    import cv2
    import skimage.data

    from face_fixtures import insightface_t1

    astronaut = skimage.data.astronaut()                       # 512 -> 640: scale 1.25
    t1 = insightface_t1()                                       # 1280x886 -> 640x443: scale 0.5
    images = []
    for image, scale, cells in ((astronaut, 1.25, [(5, 3)]), (t1, 0.5, [(2, 2), (9, 4), (15, 3)])):
        image = image.copy()
        for col, row in cells:
            x0, y0 = int(np.floor(col * 32 / scale)), int(np.floor(row * 32 / scale))
            x1, y1 = int(np.ceil((col + 1) * 32 / scale)), int(np.ceil((row + 1) * 32 / scale))
            image[y0:y1, x0:x1] = 255
        images.append(image)
    images.append(cv2.resize(images[0], (768, 768)))
    images.append(cv2.resize(images[1], (960, 664)))
    return images


# ----------------------------------------------------------------------------------------- runs

def run_ours(pack_root: str, images: list[np.ndarray], calls: int) -> tuple[float, float, list[int]]:
    from _bootstrap import load_pack

    load_pack()
    from likeness.face_analysis.analyze import analyze
    from likeness.face_analysis.analyzers import insightface_backend as backend
    from likeness.host import folders

    folders.folder_candidates = lambda folder: [os.path.join(pack_root, "insightface")]
    tensors = [torch.from_numpy(image).float()[None] / 255.0 for image in images]
    start = time.perf_counter()
    backend.load_insightface("bench", "CPU", det_size=DET_SIZE)                  # cold load, cached afterwards
    cold = time.perf_counter() - start
    counts = []
    start = time.perf_counter()
    for _ in range(calls):
        analyzer = backend.load_insightface("bench", "CPU", det_size=DET_SIZE)  # what every run of the node does
        counts = [len(analyze(analyzer, t, selection="all", on_no_face="pass_through", retry=False,
                              landmarks=False).faces.faces[0]) for t in tensors]
    return (calls * len(images)) / (time.perf_counter() - start), cold, counts


def _insightface_app(pack_dir: str):
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=pack_dir, providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_size=(DET_SIZE, DET_SIZE))
    return app


def run_insightface(pack_dir: str, images: list[np.ndarray], calls: int, rebuild: bool) -> tuple[float, list[int]]:
    bgr = [np.ascontiguousarray(image[..., ::-1]) for image in images]
    app = None if rebuild else _insightface_app(pack_dir)
    counts = []
    start = time.perf_counter()
    for _ in range(calls):
        if rebuild:
            app = _insightface_app(pack_dir)
        counts = [len(app.get(image)) for image in bgr]
    return (calls * len(images)) / (time.perf_counter() - start), counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5, help="calls per configuration (each analyses every image)")
    parser.add_argument("--keep", help="build the pack in this folder and keep it")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    root = args.keep or tempfile.mkdtemp(prefix="likeness-bench-")
    pack_dir = os.path.join(root, "insightface", "models", "bench")
    try:
        build_pack(pack_dir)
        sizes = {f: os.path.getsize(os.path.join(pack_dir, f)) for f in sorted(os.listdir(pack_dir))}
        print("pack:", ", ".join(f"{f} {s / 1e6:.1f} MB" for f, s in sizes.items()))
        images = bench_images()
        print("images:", ", ".join(f"{i.shape[1]}x{i.shape[0]}" for i in images), f"| calls: {args.calls}",
              f"| det size {DET_SIZE} | threads: torch {torch.get_num_threads()}")
        ours, cold, ours_counts = run_ours(root, images, args.calls)
        theirs, their_counts = run_insightface(pack_dir, images, args.calls, rebuild=True)
        reused, _ = run_insightface(pack_dir, images, args.calls, rebuild=False)
        assert ours_counts == their_counts, (ours_counts, their_counts)
        print(f"faces per image: {ours_counts}")
        print(f"ours (det+rec, sessions cached; cold load {cold:.2f} s once): {ours:8.2f} images/s")
        print(f"insightface FaceAnalysis built per call (all 5 models):   {theirs:8.2f} images/s")
        print(f"insightface FaceAnalysis built once (all 5 models, ref): {reused:8.2f} images/s")
        print(f"ratio {ours / theirs:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
