"""Identity LoRA training: FaceA-Net's trainer against ComfyUI's own TrainLoraNode, side by side.

Both run on the same UNet (the full SD1.5-inpainting UNet config by default: 859.5 M parameters, 9 input
channels, random weights), the same reference photos (the astronaut and two faces of insightface's
t1.jpg, cropped to the working size), the same LoRA rank, batch size and number of steps, on the CPU.
Everything else is each trainer's own default: ours trains with precision "auto" (bf16 mixed precision on
a CPU with bf16 units, else fp32; ``--ours-precision``), releasing freed heap pages between layers on
the CPU; TrainLoraNode in its default bf16
(``training_dtype`` / ``lora_dtype``; ``--native-dtype fp32`` for comparison), lr 5e-4, gradient
checkpointing on. Each trainer runs in its own subprocess so that its peak RSS is its own.

- step time: median wall time between consecutive optimizer steps (the first step, which pays for
  first-touch memory and lazy init, is excluded);
- peak RSS: the process's high-water mark (VmHWM) after training; the increase over the RSS before
  training started is printed too.

The text encoder and the VAE are shape-correct stand-ins (a 2-layer CLIP text model of width 768 with
the real SD1 tokenizer, a small 8x AutoencoderKL): they only prepare the data, identically for both
trainers, and are not what is compared.

Run:  COMFYUI_PATH=/path/to/ComfyUI python benchmarks/identity_lora.py [--steps 3] [--size 128] [--model full|small]
Prints both configurations, a table, then ``time ratio N.NN`` and ``memory ratio N.NN`` (ours / native;
lower is better).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from worker_process import RESULT_PREFIX, run_worker  # noqa: E402

# ------------------------------------------------------------------------------------------ worker side

def _rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class RssSampler:
    """Polls VmRSS every 10 ms from a thread (the high-water mark VmHWM is read at the end as well)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_kib())
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_kib())


def _setup(args):
    sys.path.insert(0, ROOT)
    from _bootstrap import load_pack

    load_pack()
    from likeness.host.headless import prepare_host

    prepare_host(args.comfyui, "cpu", base_directory=tempfile.mkdtemp(prefix="likeness-bench-"))
    import torch

    torch.set_num_threads(args.threads)
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)


def unet_config(kind: str, in_channels: int) -> dict:
    config = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
              "legacy": False, "adm_in_channels": None, "in_channels": in_channels, "model_channels": 320,
              "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
              "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
              "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
              "use_temporal_attention": False, "use_temporal_resblock": False}
    if kind == "small":  # same block structure, 4x fewer channels (for quick runs)
        config["model_channels"] = 96
    return config


def init_random(module, seed: int) -> None:
    """N(0, 1/fan_in) matrices and kernels, norm weights 1, everything else 0: activations keep their scale."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()


def build_models(args):
    """(ModelPatcher, CLIP, VAE), weights created under inference mode as ComfyUI's loaders do."""
    import functools

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.inference_mode():
        config = comfy.supported_models.SD15(unet_config(args.model, 9))
        config.set_inference_dtype(torch.float32, None)
        base = config.get_model({})
        init_random(base.diffusion_model, 0)
        patcher = comfy.model_patcher.ModelPatcher(base, mm.get_torch_device(), mm.unet_offload_device())
        text_config = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
                       "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
                       "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
                       "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
                       "num_hidden_layers": 2, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408}

        class SmallClip(comfy.sd1_clip.SD1ClipModel):
            def __init__(self, device="cpu", dtype=None, model_options=None, **kw):
                model = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=dict(text_config),
                                          return_projected_pooled=False)
                super().__init__(device=device, dtype=dtype, model_options=model_options or {}, clip_model=model,
                                 **kw)

        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, SmallClip),
                             model_options={"dtype": torch.float32})
        init_random(clip.cond_stage_model, 1)
        params = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                               "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                                               "attn_resolutions": [], "dropout": 0.0}}
        ae = AutoencoderKL(**params)
        init_random(ae, 2)
        vae = comfy.sd.VAE(sd=ae.state_dict(), config={"params": params})
    return patcher, clip, vae


