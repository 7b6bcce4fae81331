"""Benchmark: Face Fusion's cost on the full SDXL UNet in real ComfyUI sampling (CPU).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/sdxl_fusion.py [--size 96] [--steps 1] [--rounds 2]
        [--dtype bf16|fp32] [--configs per-step-exact]

Builds ComfyUI's own SDXL model (``comfy.supported_models.SDXL``, the standard unet config of
``comfy/model_detection.py``: 2567 M params, 70 cross-attention sites; random weights: norms 1/0, biases 0,
the rest N(0, 0.02)) with ``--cpu --use-pytorch-cross-attention`` (SDPA) and samples with
``comfy.sample.sample`` (euler/normal, CFG 7: cond + uncond in one batch of 2, SDXL conditioning with
pooled output and size conds) under ``torch.inference_mode()``, as the executor does. Default 768 px
(96x96 latent: 1024 px does not fit a shared 2-core CPU's time) and bf16 weights (half the memory of fp32;
the CPU computes bf16 natively where it has AVX512-BF16/AMX; ``--dtype fp32`` for the SD1.5 benchmark's
precision). Rows use the timing machinery of ``attention_overhead.py`` (site timer, interleaved rounds in a
seeded random order, paired medians):

- ``unpatched``: the model as loaded;
- ``cached``: Face Fusion, 1 image-sized reference, cached capture (clean): target <= 1.12 x unpatched;
- ``per-step``: 1 reference, per-step capture (the paper), default reference_downsample 2 (SDXL: pooled at
  its top attention level, latent / 2): target <= 1.65 x unpatched;
- ``per-step-exact`` (on request): reference_downsample 1.

With one sampling step per run a per-step row's capture of the previous run (same sigma) is dropped before
each run, so every run pays its reference pass (the capture count per run is printed to show it).
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import attention_overhead as shared  # noqa: E402  (the timing machinery of the SD1.5 benchmark)

ROWS = {
    "unpatched": ("the model as loaded", None, None),
    "cached": ("Face Fusion, 1 reference (image-sized), cached capture (clean), uncond none", 1.12,
               dict(capture_mode="cached_clean")),
    "per-step": ("Face Fusion, 1 reference, per-step capture (the paper), uncond none, default reference_downsample "
                 "2 (reference pass's top attention level, latent/2 on SDXL, keys pooled 2x2)", 1.65,
                 dict(capture_mode="per_step")),
    "per-step-exact": ("as per-step with reference_downsample 1 (comparison)", None,
                       dict(capture_mode="per_step", reference_downsample=1)),
}
DEFAULT_ROWS = ("unpatched", "cached", "per-step")


def build_sdxl(dtype, seed: int = 0):
    import comfy.supported_models

    return shared.random_model(comfy.supported_models.SDXL, shared.SDXL_UNET, dtype, seed)


def sdxl_conds(side_px: int):
    import torch

    g = torch.Generator().manual_seed(0)
    sizes = dict(width=side_px, height=side_px, crop_w=0, crop_h=0, target_width=side_px, target_height=side_px)
    return ([[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g), **sizes}]],
            [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g), **sizes}]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""))
    parser.add_argument("--size", type=int, default=96, help="latent side (96 = 768 px, 128 = 1024 px)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--configs", default="", help="extra rows to run (e.g. per-step-exact)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if not args.comfyui or not os.path.isfile(os.path.join(args.comfyui, "comfy", "model_patcher.py")):
        parser.error("set COMFYUI_PATH or --comfyui to a ComfyUI checkout")
    names = list(DEFAULT_ROWS) + [n for n in args.configs.split(",") if n and n not in DEFAULT_ROWS]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")

    shared.prepare_comfy(os.path.abspath(args.comfyui))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import comfy.ldm.modules.attention as comfy_attention

    from likeness.attention_patches import attach_stats, find_patch, find_sites
    from likeness.techniques.face_fusion import FusionAdapter, FusionIdentityLatents, apply_face_fusion

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    t0 = time.perf_counter()
    base = build_sdxl(dtype)
    build_s = time.perf_counter() - t0
    positive, negative = sdxl_conds(args.size * 8)
    bench = shared.Bench(base, find_sites(base), args.size, args.steps, args.cfg, positive, negative)
    adapter = FusionAdapter.from_model(base)
    reference = torch.randn(1, 4, args.size, args.size, generator=torch.Generator().manual_seed(1))
    timer = shared.SiteTimer()
    models, stats = {}, {}
    for name in names:
        options = ROWS[name][2]
        model = base.clone() if options is None else apply_face_fusion(
            base, adapter, [FusionIdentityLatents(reference)], **options)
        model.set_model_attn2_patch(timer.start)
        model.set_model_attn2_output_patch(timer.stop)
        models[name] = model
        stats[name] = attach_stats(model) if find_patch(model) is not None else None

    params = sum(p.numel() for p in base.model.diffusion_model.parameters())
    print("== configuration")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}, load {os.getloadavg()[0]:.1f}")
    print(f"ComfyUI {shared._comfy_version(args.comfyui)}; attention backend "
          f"{comfy_attention.optimized_attention.__name__}")
    print(f"model: SDXL unet {params / 1e6:.1f} M params {args.dtype}, random weights (built in {build_s:.1f} s); "
          f"{len(bench.sites)} cross-attention sites; adapter {sum(p.numel() for p in adapter.parameters()) / 1e6:.1f} "
          f"M params ({adapter.metadata['base']})")
    print(f"sampling: {args.steps} step(s) euler/normal, CFG {args.cfg} (cond+uncond batched), latent "
          f"{args.size}x{args.size} ({args.size * 8} px), reference latent {args.size}x{args.size}, inference_mode; "
          f"1 warm-up + {args.rounds} interleaved rounds")
    for name in names:
        print(f"  {name:15s} {ROWS[name][0]}")
    sys.stdout.flush()

    walls: dict[str, list[float]] = {n: [] for n in names}
    sites: dict[str, list[float]] = {n: [] for n in names}
    captures: dict[str, list[float]] = {n: [] for n in names}

    def run(name: str) -> tuple[float, float, float, int]:
        patch = find_patch(models[name])
        per_step = ROWS[name][2] is not None and ROWS[name][2]["capture_mode"] == "per_step"
        if per_step:
            patch.captures.clear()   # one step per run: the previous run's capture has this run's sigma
        before = stats[name].capture_passes if stats[name] is not None else 0
        gc.collect()
        wall, _cpu, site, capture = bench.run(models[name], timer, None, stats[name])
        passes = (stats[name].capture_passes - before) if stats[name] is not None else 0
        return wall, site, capture, passes

    print("== warm-up (pays the cached row's one-off capture)")
    for name in names:
        wall, site, capture, passes = run(name)
        print(f"  {name:15s} {wall:8.2f} s  (capture {capture:.2f} s, {passes} capture pass(es))")
        sys.stdout.flush()
    for r in range(args.rounds):
        order = list(names)
        random.Random(r).shuffle(order)
        for name in order:
            wall, site, capture, passes = run(name)
            walls[name].append(wall)
            sites[name].append(site)
            captures[name].append(capture)
            print(f"  round {r + 1} {name:15s} {wall:8.2f} s  (sites {site:.2f} s, capture {capture:.2f} s, "
                  f"{passes} capture pass(es))")
            sys.stdout.flush()

    med = statistics.median
    print(f"== results ({args.rounds} rounds; wall = median / median of unpatched; paired = median of per-round "
          f"ratios)")
    print(f"{'config':15s} {'wall med s':>10s} {'wall':>6s} {'paired':>6s} {'sites':>6s} {'capture s':>9s}  target")
    base_walls = walls["unpatched"]
    for name in names:
        ratio = med(walls[name]) / med(base_walls)
        paired = med(a / b for a, b in zip(walls[name], base_walls, strict=True))
        site_ratio = med(sites[name]) / med(sites["unpatched"]) if med(sites["unpatched"]) > 0 else float("nan")
        target = ROWS[name][1]
        verdict = f"<= {target} {'PASS' if ratio <= target else 'MISS'}" if target else ""
        print(f"{name:15s} {med(walls[name]):10.2f} {ratio:6.3f} {paired:6.3f} {site_ratio:6.3f} "
              f"{med(captures[name]):9.2f}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
