"""The shared harness of the Flux benchmarks (``flux_identity.py``, ``flux_fusion.py``).

ComfyUI's own FLUX.1 model class (``comfy.supported_models.Flux`` -> ``comfy.ldm.flux.model.Flux``) with the
FLUX.1-dev parameters of ``comfy/model_detection.py`` (hidden 3072, 24 heads, mlp ratio 4, T5 context 4096,
CLIP-L vector 768, guidance embedding, RoPE axes 16/56/56, qkv bias) at full width and a stated number of double and
single blocks (the full 19 + 38 need ~24 GB in bf16), random weights (RMSNorm scales 1, biases 0, the rest
N(0, 0.02)) written once to a folder and memory-mapped. Sampling is ``comfy.sample.sample`` (euler/simple, CFG 1:
FLUX.1-dev's guidance-distilled single pass with guidance 3.5) under ``torch.inference_mode()``, as the executor
does.

One benchmark run = one parent process that prints the configuration and starts fresh worker processes
(``worker_process.run_worker``): one *memory* worker per row (builds the model, applies that row only, samples once
and reports its resident set, sampling peak and high-water mark), then one *timing* worker that builds the model
once, applies every row to its own clone, warms each up and times them interleaved in a new seeded random order per
round (paired per-round ratios are steadier than ratios of medians on a shared machine). On a shared machine the
walls repeat only with one torch thread (the default; two threads' walls varied by 30 %) and when the other
processes leave that core free: before each timed run a quiet gate waits (at most ``--quiet-wait`` s) for that.
A benchmark script supplies its rows as ``{name: Row}``; a row's ``build(base, Setting)`` returns the
patched clone, or raises :class:`RowUnavailable` (printed, the row is left out).
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from identity_lora import RssSampler, _rss_kib, _setup  # noqa: E402  (worker setup and RSS probes)
from worker_process import RESULT_PREFIX, run_worker  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """The DiT and the sampled sizes. ``full()`` is FLUX.1-dev's width; ``tiny()`` is the CI smoke size."""

    hidden: int = 3072
    heads: int = 24
    double: int = 2
    single: int = 4
    context_dim: int = 4096
    vec_dim: int = 768
    latent: int = 64          # latent side: 64 = 512 px, (64 / 2)^2 = 1024 image tokens
    text_tokens: int = 512    # T5 tokens (FLUX.1-dev's max_sequence_length)

    @property
    def dim_head(self) -> int:
        return self.hidden // self.heads

    @property
    def image_tokens(self) -> int:
        return (self.latent // 2) ** 2

    def dit_config(self) -> dict:
        """``comfy/model_detection.py``'s flux branch; the RoPE axes scale with the head width (16/56/56 at 128)."""
        third = 7 * self.dim_head // 16
        return {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2,
                "vec_in_dim": self.vec_dim, "context_in_dim": self.context_dim, "hidden_size": self.hidden,
                "mlp_ratio": 4.0, "num_heads": self.heads, "depth": self.double, "depth_single_blocks": self.single,
                "axes_dim": [self.dim_head - 2 * third, third, third], "theta": 10000, "qkv_bias": True,
                "guidance_embed": True}

    def describe(self) -> str:
        full = " (FLUX.1-dev width)" if (self.hidden, self.heads, self.context_dim) == (3072, 24, 4096) else ""
        return (f"FLUX.1 DiT (ComfyUI comfy.ldm.flux.model.Flux) hidden {self.hidden}, {self.heads} heads{full}, "
                f"{self.double} of 19 double + {self.single} of 38 single blocks, context {self.context_dim}, "
                f"vec {self.vec_dim}, guidance_embed; {self.latent * 8} px ({self.latent}x{self.latent} latent -> "
                f"{self.image_tokens} image tokens), {self.text_tokens} T5 tokens")


TINY = Shape(hidden=128, heads=4, double=2, single=4, context_dim=64, vec_dim=32, latent=8, text_tokens=16)


@dataclass(frozen=True)
class Setting:
    """What a row's build gets besides the base model."""

    shape: Shape
    dtype: object            # torch dtype of the DiT
    files_dir: str           # where a row may write its random weight files once (tiny files under "tiny")


@dataclass
class Row:
    description: str
    build: Callable          # (base ModelPatcher, Setting) -> ModelPatcher
    targets: tuple = ()      # ((limit, other row), ...): paired wall ratio row / other <= limit
    prepare: Callable | None = None   # (Setting) -> None: writes the row's files once, before any worker measures


class RowUnavailable(RuntimeError):
    """A row that cannot run here (its code is not on this branch, a fetched copy is absent): printed, skipped."""


def unpatched(base, setting: Setting):
    return base.clone()


COUNTERS: dict[str, dict[str, Callable[[], int]]] = {}   # {row: {label: running total}}; the first label is "calls"


def add_counter(row: str, label: str, total: Callable[[], int]) -> None:
    """Report ``total()``'s growth per sampling run of ``row`` (shows that a row's patch ran, and how often)."""
    COUNTERS.setdefault(row, {})[label] = total


def count_calls(modules, row: str, label: str = "calls") -> None:
    """Count the forward calls of ``modules`` under ``row``."""
    calls = collections.Counter()

    def hook(module, inputs, output):
        calls["n"] += 1

    for module in modules:
        module.register_forward_hook(hook)
    add_counter(row, label, lambda: calls["n"])


def count_engine_work(model, row: str, reference_passes: bool = True) -> None:
    """The engine's own counters (``attach_stats``): blocks that did identity work, reference passes."""
    from likeness.attention_patches import attach_stats

    stats = attach_stats(model)
    add_counter(row, "calls", lambda: sum(stats.site_calls.values()))
    if reference_passes:
        add_counter(row, "reference passes", lambda: stats.capture_passes)


def _counts(name: str) -> dict[str, int]:
    return {label: total() for label, total in COUNTERS.get(name, {}).items()}


# ------------------------------------------------------------------------------------------ model

def random_value(name: str, shape, generator, dtype):
    """RMSNorm scales 1, biases 0, everything else N(0, 0.02)."""
    import torch

    if name.endswith(".scale"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def load_random_weights(module, folder: str | None, seed: int, dtype) -> None:
    """Random weights for a module built on the meta device: memory-mapped from ``folder`` (written on first use, one
    file per block so no more than one block is ever held in anonymous memory), or in memory when ``folder`` is None."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    groups: dict[str, list] = {}
    for name, p in module.named_parameters():
        parts = name.split(".")
        groups.setdefault(".".join(parts[:2]) if parts[1].isdigit() else parts[0], []).append((name, p.shape))
    state = {}
    for index, (group, params) in enumerate(groups.items()):
        if folder is None:
            state.update({n: random_value(n, s, generator, dtype) for n, s in params})
            continue
        path = os.path.join(folder, f"{index:03d}-{group}.pt")
        if not os.path.isfile(path):
            os.makedirs(folder, exist_ok=True)
            torch.save({n: random_value(n, s, generator, dtype) for n, s in params}, path + ".part")
            os.replace(path + ".part", path)
        state.update(torch.load(path, mmap=True, weights_only=True))
    module.load_state_dict(state, assign=True, strict=True)


def build_flux(shape: Shape, dtype, weights_dir: str | None):
    """A ``ModelPatcher`` of ComfyUI's FLUX.1(-dev) model of ``shape`` with random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.Flux(shape.dit_config())
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device="meta")
    folder = None
    if weights_dir:
        key = f"flux-{shape.hidden}-{shape.heads}-{shape.double}-{shape.single}-{shape.context_dim}-{shape.vec_dim}"
        folder = os.path.join(weights_dir, key, str(dtype).replace("torch.", ""))
    load_random_weights(model.diffusion_model, folder, 0, dtype)
    model.device = mm.get_torch_device()     # built on meta, now holding CPU weights
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def flux_conditioning(shape: Shape, seed: int = 1, guidance: float = 3.5) -> list:
    """A FLUX CONDITIONING as CLIPTextEncode + FluxGuidance make it: T5 states, CLIP-L pooled output, guidance."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, shape.text_tokens, shape.context_dim, generator=generator),
             {"pooled_output": torch.randn(1, shape.vec_dim, generator=generator), "guidance": guidance}]]


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def wait_for_quiet(max_wait: float, busy_cores: float = 0.3, window: float = 0.5) -> float:
    """Wait (at most ``max_wait`` s) until the other processes of a shared machine use less than ``busy_cores``
    cores over ``window`` s (this process is idle meanwhile); returns the seconds waited. Contention only ever
    slows a run down, so timing runs started on a quiet machine are the comparable ones."""
    if max_wait <= 0 or not os.path.exists("/proc/stat"):
        return 0.0
    start = time.perf_counter()
    cores = os.cpu_count() or 1
    while True:
        busy0, total0 = _busy_jiffies()
        time.sleep(window)
        busy1, total1 = _busy_jiffies()
        used = cores * (busy1 - busy0) / max(total1 - total0, 1)
        waited = time.perf_counter() - start
        if used < busy_cores or waited >= max_wait:
            return waited


def sample(model, positive, latent_side: int, steps: int) -> tuple[float, float]:
    """One ``comfy.sample.sample`` run (CFG 1: cond only); its wall and process CPU seconds."""
    import comfy.sample
    import torch

    latent = torch.zeros(1, 16, latent_side, latent_side)
    noise = comfy.sample.prepare_noise(latent, 42)
    gc.collect()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, positive, latent, seed=42,
                            disable_pbar=True)
    return time.perf_counter() - wall0, time.process_time() - cpu0


# ------------------------------------------------------------------------------------------ workers

def _worker_setup(args):
    _setup(argparse.Namespace(comfyui=args.comfyui, threads=args.threads))
    import torch

    return getattr(torch, args.dtype)


def shape_of(args) -> Shape:
    if args.tiny:
        return TINY
    return Shape(double=args.double, single=args.single, latent=args.latent, text_tokens=args.text_tokens)


def setting_of(args, dtype) -> Setting:
    return Setting(shape_of(args), dtype, os.path.join(args.weights_dir, "tiny") if args.tiny else args.weights_dir)


def _build_row(rows: dict, name: str, base, setting: Setting):
    try:
        return rows[name].build(base, setting), None
    except RowUnavailable as exc:
        return None, str(exc)


def _resident_mib() -> float:
    """VmRSS after a garbage collection and glibc's ``malloc_trim`` (what the process keeps, not what its allocator
    caches)."""
    from likeness.trainers.memory import release_free_memory

    gc.collect()
    release_free_memory()
    return _rss_kib() / 1024


def prepare_worker(rows: dict, args) -> dict:
    """Writes the DiT's and the rows' random weight files, so that no measuring worker pays for making them."""
    dtype = _worker_setup(args)
    setting = setting_of(args, dtype)
    if not args.tiny:
        build_flux(setting.shape, dtype, args.weights_dir)
    for row in rows.values():
        if row.prepare is not None:
            row.prepare(setting)
    return {}


def memory_worker(rows: dict, name: str, args) -> dict:
    """Model, the one row, one sampling run at full size: resident sets and peaks in MiB."""
    dtype = _worker_setup(args)
    shape = shape_of(args)
    base = build_flux(shape, dtype, None if args.tiny else args.weights_dir)
    positive = flux_conditioning(shape)
    sample(base, positive, 8, 1)            # code paths and ComfyUI's allocations, tiny latent
    model_mib = _resident_mib()
    model, skipped = _build_row(rows, name, base, setting_of(args, dtype))
    if model is None:
        return {"skipped": skipped}
    applied_mib = _resident_mib()
    with RssSampler() as sampler:
        sample(model, positive, shape.latent, args.steps)
    return {"model_mib": model_mib, "applied_mib": applied_mib, "after_mib": _resident_mib(),
            "sampling_peak_mib": sampler.peak / 1024, "hwm_mib": _rss_kib("VmHWM") / 1024}


def timing_worker(rows: dict, args) -> dict:
    """Every row on a clone of one model; warm-up, then ``args.rounds`` interleaved rounds (seeded order)."""
    import torch

    dtype = _worker_setup(args)
    shape = shape_of(args)
    t0 = time.perf_counter()
    base = build_flux(shape, dtype, None if args.tiny else args.weights_dir)
    build_s = time.perf_counter() - t0
    positive = flux_conditioning(shape)
    models, skipped = {}, {}
    for name in rows:
        model, reason = _build_row(rows, name, base, setting_of(args, dtype))
        if model is None:
            skipped[name] = reason
        else:
            models[name] = model
    warmup, counts = {}, {}
    for name, model in models.items():
        before = _counts(name)
        warmup[name] = sample(model, positive, shape.latent, args.steps)[0]
        counts[name] = {label: [total - before[label]] for label, total in _counts(name).items()}
    times: dict[str, list] = {name: [] for name in models}
    order = list(models)
    shuffler = random.Random(0)
    waits = []
    for _ in range(args.rounds):
        shuffler.shuffle(order)
        for name in order:
            waits.append(wait_for_quiet(args.quiet_wait, busy_cores=max(0.3, (os.cpu_count() or 1) - args.threads - 0.3)))
            before = _counts(name)
            times[name].append(sample(models[name], positive, shape.latent, args.steps))
            for label, total in _counts(name).items():
                counts[name][label].append(total - before[label])
    params = sum(p.numel() for p in base.model.diffusion_model.parameters())
    return {"times": times, "warmup": warmup, "counts": counts, "waits": waits, "quiet_wait": args.quiet_wait, "skipped": skipped, "params": params, "build_s": build_s,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "load": os.getloadavg()[0]}


def worker_main(rows: dict, args) -> int:
    mode = args.worker
    if mode == "prepare":
        result = prepare_worker(rows, args)
    elif mode == "timing":
        result = timing_worker(rows, args)
    else:
        result = memory_worker(rows, mode.split(":", 1)[1], args)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ------------------------------------------------------------------------------------------ parent

def add_arguments(parser) -> None:
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI checkout")
    parser.add_argument("--double", type=int, default=2, help="double blocks (FLUX.1: 19)")
    parser.add_argument("--single", type=int, default=4, help="single blocks (FLUX.1: 38)")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--text-tokens", type=int, default=512, help="T5 tokens of the conditioning")
    parser.add_argument("--steps", type=int, default=1, help="sampling steps per timed run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine a one-thread run is preempted least; its "
                             "walls repeat to ~2 %%, two threads' varied by 30 %%)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-row memory workers")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="before each timed run wait up to this many seconds until other processes leave this "
                             "run's threads a free core each (0: never wait)")
    parser.add_argument("--tiny", action="store_true",
                        help="CI smoke size: hidden 128, 2 + 4 blocks, 8x8 latent, 16 text tokens, 1 round, no quiet gate")
    parser.add_argument("--weights-dir", default=os.path.join(tempfile.gettempdir(), "likeness-flux-bench-weights"),
                        help="where the random DiT weights are written once and memory-mapped from")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def worker_flags(args) -> list[str]:
    flags = ["--comfyui", args.comfyui, "--double", str(args.double), "--single", str(args.single),
             "--latent", str(args.latent), "--text-tokens", str(args.text_tokens), "--steps", str(args.steps),
             "--rounds", str(args.rounds), "--dtype", args.dtype, "--threads", str(args.threads),
             "--quiet-wait", str(args.quiet_wait),
             "--weights-dir", args.weights_dir]
    return flags + (["--tiny"] if args.tiny else [])


def run_benchmark(script: str, title: str, rows: dict, args, extra_flags: list[str] = (),
                  notes: list[str] = ()) -> dict:
    """Parent side: configuration, memory workers, timing worker, the table. Returns the workers' results."""
    if args.tiny:
        args.rounds, args.quiet_wait = 1, 0.0
    shape = shape_of(args)
    print(f"== {title}")
    print(f"model: {shape.describe()}; random weights, {args.dtype}, SDPA (--cpu --use-pytorch-cross-attention)")
    print(f"sampling: comfy.sample.sample euler/simple, {args.steps} step(s), CFG 1 (guidance-distilled single pass, "
          f"guidance 3.5), batch 1, inference_mode; 1 warm-up + {args.rounds} interleaved round(s) in one worker "
          f"process; memory: one fresh worker process per row")
    for name, row in rows.items():
        print(f"  {name:12s} {row.description}")
    for note in notes:
        print(f"  note: {note}")
    sys.stdout.flush()
    memory = {}
    run_worker(script, "prepare", [*worker_flags(args), *extra_flags], args.threads)
    if not args.no_memory:
        for name in rows:
            memory[name] = run_worker(script, f"memory:{name}", [*worker_flags(args), *extra_flags], args.threads)
    timing = run_worker(script, "timing", [*worker_flags(args), *extra_flags], args.threads)
    report(rows, timing, memory)
    return {"timing": timing, "memory": memory}