def reference_photos():
    import importlib.util

    import numpy as np
    import skimage.data
    import torch
    from PIL import Image

    spec = importlib.util.find_spec("insightface")
    t1 = np.asarray(Image.open(os.path.join(list(spec.submodule_search_locations)[0], "data", "images", "t1.jpg"))
                    .convert("RGB"))
    crops = [skimage.data.astronaut(), t1[150:550, 330:730], t1[100:500, 800:1200]]
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize((512, 512), Image.LANCZOS)) for c in crops]
    return torch.from_numpy(np.stack(out)).float() / 255


class StepClock:
    """Timestamps every AdamW step (both trainers use torch.optim.AdamW)."""

    def __init__(self):
        import torch

        self.times: list[float] = []
        original = torch.optim.AdamW.step
        clock = self

        def step(self_opt, *a, **k):
            out = original(self_opt, *a, **k)
            clock.times.append(time.perf_counter())
            return out
        torch.optim.AdamW.step = step

    def step_seconds(self) -> float:
        gaps = [b - a for a, b in itertools.pairwise(self.times)]
        return statistics.median(gaps) if gaps else float("nan")


def worker(args) -> dict:
    _setup(args)
    import torch

    from likeness.face_analysis.analyzers.dlib_backend import load_dlib
    from likeness.techniques.facea_net.training import (
        IdentityTask,
        TrainSettings,
        prepare_references,
        train_identity_task,
    )

    t0 = time.perf_counter()
    patcher, clip, vae = build_models(args)
    settings = TrainSettings(class_word="woman", steps=args.steps, rank=args.rank, batch_size=args.batch, seed=0,
                             working_size=args.size, final_preview=False, checkpoint_every=0,
                             gradient_checkpointing=args.ours_checkpointing == "on", precision=args.ours_precision)
    with torch.inference_mode():
        refs = prepare_references(reference_photos(), load_dlib(), settings)
    params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    clock = StepClock()
    info = {"trainer": args.worker, "unet_params": params, "setup_s": round(time.perf_counter() - t0, 1)}
    if args.worker == "ours":
        with torch.inference_mode():
            trainer = IdentityTask(patcher, clip, vae, refs, settings)
            trained = sum(p.numel() for p in trainer.trainables().values())
            compute = "bf16 mixed precision (fp32 LoRA/AdamW)" if trainer.compute_dtype else "fp32"
            release = "on" if trainer.release_memory and settings.gradient_checkpointing else "off"
            rss_before = _rss_kib()
            start = time.perf_counter()
            with RssSampler() as sampler:
                train_identity_task(trainer)
        info.update(config=f"FaceA-Net trainer: LoRA rank {args.rank} on attention to_q/k/v/out only "
                           f"(activation-side adapters), + [feat] embeddings; precision {args.ours_precision} = "
                           f"{compute}; AdamW lr 1.2e-4 / 2e-3; masked eps loss; gradient checkpointing "
                           f"{args.ours_checkpointing}; freed-memory release {release}",
                    trainable_params=trained)
    else:
        import comfy_extras.nodes_train as nodes_train

        from likeness.techniques.facea_net.inpaint import masked_pixels
        from likeness.techniques.facea_net.prompt import encode_task_template

        with torch.inference_mode():
            crops = torch.stack([r.crop for r in refs])
            latents = {"samples": vae.encode(crops)}
            cond = encode_task_template(clip, "woman", "face", 4).cond
            positive = []
            for r in refs:
                mask = r.masks["face"][None]
                concat = vae.encode(masked_pixels(r.crop[None], mask))
                positive.append([cond, {"concat_latent_image": concat, "concat_mask": mask[None]}])
            rss_before = _rss_kib()
            start = time.perf_counter()
            with RssSampler() as sampler:
                _model, lora, _loss, _steps = nodes_train.TrainLoraNode().train(
                    patcher, latents, positive, batch_size=args.batch, steps=args.steps, grad_accumulation_steps=1,
                    learning_rate=5e-4, rank=args.rank, optimizer="AdamW", loss_function="MSE", seed=0,
                    training_dtype=args.native_dtype, lora_dtype=args.native_dtype, algorithm="LoRA",
                    gradient_checkpointing=args.native_checkpointing == "on", existing_lora="[None]")
        info.update(config=f"ComfyUI TrainLoraNode: LoRA rank {args.rank} on every Linear/Conv (+ norm/bias diffs), "
                           f"weight-side adapters; training/lora dtype {args.native_dtype}; AdamW lr 5e-4 (its defaults except "
                           f"the matched model, rank, batch and steps); MSE (x0) "
                           f"loss; gradient checkpointing {args.native_checkpointing}",
                    trainable_params=sum(t.numel() for t in lora.values()))
    info.update(train_s=round(time.perf_counter() - start, 1), step_s=clock.step_seconds(), steps=len(clock.times),
                rss_before_mib=rss_before / 1024, peak_train_mib=sampler.peak / 1024, hwm_mib=_rss_kib("VmHWM") / 1024)
    return info


