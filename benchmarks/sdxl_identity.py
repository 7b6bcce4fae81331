"""Benchmark: FaceID-SDXL and InstantID on the full SDXL UNet in real ComfyUI sampling (CPU).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/sdxl_identity.py [--size 96] [--cfg 1] [--rounds 2]

Builds ComfyUI's own SDXL model (``comfy.supported_models.SDXL``, the standard unet config, 2.57 G params,
random weights: norms 1/0, biases 0, the rest N(0, 0.02)) with ``--cpu --use-pytorch-cross-attention`` (SDPA)
in ``--dtype`` (bf16 by default: fp32 SDXL plus an fp32 IdentityNet need ~15 GB). The random weights are written
once to ``--weights-dir`` and memory-mapped (file-backed pages the kernel can reclaim, so a machine whose other
jobs leave less free memory than the model's size does not kill anyone), then it samples with
``comfy.sample.sample`` (euler/normal, ``--steps`` steps, ``--cfg``; CFG 1 runs the cond chunk only) under
``torch.inference_mode()``, as the executor does. Rows (clones of the same model):

- ``unpatched``: the model as loaded;
- ``faceid-sdxl``: the decoupled FaceID-SDXL ID branch, 4 tokens from the official ``to_k_ip``/``to_v_ip``
  layout at all 70 sites, LoRA strength 0 (the LoRA is merged into the weights: no per-step cost); target 1.03;
- ``instantid-adapter``: InstantID's 16 ID tokens through the same injector at all 70 sites;
- ``identitynet``: InstantID's ControlNet cost, timed after the UNet rows with the UNet freed (both nets at once
  need ~7.6 GB in bf16, more than this shared machine spares): ComfyUI's ControlNet module (``comfy.cldm``) for
  the official IdentityNet layout (random weights, same dtype) called as ``ControlNet.get_control`` calls it,
  on the same latent with the 16 ID tokens as context, SDXL's ``y`` and the 5-keypoint hint. ComfyUI runs the
  ControlNet once per UNet call and adds its residuals, so ``instantid`` = ``instantid-adapter`` + this
  (reported as the ratio of the sum to ``unpatched``).

Adapter weights come from the official layouts (``tests/data/checkpoint_layouts``) through the pack's loader as
broadcast constants (timing does not depend on their values; nothing is copied). One warm-up call per row on a
16x16 latent, then ``--rounds`` rounds with the rows in a new seeded random order each round. Printed: the config,
per row the wall-time median and min-max, and the medians of the per-round wall and CPU-time ratios to
``unpatched`` (and ``instantid`` to ``instantid-adapter``). Walls on a shared 2-core machine vary; CPU time is
steadier.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import attention_overhead as shared  # noqa: E402  (prepare_comfy and the SDXL UNet config)

TARGETS = {"faceid-sdxl": 1.03}


def random_value(name: str, shape, generator, dtype):
    """Norm weights 1, biases 0, everything else N(0, 0.02)."""
    import torch

    if "norm" in name or name.endswith(("in_layers.0.weight", "out_layers.0.weight", "out.0.weight")):
        return torch.full(shape, 1.0 if name.endswith("weight") else 0.0, dtype=dtype)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def mmap_random_weights(module, folder: str, seed: int, dtype) -> None:
    """Give a module built on the meta device random weights memory-mapped from ``folder`` (written on first use,
    one file per top-level child so no more than one block is ever held in anonymous memory)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    children = {}
    for name, p in module.named_parameters():
        children.setdefault(".".join(name.split(".")[:2]), []).append((name, p.shape))
    folder = os.path.join(folder, str(dtype).replace("torch.", ""))
    os.makedirs(folder, exist_ok=True)
    state = {}
    for index, (child, params) in enumerate(children.items()):
        path = os.path.join(folder, f"{index:03d}-{child}.pt")
        if not os.path.isfile(path):
            torch.save({n: random_value(n, shape, generator, dtype) for n, shape in params}, path + ".part")
            os.replace(path + ".part", path)
        state.update(torch.load(path, mmap=True, weights_only=True))
    module.load_state_dict(state, assign=True, strict=True)


