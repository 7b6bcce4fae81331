"""Benchmark: metric throughput (images/s) of FaceSim + CLIP-T + CLIP-I + DINO, batched vs one image at a time.

    python benchmarks/evaluation_throughput.py [--clip vit-l-14|vit-b-16] [--images 4] [--rounds 2] [--device cpu]

Full-size architectures with random weights (nothing is downloaded): CLIP ViT-L/14 (or ViT-B/16) with its
text tower, DINO ViT-S/16 (transformers ViTModel), and dlib's real 128-D recogniser for FaceSim (it ships with
face-recognition-models). Inputs are 512 px images with a face (the astronaut, flipped / shifted / brightened)
and one reference.

Configurations, each measuring the same images once per round, rounds interleaved in random order:

- batched: one ``compute_metrics`` call on the whole batch, CLIP and DINO see ``--images`` images at once;
- one at a time: one ``compute_metrics`` call per image (``batch_size`` 1), what a per-image loop does (the
  reference is analysed and embedded again in every call, as such a loop would).

Prints the configuration, images/s per configuration (median and range over rounds) and the ratio
batched / one-at-a-time.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

METRICS = "facesim_dlib,clip_t,clip_i,dino"


def build_models(clip_kind: str, device: str):
    from transformers import CLIPModel, ViTModel

    from evaluation_support import byte_level_clip_tokenizer, full_size_clip_config, full_size_dino_config
    from likeness.evaluation import MetricModels
    from likeness.evaluation.encoders import ClipEncoder, DinoEncoder
    from likeness.face_analysis.analyzers.dlib_backend import load_dlib

    torch.manual_seed(0)
    clip = CLIPModel(full_size_clip_config(clip_kind)).to(device).eval()
    tokenizer = byte_level_clip_tokenizer()     # the real 49408-token vocabulary is a download; ids stay in range
    dino = ViTModel(full_size_dino_config(), add_pooling_layer=False).to(device).eval()
    clip_encoder = ClipEncoder(clip, tokenizer, clip_kind, int(clip.config.vision_config.image_size))
    dino_encoder = DinoEncoder(dino, "dino-vits16", int(dino.config.image_size))
    return MetricModels(dlib=load_dlib(), clip=clip_encoder, dino=dino_encoder), clip, dino


def make_images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    import cv2
    import skimage.data

    photo = skimage.data.astronaut()
    variants = [photo, photo[:, ::-1], np.clip(photo.astype(np.int16) + 30, 0, 255).astype(np.uint8),
                np.roll(photo, 24, axis=1), cv2.GaussianBlur(photo, (0, 0), 1.5)]
    arrays = [np.ascontiguousarray(variants[i % len(variants)]) for i in range(count)]
    return torch.from_numpy(np.stack(arrays)).float() / 255, torch.from_numpy(photo[None].copy()).float() / 255


def run_batched(models, images, reference, prompt):
    from likeness.evaluation import compute_metrics

    models.batch_size = images.shape[0]
    return compute_metrics(images, references=reference, prompts=prompt, metrics=METRICS, models=models)


def run_one_at_a_time(models, images, reference, prompt):
    from likeness.evaluation import compute_metrics

    models.batch_size = 1
    return [row for i in range(images.shape[0])
            for row in compute_metrics(images[i:i + 1], references=reference, prompts=prompt, metrics=METRICS,
                                       models=models)]


def main() -> None:
    from _bootstrap import load_pack

    load_pack(run_init=False)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clip", choices=("vit-l-14", "vit-b-16"), default="vit-l-14")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    models, clip, dino = build_models(args.clip, args.device)
    images, reference = make_images(args.images)
    prompt = "a photo of an astronaut in front of a flag, studio portrait"
    count = lambda module: sum(p.numel() for p in module.parameters()) / 1e6  # noqa: E731
    print(f"config: CLIP {args.clip} ({count(clip):.0f} M parameters, {clip.config.vision_config.image_size} px), "
          f"DINO ViT-S/16 ({count(dino):.0f} M), FaceSim dlib resnet_v1; random weights; {args.images} images of "
          f"512 px + 1 reference; metrics {METRICS}; device {args.device}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.rounds} rounds, order shuffled")
    configs = {"batched": run_batched, "one at a time": run_one_at_a_time}
    run_batched(models, images[:1], reference, prompt)            # warm-up: dlib models, first-call allocations
    times: dict[str, list[float]] = {name: [] for name in configs}
    order = [name for _ in range(args.rounds) for name in configs]
    random.Random(0).shuffle(order)
    rows = {}
    for name in order:
        started = time.perf_counter()
        rows[name] = configs[name](models, images, reference, prompt)
        times[name].append(time.perf_counter() - started)
    for a, b in zip(rows["batched"], rows["one at a time"], strict=True):
        assert all(abs(a[k] - b[k]) < 1e-3 for k in ("facesim_dlib", "clip_t", "clip_i", "dino")), (a, b)
    rates = {name: [args.images / t for t in values] for name, values in times.items()}
    for name, values in rates.items():
        print(f"{name:>14}: {statistics.median(values):7.3f} images/s (range {min(values):.3f}-{max(values):.3f}; "
              f"{statistics.median(times[name]):.1f} s per {args.images} images)")
    ratio = statistics.median(rates["batched"]) / statistics.median(rates["one at a time"])
    print(f"ratio batched / one at a time: {ratio:.2f}")


if __name__ == "__main__":
    main()