def report(rows: dict, timing: dict, memory: dict) -> None:
    print("wall/cpu s: median per sampling run; calls: identity work per timed sampling run (blocks that got an ID "
          "residual or joined face keys, as the engine counts them; lldacing: its cross-attention modules run)")
    print(f"== host: torch {timing['torch']}, {timing['threads']} threads, {timing['cpu']}, load {timing['load']:.1f}; "
          f"DiT {timing['params'] / 1e6:.1f} M params (built in {timing['build_s']:.1f} s)")
    for name, reason in timing["skipped"].items():
        print(f"  {name}: not run: {reason}")
    times = timing["times"]
    med = statistics.median
    waits = timing.get("waits", [])
    if waits:
        print(f"quiet gate: waited {sum(waits):.0f} s before {len(waits)} timed runs; {sum(w >= timing_wait_cap(timing) for w in waits)} "
              f"started at the cap (machine still busy)")
    print(f"{'row':12s} {'wall s':>8s} {'min-max':>13s} {'cpu s':>8s} {'warm-up':>8s} {'calls':>6s}  vs unpatched "
          f"(median of per-round ratios; min/min)")
    for name, runs in times.items():
        walls = [w for w, _ in runs]
        line = (f"{name:12s} {med(walls):8.2f} {min(walls):6.2f}-{max(walls):<6.2f} {med(c for _, c in runs):8.2f} "
                f"{timing['warmup'][name]:8.2f} {_calls_per_run(timing['counts'][name]):>6}")
        if name != "unpatched" and "unpatched" in times:
            line += (f"  x{paired_ratio(runs, times['unpatched']):.3f} wall, "
                     f"x{paired_ratio(runs, times['unpatched'], 1):.3f} cpu; x{min_ratio(runs, times['unpatched']):.3f}"
                     f" min wall")
        print(line)
    for name, counts in timing["counts"].items():
        for label, values in list(counts.items())[1:]:
            print(f"  {name}: {label}: {values[0]} in the warm-up run, {values[1:]} in the timed runs")
    for name, row in rows.items():
        for limit, other in row.targets:
            if name not in times or other not in times:
                print(f"target {name}/{other} <= {limit:.2f}: not measured ({name if name not in times else other} "
                      f"did not run)")
                continue
            wall, cpu = paired_ratio(times[name], times[other]), paired_ratio(times[name], times[other], 1)
            print(f"target {name}/{other} <= {limit:.2f}: x{wall:.3f} wall (x{cpu:.3f} cpu, "
                  f"x{min_ratio(times[name], times[other]):.3f} min wall) {'PASS' if wall <= limit else 'MISS'}")
    if memory:
        print_memory(memory)