def build_model(dtype, folder: str):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SDXL(dict(shared.SDXL_UNET))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device="meta")
    mmap_random_weights(model.diffusion_model, os.path.join(folder, "sdxl_unet"), 0, dtype)
    model.device = mm.get_torch_device()     # built on meta, now holding CPU (memory-mapped) weights
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def build_identitynet(dtype, folder: str):
    """ComfyUI's ControlNet for the official IdentityNet layout (config from ComfyUI's diffusers detection)."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops
    import torch

    from faceid_support import INSTANTID_CONTROLNET, read_layout
    from likeness.host.controlnet import diffusers_unet_config

    layout = read_layout(INSTANTID_CONTROLNET)["groups"][""]
    config = diffusers_unet_config({k: torch.empty(s["shape"], device="meta") for k, s in layout.items()})
    config.pop("out_channels", None)
    config.update(hint_channels=3, dtype=dtype, device="meta", operations=comfy.ops.disable_weight_init)
    control = comfy.cldm.cldm.ControlNet(**config)
    mmap_random_weights(control, os.path.join(folder, "identitynet"), 1, dtype)
    return comfy.controlnet.ControlNet(control, load_device=mm.get_torch_device(), manual_cast_dtype=None)


def load_adapter(layout_name: str, source: str):
    """The pack's loader on the layout's broadcast constants, in the stored dtype (no copies)."""
    from faceid_support import DTYPES, read_layout, state_dict_from_layout
    from likeness.techniques.faceid.checkpoint import load_faceid_state_dict

    stored = DTYPES[next(iter(read_layout(layout_name)["groups"]["image_proj"].values()))["dtype"]]
    return load_faceid_state_dict(state_dict_from_layout(layout_name), source=source, dtype=stored)


def id_tokens(tokens: int, seed: int):
    import torch

    from likeness.techniques.faceid.apply import IDTokens

    g = torch.Generator().manual_seed(seed)
    return IDTokens(torch.randn(1, tokens, 2048, generator=g), torch.randn(1, tokens, 2048, generator=g))


def kps_map(side: int):
    import numpy as np
    import torch

    from likeness.face_analysis.pose import draw_kps_map

    kps = np.array([[0.38, 0.42], [0.62, 0.42], [0.5, 0.55], [0.41, 0.68], [0.59, 0.68]], np.float32) * side
    return torch.from_numpy(draw_kps_map(kps, side, side).astype(np.float32) / 255.0)[None]


def build_rows(base, positive, negative, side: int) -> dict:
    """``{name: (model, positive, negative)}`` of the UNet rows."""
    from faceid_support import FACEID_SDXL, INSTANTID
    from likeness.techniques.faceid.apply import apply_faceid_adapter, apply_instantid

    faceid = load_adapter(FACEID_SDXL, "ip-adapter-faceid_sdxl.bin")
    instantid = load_adapter(INSTANTID, "ip-adapter.bin")
    rows = {"unpatched": (base.clone(), positive, negative),
            "faceid-sdxl": (apply_faceid_adapter(base, faceid, id_tokens(4, 2), 1.0, lora_strength=0.0),
                            positive, negative)}
    rows["instantid-adapter"] = apply_instantid(base, instantid, id_tokens(16, 3), positive, negative,
                                                kps_map(side), None, weight=0.8)
    return rows


def time_identitynet(dtype, latent_side: int, rounds: int, folder: str) -> list[tuple[float, float]]:
    """Wall and CPU seconds of one IdentityNet call per round (the UNet rows' batch of 1, CFG 1)."""
    import torch

    control = build_identitynet(dtype, folder).control_model
    side = latent_side * 8
    inputs = {"x": torch.randn(1, 4, latent_side, latent_side, dtype=dtype), "hint": kps_map(side).movedim(-1, 1).to(dtype),
              "timesteps": torch.tensor([500.0]), "context": id_tokens(16, 3).cond.to(dtype),
              "y": torch.randn(1, 2816, dtype=dtype)}
    times = []
    with torch.inference_mode():
        control(**{**inputs, "x": inputs["x"][..., :16, :16], "hint": inputs["hint"][..., :128, :128]})   # warm-up
        for _ in range(rounds):
            gc.collect()
            wall0, cpu0 = time.perf_counter(), time.process_time()
            control(**inputs)
            times.append((time.perf_counter() - wall0, time.process_time() - cpu0))
    return times


def conditioning(seed: int, side: int) -> list:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 2048, generator=g), {
        "pooled_output": torch.randn(1, 1280, generator=g), "width": side, "height": side, "crop_w": 0, "crop_h": 0,
        "target_width": side, "target_height": side}]]


