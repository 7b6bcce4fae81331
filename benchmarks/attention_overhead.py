"""Benchmark: cost of the identity-attention engine in real ComfyUI sampling (full SD1.5 UNet, CPU).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/attention_overhead.py [--quick] [--configs a,b]

Builds ComfyUI's own SD1.5 model (``comfy.supported_models.SD15``, standard unet config, 859.5 M params,
fp32, random weights: norms 1/0, biases 0, the rest N(0, 0.02)) with ``--cpu --use-pytorch-cross-attention``
(SDPA), then samples with ``comfy.sample.sample`` (euler/normal, CFG 7: cond + uncond in one batch of 2,
512 px = 64x64 latent, 2 steps) under ``torch.inference_mode()``, as the executor does.

Every configuration is a clone of the same model (registry :data:`CONFIGS`; add rows for other techniques
with :func:`register`). Rows: the engine's decoupled and joint (Face Fusion: cached, per-step, 1/2/4/8
references with the default reference budget, 8 exact; per-step also with the exact reference stream) paths, FaceID-PlusV2 (= Face-MakeUp's adapter half),
ConsistentID (model and merge-step conditioning as its encode node makes them) and Face-MakeUp whole (its
pose ControlNet's cost reported against faceid-plusv2); comparison rows (``default=False``) run only when
named in ``--configs``. Technique weights are random tensors in the official checkpoint layouts
(``tests/data/checkpoint_layouts``) loaded by the pack's own loaders.

After one warm-up round (which also pays the one-off reference capture of the cached modes, reported
separately) the configurations run interleaved, in a new seeded random order each round, until every
ratio's median moved less than ``--tol`` in the last round (or ``--max-rounds`` / ``--budget`` is
reached). Printed per configuration: wall time median and min-max, and the ratios to
``unpatched`` of the wall time, of the process CPU time and of the time spent inside the cross-attention
sites (norm2 → to_out bracket at all 16 sites, main passes only); reference-capture passes are timed
separately. Walls on a shared 2-core machine vary by ±17 %; CPU time and site time are steadier.

``--quick``: a 32x32 latent (256 px), at most 3 rounds (development only).
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
from dataclasses import dataclass, field
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SD15_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320,
             'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0], 'channel_mult': [1, 2, 4, 4],
             'transformer_depth_middle': 1, 'use_linear_in_transformer': False, 'context_dim': 768, 'num_heads': 8,
             'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             'use_temporal_attention': False, 'use_temporal_resblock': False}  # comfy/model_detection.py SD15
SDXL_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4,
             'model_channels': 320, 'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10],
             'channel_mult': [1, 2, 4], 'transformer_depth_middle': 10, 'use_linear_in_transformer': True,
             'context_dim': 2048, 'num_head_channels': 64, 'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
             'use_temporal_attention': False, 'use_temporal_resblock': False}   # comfy/model_detection.py SDXL


# ----------------------------------------------------------------------------------------- registry
@dataclass
class Config:
    name: str
    description: str
    build: Callable          # (Bench) -> ModelPatcher
    target: float | None = None       # maximal wall ratio
    target_of: str = "unpatched"      # ... relative to this configuration
    default: bool = True              # run without --configs (False: comparison rows, on request only)
    conds: tuple | None = None        # (positive, negative) of this row; None = the bench's
    walls: list = field(default_factory=list)
    cpus: list = field(default_factory=list)
    sites: list = field(default_factory=list)
    captures: list = field(default_factory=list)
    warmup: dict = field(default_factory=dict)
    model: object = None
    stats: object = None              # the engine's EngineStats on the row's model (None: no engine patch)


CONFIGS: dict[str, Config] = {}


def register(name: str, description: str, target: float | None = None, target_of: str = "unpatched",
             default: bool = True):
    """Decorator: add a row. ``build(bench)`` returns a patched clone of ``bench.base``, or
    ``(model, positive, negative)`` when the technique also changes the conditioning."""
    def wrap(fn):
        CONFIGS[name] = Config(name, description, fn, target, target_of, default)
        return fn
    return wrap


LAYOUTS = os.path.join(ROOT, "tests", "data", "checkpoint_layouts")


def random_groups_from_layout(name: str, seed: int) -> dict:
    """``{group: {key: tensor}}`` of an official checkpoint layout (real keys and shapes), random fp32 values:
    matrices N(0, 0.02), vectors 0 (norm weights 1)."""
    import json

    import torch

    with open(os.path.join(LAYOUTS, name), encoding="utf-8") as f:
        layout = json.load(f)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for group, keys in layout["groups"].items():
        tensors = {}
        for key, spec in keys.items():
            shape = spec["shape"]
            if len(shape) >= 2:
                tensors[key] = torch.randn(shape, generator=g) * 0.02
            else:
                tensors[key] = torch.ones(shape) if "norm" in key and key.endswith("weight") else torch.zeros(shape)
        out[group] = tensors
    return out


@register("unpatched", "the model as loaded")
def _unpatched(bench):
    return bench.base.clone()


@register("decoupled", "decoupled injector, 16 identity tokens per chunk (IP-Adapter-Plus shape), cond and "
          "uncond tokens, all 16 sites", target=1.03)
def _decoupled(bench):
    import torch

    from likeness.attention_patches import DecoupledInjector, add_injector

    g = torch.Generator().manual_seed(1)
    embeds = {0: torch.randn(1, 16, 768, generator=g), 1: torch.randn(1, 16, 768, generator=g)}
    weights = {s.index: (torch.randn(s.channels, 768, generator=g) * 0.02, torch.randn(s.channels, 768, generator=g) * 0.02)
               for s in bench.sites}
    cache = {}

    def provider(site, kind):   # to_k_ip / to_v_ip projection once per site and kind, like a real technique
        hit = cache.get((site.index, kind))
        if hit is None:
            wk, wv = weights[site.index]
            hit = cache[(site.index, kind)] = (embeds[kind] @ wk.T, embeds[kind] @ wv.T)
        return hit

    model = bench.base.clone()
    add_injector(model, DecoupledInjector("bench_decoupled", provider, weight=1.0))
    return model


@register("faceid-plusv2", "FaceID-PlusV2 / Face-MakeUp adapter half / ConsistentID ID branch: decoupled injector "
          "with 4 ID tokens (cond and uncond) from the real to_k_ip/to_v_ip layout, all 16 sites; LoRA strength 0 (the "
          "rank-128 LoRA is merged into the weights at load, zero cost per step: row faceid-plusv2-lora)",
          target=1.03)
def _faceid_plusv2(bench, lora_strength: float = 0.0):
    import torch

    from likeness.techniques.faceid.apply import IDTokens, apply_faceid_adapter
    from likeness.techniques.faceid.checkpoint import FaceIDCheckpoint, Variant
    from likeness.techniques.faceid.lora import transformer_blocks
    from likeness.techniques.faceid.processors import parse_adapter
    from likeness.techniques.faceid.projection import ProjPlusModel, projector_config_from_state_dict

    g = torch.Generator().manual_seed(2)
    group = {}
    for k, ref in enumerate(transformer_blocks(bench.base)):   # the official layout: 32 processors, rank 128
        c = ref.channels
        for index, cross in ((2 * k, False), (2 * k + 1, True)):
            for target in ("to_q", "to_k", "to_v", "to_out"):
                group[f"{index}.{target}_lora.down.weight"] = torch.randn(128, 768 if cross and target in (
                    "to_k", "to_v") else c, generator=g) * 0.01
                group[f"{index}.{target}_lora.up.weight"] = torch.randn(c, 128, generator=g) * 0.01
            if cross:
                group[f"{index}.to_k_ip.weight"] = torch.randn(c, 768, generator=g) * 0.02
                group[f"{index}.to_v_ip.weight"] = torch.randn(c, 768, generator=g) * 0.02
    projector = ProjPlusModel()
    checkpoint = FaceIDCheckpoint(Variant.FACEID_PLUSV2, projector,
                                  projector_config_from_state_dict(projector.state_dict()), parse_adapter(group),
                                  True, "benchmark")
    tokens = IDTokens(torch.randn(1, 4, 768, generator=g), torch.randn(1, 4, 768, generator=g))
    return apply_faceid_adapter(bench.base, checkpoint, tokens, weight=1.0, lora_strength=lora_strength)


@register("faceid-plusv2-lora", "as faceid-plusv2 plus the merged rank-128 LoRA (merged into the weights when the "
          "model loads: no cost per step; the re-patch on every model switch is timed unless --preload)")
def _faceid_plusv2_lora(bench):
    return _faceid_plusv2(bench, lora_strength=1.0)


def _fusion(bench, refs: int, mode: str, ref_latent: int = 0, **options):
    import torch

    from likeness.techniques.face_fusion import FusionAdapter, FusionIdentityLatents, apply_face_fusion

    if bench.adapter is None:
        bench.adapter = FusionAdapter.from_model(bench.base)
    side = ref_latent or bench.latent
    latents = torch.randn(refs, 4, side, side, generator=torch.Generator().manual_seed(refs))
    return apply_face_fusion(bench.base, bench.adapter, [FusionIdentityLatents(latents)], capture_mode=mode, **options)


@register("cached", "Face Fusion, 1 reference (image-sized), cached capture (clean), uncond none", target=1.12)
def _cached(bench):
    return _fusion(bench, 1, "cached_clean")


@register("per-step", "Face Fusion, 1 reference, per-step capture (the paper), uncond none, default "
          "reference_downsample 2 (reference pass's top-level self-attention keys pooled 2x2)", target=1.65)
def _per_step(bench):
    return _fusion(bench, 1, "per_step")


@register("per-step-exact", "as 'per-step' with reference_downsample 1 (every self-attention key in the "
          "reference pass)")
def _per_step_exact(bench):
    return _fusion(bench, 1, "per_step", reference_downsample=1)


for _n in (2, 4, 8):
    register(f"refs{_n}", f"Face Fusion, {_n} references (Eq. 6), cached capture, default reference_budget 2 "
             f"({'exact' if _n <= 2 else 'each reference pooled to 2 references worth of keys per layer'})",
             target=1.6 if _n == 8 else None, target_of="cached")(lambda bench, n=_n: _fusion(bench, n, "cached_clean"))

register("refs8-exact", "8 references, reference_budget 0: every key of every reference (Eq. 6 literally)")(
    lambda bench: _fusion(bench, 8, "cached_clean", reference_budget=0))

register("refs8-half", "8 references encoded at half the image size (reference_size 256 for a 512 image: 4x "
         "fewer keys per reference; comparison)", default=False)(
    lambda bench: _fusion(bench, 8, "cached_clean", max(8, bench.latent // 2)))


@register("consistentid", "ConsistentID as its encode node patches the model: the loader on a random state dict of "
          "the official layout (consistentid_v1_sd15.json), the ID tokens from its projector, the decoupled ID "
          "branch at all 16 sites, and the two timestep-ranged positive conditionings of the merge step (plain text "
          "before 31/50, fused after). LoRA merged as in faceid-plusv2 (strength 0 here)", target=1.03)
def _consistentid(bench):
    import torch

    from likeness.techniques.consistentid.encode import DEFAULT_MERGE_AT
    from likeness.techniques.consistentid.loader import load_consistentid_state_dict
    from likeness.techniques.faceid.apply import apply_faceid_adapter, encode_id_tokens

    checkpoint = load_consistentid_state_dict(random_groups_from_layout("consistentid_v1_sd15.json", 3),
                                              source="benchmark")
    g = torch.Generator().manual_seed(4)
    arcface = torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1)
    clip_hidden, zero_clip = torch.randn(1, 257, 1280, generator=g), torch.randn(1, 257, 1280, generator=g)
    with torch.no_grad():
        tokens = encode_id_tokens(checkpoint, arcface, clip_hidden, zero_clip, shortcut=False)
    model = apply_faceid_adapter(bench.base, checkpoint, tokens, weight=1.0, lora_strength=0.0, name="consistentid")
    plain, fused, negative = (torch.randn(1, 77, 768, generator=g) for _ in range(3))
    positive = [[plain, {"start_percent": 0.0, "end_percent": DEFAULT_MERGE_AT}],
                [fused, {"start_percent": DEFAULT_MERGE_AT, "end_percent": 1.0}]]
    return model, positive, [[negative, {}]]


@register("face-makeup", "Face-MakeUp whole: the faceid-plusv2 adapter half (ID scale 0.6) plus its pose ControlNet "
          "(full SD1.5 ControlNet, 361 M params, from the official layout face_makeup_sd15.json, random weights; "
          "ID tokens as context; strength 0.2) on a 512 px 5-keypoint map. The ControlNet's cost = this row / "
          "faceid-plusv2", target=None, target_of="faceid-plusv2")
def _face_makeup(bench):
    import torch

    from likeness.techniques.faceid.apply import IDTokens, apply_face_makeup
    from likeness.techniques.faceid.checkpoint import load_faceid_state_dict

    checkpoint = load_faceid_state_dict(random_groups_from_layout("face_makeup_sd15.json", 5), source="benchmark")
    g = torch.Generator().manual_seed(6)
    tokens = IDTokens(torch.randn(1, 4, 768, generator=g), torch.randn(1, 4, 768, generator=g))
    pose = torch.zeros(1, bench.latent * 8, bench.latent * 8, 3)
    for x, y in ((0.38, 0.42), (0.62, 0.42), (0.5, 0.55), (0.41, 0.68), (0.59, 0.68)):
        cx, cy = int(x * pose.shape[2]), int(y * pose.shape[1])
        pose[:, cy - 6:cy + 6, cx - 6:cx + 6] = 1.0
    model, positive, negative = apply_face_makeup(bench.base, checkpoint, tokens, bench.positive, bench.negative,
                                                  pose, weight=0.6, lora_strength=0.0, controlnet_strength=0.2)
    return model, positive, negative


# ----------------------------------------------------------------------------------------- timing
class SiteTimer:
    """Time between the attn2 input tap (norm2 done) and the attn2 output tap (to_out done), every site."""

    def __init__(self):
        self.main = 0.0
        self.capture = 0.0
        self._start = None

    def start(self, n, context, value, extra_options):
        self._start = time.perf_counter()
        return n, context, value

    start.likeness_token_safe = True   # timing only: any token count is fine

    def stop(self, n, extra_options):
        if self._start is not None:
            from likeness.attention_patches import PASS_KEY

            ctx = extra_options.get(PASS_KEY)
            elapsed = time.perf_counter() - self._start
            if ctx is not None and ctx.recorder is not None:
                self.capture += elapsed
            else:
                self.main += elapsed
            self._start = None
        return n

    stop.likeness_token_safe = True

    def __deepcopy__(self, memo):
        return self


@dataclass
class Bench:
    base: object
    sites: tuple
    latent: int
    steps: int
    cfg: float
    positive: list
    negative: list
    adapter: object = None
    preload: bool = False

    def run(self, model, timer: SiteTimer, conds: tuple | None = None,
            stats=None) -> tuple[float, float, float, float]:
        import comfy.sample
        import torch

        latent = torch.zeros(1, 4, self.latent, self.latent)
        noise = comfy.sample.prepare_noise(latent, 42)
        positive, negative = conds or (self.positive, self.negative)
        timer.main = timer.capture = 0.0
        captured = stats.capture_seconds if stats is not None else 0.0
        gc.collect()
        if self.preload:
            # switching between the interleaved clones makes ComfyUI unpatch the previous clone's weights and
            # patch this one's (e.g. a LoRA): a cost of the interleaving, charged to whichever row runs next;
            # in real use one model samples again and again. Load it before the clock starts.
            import comfy.model_management

            with torch.inference_mode():
                comfy.model_management.load_models_gpu([model])
        wall0, cpu0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = comfy.sample.sample(model, noise, self.steps, self.cfg, "euler", "normal", positive, negative,
                                      latent, seed=42, disable_pbar=True)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        if not torch.isfinite(out).all():
            raise RuntimeError("non-finite output")
        captured = stats.capture_seconds - captured if stats is not None else 0.0
        return wall, cpu, timer.main, captured


def prepare_comfy(path: str) -> None:
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = True
    args.use_pytorch_cross_attention = True
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)
    for p in (ROOT,):
        if p not in sys.path:
            sys.path.insert(0, p)
    from _bootstrap import load_pack

    load_pack()


def build_model(seed: int = 0):
    import comfy.supported_models
    import torch

    return random_model(comfy.supported_models.SD15, SD15_UNET, torch.float32, seed)


def random_model(config_class, unet_config: dict, dtype, seed: int = 0):
    """A ModelPatcher of ``config_class`` (e.g. ``comfy.supported_models.SD15``) with random weights: norms 1/0,
    biases 0, the rest N(0, 0.02) (outputs stay in range through every block, as trained weights do)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import torch

    config = config_class(dict(unet_config))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if "norm" in name or name.endswith(("in_layers.0.weight", "out_layers.0.weight", "out.0.weight")):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def paired_medians(name: str, base: str = "unpatched") -> float:
    return statistics.median(a / b for a, b in zip(CONFIGS[name].walls, CONFIGS[base].walls, strict=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI checkout")
    parser.add_argument("--quick", action="store_true", help="32x32 latent, <= 3 rounds")
    parser.add_argument("--configs", default="", help="comma-separated subset (unpatched is always run)")
    parser.add_argument("--size", type=int, default=0, help="latent side (default 64 = 512 px; quick 32)")
    parser.add_argument("--steps", type=int, default=0, help="sampling steps (default 2)")
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--min-rounds", type=int, default=3)
    parser.add_argument("--max-rounds", type=int, default=8)
    parser.add_argument("--tol", type=float, default=0.01, help="stop when every median ratio moved less than this")
    parser.add_argument("--budget", type=float, default=60.0, help="minutes; stop starting new rounds after this")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--preload", action="store_true",
                        help="load each row's model before its clock starts (the model switch between interleaved "
                             "clones, e.g. re-patching a LoRA, is then not timed)")
    args = parser.parse_args()
    if not args.comfyui or not os.path.isfile(os.path.join(args.comfyui, "comfy", "model_patcher.py")):
        parser.error("set COMFYUI_PATH or --comfyui to a ComfyUI checkout")
    latent = args.size or (32 if args.quick else 64)
    steps = args.steps or 2     # >= 2: per-step capture must not be reused from the previous run's last step
    max_rounds = min(args.max_rounds, 3) if args.quick else args.max_rounds

    prepare_comfy(os.path.abspath(args.comfyui))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import comfy.ldm.modules.attention as comfy_attention

    from likeness.attention_patches import attach_stats, find_patch, find_sites

    wanted = args.configs.split(",") if args.configs else [n for n, c in CONFIGS.items() if c.default]
    unknown = sorted(set(wanted) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    names = [n for n in CONFIGS if n == "unpatched" or n in wanted]
    for name in names:   # a target's reference row must run too
        if CONFIGS[name].target_of not in names:
            names.append(CONFIGS[name].target_of)
    names = [n for n in CONFIGS if n in names]
    t0 = time.perf_counter()
    base = build_model()
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    negative = [[torch.randn(1, 77, 768, generator=g), {}]]
    bench = Bench(base, find_sites(base), latent, steps, args.cfg, positive, negative, preload=args.preload)
    timer = SiteTimer()
    for name in names:
        model = CONFIGS[name].build(bench)
        if isinstance(model, tuple):
            model, positive, negative = model
            CONFIGS[name].conds = (positive, negative)
        model.set_model_attn2_patch(timer.start)
        model.set_model_attn2_output_patch(timer.stop)
        CONFIGS[name].model = model
        if find_patch(model) is not None:   # reference-capture time comes from the engine's opt-in stats
            CONFIGS[name].stats = attach_stats(model)

    params = sum(p.numel() for p in base.model.diffusion_model.parameters())
    print("== configuration")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    print(f"ComfyUI {_comfy_version(args.comfyui)} at {args.comfyui}; attention backend "
          f"{comfy_attention.optimized_attention.__name__}")
    print(f"model: SD15 unet {params / 1e6:.1f} M params fp32, random weights (built in {build_s:.1f} s); "
          f"{len(bench.sites)} cross-attention sites")
    print(f"sampling: {steps} step(s) euler/normal, CFG {args.cfg} (cond+uncond batched), latent {latent}x{latent} "
          f"({latent * 8} px), inference_mode, model {'loaded before the clock' if args.preload else 'switch timed'}; "
          f"rounds {args.min_rounds}..{max_rounds}, tol {args.tol}, "
          f"budget {args.budget} min{' [QUICK]' if args.quick else ''}")
    for name in names:
        print(f"  {name:14s} {CONFIGS[name].description}")
    sys.stdout.flush()

    print("== warm-up (pays one-off captures of cached modes)")
    for name in names:
        wall, cpu, site, capture = bench.run(CONFIGS[name].model, timer, CONFIGS[name].conds, CONFIGS[name].stats)
        CONFIGS[name].warmup = {"wall": wall, "capture": capture}
        print(f"  {name:14s} {wall:7.2f} s  (capture {capture:.2f} s)")
        sys.stdout.flush()

    start = time.perf_counter()
    history: list[dict] = []
    rounds = 0
    while rounds < max_rounds:
        order = list(names)   # a new seeded shuffle each round: no row always follows the same one (a rotation
        random.Random(rounds).shuffle(order)   # did, and carry-over from the previous run biased some rows)
        for name in order:
            wall, cpu, site, capture = bench.run(CONFIGS[name].model, timer, CONFIGS[name].conds, CONFIGS[name].stats)
            c = CONFIGS[name]
            for series, value in ((c.walls, wall), (c.cpus, cpu), (c.sites, site), (c.captures, capture)):
                series.append(value)
        rounds += 1
        medians = {n: paired_medians(n) for n in names}
        history.append(medians)
        line = ", ".join(f"{n} {medians[n]:.3f}" for n in names if n != "unpatched")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"  round {rounds} (load {load:.1f}): unpatched {CONFIGS['unpatched'].walls[-1]:.2f} s; "
              f"paired median ratios: {line}")
        sys.stdout.flush()
        settled = len(history) >= 2 and all(abs(history[-1][n] - history[-2][n]) < args.tol for n in names)
        if rounds >= args.min_rounds and settled:
            break
        if (time.perf_counter() - start) / 60.0 > args.budget and rounds >= 2:
            print("  (time budget reached)")
            break

    print(f"== results ({rounds} rounds; wall = median / median of unpatched; paired = median of per-round ratios; "
          f"min = fastest / fastest of unpatched (least disturbed by other load); cpu, sites: ratios of medians)")
    base_cfg = CONFIGS["unpatched"]
    med = statistics.median
    header = (f"{'config':14s} {'wall med s':>10s} {'min-max':>13s} {'wall':>6s} {'paired':>6s} {'min':>6s} {'cpu':>6s} "
              f"{'sites':>6s} {'site s':>7s} {'capture s':>9s}  target (median; min)")
    print(header)
    verdicts = []
    for name in names:
        c = CONFIGS[name]
        wall_r = med(c.walls) / med(base_cfg.walls)
        cpu_r = med(c.cpus) / med(base_cfg.cpus)
        site_r = med(c.sites) / med(base_cfg.sites) if med(base_cfg.sites) > 0 else float("nan")
        min_r = min(c.walls) / min(base_cfg.walls)
        target = ""
        if c.target:
            ref = CONFIGS[c.target_of]
            value = med(c.walls) / med(ref.walls)
            value_min = min(c.walls) / min(ref.walls)
            ok = value <= c.target
            target = (f"{value:.3f}; {value_min:.3f} vs {c.target_of} <= {c.target} "
                      f"{'PASS' if ok else 'MISS'}{'' if value_min <= c.target else ' (min: MISS)'}")
            verdicts.append((name, ok))
        elif c.target_of != "unpatched":
            ref = CONFIGS[c.target_of]
            target = (f"{med(c.walls) / med(ref.walls):.3f}; {min(c.walls) / min(ref.walls):.3f} vs {c.target_of} "
                      f"(reported, no target)")
        print(f"{name:14s} {med(c.walls):10.2f} {min(c.walls):6.2f}-{max(c.walls):<6.2f} {wall_r:6.3f} "
              f"{paired_medians(name):6.3f} {min_r:6.3f} {cpu_r:6.3f} {site_r:6.3f} {med(c.sites):7.2f} "
              f"{med(c.captures):9.2f}  {target}")
    for name in names:
        if CONFIGS[name].warmup.get("capture") and CONFIGS[name].name != "per-step":
            print(f"one-off capture ({name}): {CONFIGS[name].warmup['capture']:.2f} s")
    print(f"total {(time.perf_counter() - start) / 60:.1f} min")
    return 0


def _comfy_version(path: str) -> str:
    try:
        with open(os.path.join(path, "comfyui_version.py")) as handle:
            return handle.read().split('"')[1]
    except (OSError, IndexError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