# ------------------------------------------------------------------------------------------ parent side

def run_kind(kind: str, args) -> dict:
    return run_worker(__file__, kind, [
        "--comfyui", args.comfyui, "--steps", str(args.steps), "--batch", str(args.batch), "--rank", str(args.rank),
        "--size", str(args.size), "--model", args.model, "--threads", str(args.threads),
        "--native-dtype", args.native_dtype, "--native-checkpointing", args.native_checkpointing,
        "--ours-checkpointing", args.ours_checkpointing, "--ours-precision", args.ours_precision], args.threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI checkout")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per trainer (>= 3: the first is not timed)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=48)
    parser.add_argument("--size", type=int, default=128,
                        help="working crop side in pixels (latent = size / 8); 512 is the real setting, 128 keeps "
                             "a CPU run near 10 minutes")
    parser.add_argument("--model", choices=["full", "small"], default="full",
                        help="full: the SD1.5(-inpainting) UNet config; small: 96 channels instead of 320")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--native-dtype", choices=["fp32", "bf16"], default="bf16",
                        help="TrainLoraNode's training_dtype and lora_dtype (its default: bf16)")
    parser.add_argument("--native-checkpointing", choices=["on", "off"], default="on",
                        help="TrainLoraNode's gradient checkpointing (its default is on)")
    parser.add_argument("--ours-checkpointing", choices=["on", "off"], default="on",
                        help="our trainer's gradient checkpointing (the Train Identity node's default is on)")
    parser.add_argument("--ours-precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="our trainer's precision setting (the Train Identity node's default is auto)")
    parser.add_argument("--worker", choices=["ours", "native"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.comfyui:
        parser.error("set --comfyui or COMFYUI_PATH")
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker(args)), flush=True)
        return 0
    print(f"UNet: SD1.5-inpainting config ({args.model}), random weights, fp32 weights, CPU, {args.threads} threads; "
          f"crops {args.size}x{args.size} (latent {args.size // 8}x{args.size // 8}); batch {args.batch}; "
          f"rank {args.rank}; {args.steps} steps; one subprocess per trainer", flush=True)
    results = {kind: run_kind(kind, args) for kind in ("ours", "native")}
    for kind, r in results.items():
        print(f"[{kind}] {r['config']}")
        print(f"[{kind}] UNet params {r['unet_params'] / 1e6:.1f} M, trainable {r['trainable_params'] / 1e6:.2f} M, "
              f"setup {r['setup_s']} s, training {r['train_s']} s for {r['steps']} steps")
    print(f"{'trainer':8} {'step s':>8} {'peak RSS MiB':>13} {'RSS before':>11} {'train peak':>11}")
    for kind, r in results.items():
        print(f"{kind:8} {r['step_s']:8.2f} {r['hwm_mib']:13.0f} {r['rss_before_mib']:11.0f} {r['peak_train_mib']:11.0f}")
    ours, native = results["ours"], results["native"]
    print(f"time ratio {ours['step_s'] / native['step_s']:.2f}")
    print(f"memory ratio {ours['hwm_mib'] / native['hwm_mib']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