def sample(row, latent_side: int, steps: int, cfg: float) -> tuple[float, float]:
    import comfy.sample
    import torch

    model, positive, negative = row
    latent = torch.zeros(1, 4, latent_side, latent_side)
    noise = comfy.sample.prepare_noise(latent, 42)
    gc.collect()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=42,
                            disable_pbar=True)
    return time.perf_counter() - wall0, time.process_time() - cpu0


def report(results: dict, args, dtype) -> None:
    import torch

    print(f"SDXL UNet (2.57 G params, random) {dtype}, SDPA, {args.size * 8} px ({args.size}x{args.size} latent), "
          f"{args.steps} step(s), CFG {args.cfg} ({'cond only' if args.cfg == 1 else 'cond + uncond batch'}), "
          f"{args.rounds} round(s); torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    base = results["unpatched"]
    for name, runs in ((n, r) for n, r in results.items() if n != "identitynet"):
        walls = [w for w, _ in runs]
        wall_ratio = statistics.median(w / b for (w, _), (b, _) in zip(runs, base, strict=True))
        cpu_ratio = statistics.median(c / b for (_, c), (_, b) in zip(runs, base, strict=True))
        target = TARGETS.get(name)
        verdict = "" if target is None else f"  target <= {target:.2f}: {'PASS' if wall_ratio <= target else 'MISS'}"
        print(f"{name:18s} wall {statistics.median(walls):8.1f} s [{min(walls):.1f}-{max(walls):.1f}]  "
              f"x{wall_ratio:.3f} wall, x{cpu_ratio:.3f} cpu vs unpatched{verdict}")
    net, unet = statistics.median(w for w, _ in results["identitynet"]), statistics.median(w for w, _ in base)
    adapter = statistics.median(w for w, _ in results["instantid-adapter"])
    print(f"IdentityNet call {net:.1f} s = x{net / unet:.3f} of an unpatched UNet call; instantid (adapter + "
          f"IdentityNet) x{(adapter + net) / unet:.3f} wall vs unpatched")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI checkout")
    parser.add_argument("--size", type=int, default=96, help="latent side (96 = 768 px, 128 = 1024 px)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--cfg", type=float, default=1.0, help="1 = cond only (the IdentityNet row is timed at batch 1)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--weights-dir", default=os.path.join(tempfile.gettempdir(), "likeness-sdxl-bench-weights"),
                        help="where the random weights are written once and memory-mapped from (~7.6 GB in bf16)")
    args = parser.parse_args()
    if not args.comfyui or not os.path.isfile(os.path.join(args.comfyui, "comfy", "model_patcher.py")):
        parser.error("set COMFYUI_PATH or --comfyui to a ComfyUI checkout")
    shared.prepare_comfy(os.path.abspath(args.comfyui))
    import torch

    dtype = getattr(torch, args.dtype)
    positive, negative = conditioning(1, args.size * 8), conditioning(2, args.size * 8)
    rows = build_rows(build_model(dtype, args.weights_dir), positive, negative, args.size * 8)
    for row in rows.values():
        sample(row, 16, 1, args.cfg)                 # warm-up: code paths and allocations, small latent
    results = {name: [] for name in rows}
    order = list(rows)
    shuffler = random.Random(0)
    for _ in range(args.rounds):
        shuffler.shuffle(order)
        for name in order:
            results[name].append(sample(rows[name], args.size, args.steps, args.cfg))
    del rows
    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()
    results["identitynet"] = time_identitynet(dtype, args.size, args.rounds, args.weights_dir)
    report(results, args, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