def _calls_per_run(counts: dict) -> str:
    """The first counter's value per timed run (one number when every run did the same)."""
    if not counts:
        return "-"
    values = set(next(iter(counts.values()))[1:])
    return str(values.pop()) if len(values) == 1 else "/".join(map(str, sorted(values)))


def min_ratio(runs, base) -> float:
    """Fastest wall of ``runs`` over the fastest of ``base`` (contention only slows runs down)."""
    return min(w for w, _ in runs) / min(w for w, _ in base)


def timing_wait_cap(timing: dict) -> float:
    return timing.get("quiet_wait", 0.0) or float("inf")


def paired_ratio(runs, base, which: int = 0) -> float:
    """Median over rounds of ``runs[i] / base[i]`` (wall: which 0, CPU: 1)."""
    return statistics.median(r[which] / b[which] for r, b in zip(runs, base, strict=True))


def print_memory(memory: dict) -> None:
    base = memory.get("unpatched", {})
    print("memory (MiB, one fresh worker per row; + = over the unpatched worker): resident (after gc + malloc_trim) "
          "after the model was built and run once, after the row was applied, after sampling; peak resident while "
          "sampling; process high-water mark (includes loading transients)")
    print(f"{'row':12s} {'model':>7s} {'applied':>8s} {'after':>8s} {'sampling peak':>14s} {'HWM':>8s}  added "
          f"(resident after / sampling peak / HWM)")
    for name, m in memory.items():
        if "skipped" in m:
            print(f"{name:12s} not run: {m['skipped']}")
            continue
        added = ""
        if base and "skipped" not in base and name != "unpatched":
            added = (f"+{m['after_mib'] - base['after_mib']:.0f} / +{m['sampling_peak_mib'] - base['sampling_peak_mib']:.0f}"
                     f" / +{m['hwm_mib'] - base['hwm_mib']:.0f}")
        print(f"{name:12s} {m['model_mib']:7.0f} {m['applied_mib']:8.0f} {m['after_mib']:8.0f} "
              f"{m['sampling_peak_mib']:14.0f} {m['hwm_mib']:8.0f}  {added}")
