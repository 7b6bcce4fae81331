"""M3Face Imagic stage 2 (the model fine-tune): the official up-block subset against the LoRA option, side by side.

Both run the pack's FinetuneStage through the shared training loop on the full SD1.5 UNet (859.5 M parameters)
with a full-size SD1.5 ControlNet (random weights, N(0, 1/fan_in), norms 1, biases 0; fp32, or bf16 with
``--weights-dtype bf16``, as a GPU holds SD1.5 in half precision) fed a 512x512 condition map, at 512 px
(latent 64x64), batch 1, SDPA attention (``--cpu --use-pytorch-cross-attention``), on the CPU.
Each mode runs in its own subprocess so that its peak RSS is its own:

- up_blocks: fp32 copies of the 230 parameters of diffusers' up blocks 2 and 3 (the edit script's default
  ``--unet_layer 2and3``), Adam lr 5e-5;
- lora: rank-``--rank`` LoRA on the attention projections of the same output blocks, Adam lr 5e-5.

- step time: median wall time between consecutive optimizer steps; the first step (warm-up: first-touch
  memory, lazy init) is excluded, so ``--steps 3`` is 1 warm-up + 2 timed steps;
- peak RSS: the process's high-water mark (VmHWM) after training, and the RSS before training started.

The photo latent comes from a small stand-in VAE (it only prepares the data, identically for both modes).

Run:  COMFYUI_PATH=/path/to/ComfyUI python benchmarks/m3face_imagic.py [--steps 3] [--size 512] [--rank 16]
Prints the configuration, a table, then ``time ratio N.NN`` and ``memory ratio N.NN`` (lora / up_blocks).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from identity_lora import RssSampler, StepClock, _rss_kib, _setup, init_random, unet_config  # noqa: E402
from worker_process import RESULT_PREFIX, run_worker  # noqa: E402

MODES = ("up_blocks", "lora")


def build_models(size: int, weights_dtype: str):
    """(UNet ModelPatcher, ControlNet, VAE, photo, condition), weights created under inference mode as ComfyUI's
    loaders do, in ``weights_dtype`` (ComfyUI keeps SD1.5 in fp16 on a GPU; the trained copies stay fp32)."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    import comfy.sd
    import comfy.supported_models
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[weights_dtype]
    with torch.inference_mode():
        config = comfy.supported_models.SD15(unet_config("full", 4))
        config.set_inference_dtype(dtype, None)
        base = config.get_model({})
        init_random(base.diffusion_model, 0)
        patcher = comfy.model_patcher.ModelPatcher(base, mm.get_torch_device(), mm.unet_offload_device())
        cn_config = {k: v for k, v in unet_config("full", 4).items() if k != "out_channels"}
        control_model = comfy.cldm.cldm.ControlNet(hint_channels=3, dtype=dtype, device="cpu",
                                                   operations=comfy.ops.disable_weight_init, **cn_config)
        init_random(control_model, 1)
        control = comfy.controlnet.ControlNet(control_model, load_device=mm.get_torch_device())
        params = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                               "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                                               "attn_resolutions": [], "dropout": 0.0}}
        ae = AutoencoderKL(**params)
        init_random(ae, 2)
        vae = comfy.sd.VAE(sd=ae.state_dict(), config={"params": params})
        g = torch.Generator().manual_seed(3)
        photo = torch.rand(1, size, size, 3, generator=g)
        condition = (torch.rand(1, size // 16, size // 16, 3, generator=g) > 0.5).float()
        condition = condition.repeat_interleave(16, 1).repeat_interleave(16, 2)   # flat regions, like a mask
    return patcher, control, vae, photo, condition


def worker(args) -> dict:
    _setup(args)
    import torch

    from likeness.techniques.m3face.imagic import FinetuneStage, ImagicData, ImagicSettings, encode_photo
    from likeness.trainers.loop import TrainConfig, train

    t0 = time.perf_counter()
    patcher, control, vae, photo, condition = build_models(args.size, args.weights_dtype)
    settings = ImagicSettings(finetune_steps=args.steps, mode=args.worker, lora_rank=args.rank,
                              resolution=args.size, precision=args.precision,
                              gradient_checkpointing=args.checkpointing == "on", checkpoint_every=0)
    stage = settings.finetune_stage()
    with torch.inference_mode():
        latent = encode_photo(patcher, vae, photo, args.size)
        embedding = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(4))
        task = FinetuneStage(patcher, control, condition, ImagicData(latent, "benchmark"), stage, embedding)
    info = {"mode": args.worker, "setup_s": round(time.perf_counter() - t0, 1),
            "unet_params": sum(p.numel() for p in patcher.model.diffusion_model.parameters()),
            "controlnet_params": sum(p.numel() for p in control.control_model.parameters())}
    clock = StepClock()
    rss_before = _rss_kib()
    start = time.perf_counter()
    with torch.inference_mode(), RssSampler() as sampler:
        result = train(task, TrainConfig.from_settings(stage, progress_factory=lambda total, label: _Quiet()))
    info.update(trainable_params=sum(t.numel() for t in result.params.values()),
                compute="bf16 mixed precision" if task.compute_dtype else "fp32",
                train_s=round(time.perf_counter() - start, 1), step_s=clock.step_seconds(), steps=len(clock.times),
                rss_before_mib=rss_before / 1024, peak_train_mib=sampler.peak / 1024, hwm_mib=_rss_kib("VmHWM") / 1024,
                losses=result.losses)
    return info


class _Quiet:
    def update_absolute(self, value, preview=None):
        pass


def run_mode(mode: str, args) -> dict:
    return run_worker(__file__, mode, ["--comfyui", args.comfyui, "--steps", str(args.steps), "--rank", str(args.rank),
                                       "--size", str(args.size), "--threads", str(args.threads),
                                       "--precision", args.precision, "--checkpointing", args.checkpointing,
                                       "--weights-dtype", args.weights_dtype], args.threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI checkout")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per mode (the first is not timed)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (the Imagic Train node's default)")
    parser.add_argument("--size", type=int, default=512, help="photo side in pixels (latent = size / 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="the trainer's precision setting (the node's default is auto)")
    parser.add_argument("--checkpointing", choices=["on", "off"], default="off",
                        help="gradient checkpointing (the node's default is off)")
    parser.add_argument("--weights-dtype", choices=["fp32", "bf16"], default="fp32",
                        help="dtype of the frozen UNet and ControlNet weights (bf16 halves the base model's memory)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.comfyui:
        parser.error("set --comfyui or COMFYUI_PATH")
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker(args)), flush=True)
        return 0
    print(f"Imagic stage 2 on the SD1.5 UNet + SD1.5 ControlNet (random weights, {args.weights_dtype}, SDPA), CPU, "
          f"{args.threads} "
          f"threads; {args.size}x{args.size} px (latent {args.size // 8}x{args.size // 8}), batch 1; layers 2and3; "
          f"LoRA rank {args.rank}; precision {args.precision}; gradient checkpointing {args.checkpointing}; "
          f"{args.steps} steps (1 warm-up); one subprocess per mode", flush=True)
    results = {mode: run_mode(mode, args) for mode in MODES}
    for mode, r in results.items():
        print(f"[{mode}] UNet {r['unet_params'] / 1e6:.1f} M + ControlNet {r['controlnet_params'] / 1e6:.1f} M params, "
              f"trainable {r['trainable_params'] / 1e6:.2f} M, compute {r['compute']}, setup {r['setup_s']} s, "
              f"training {r['train_s']} s for {r['steps']} steps, losses {[round(v, 4) for v in r['losses']]}")
    print(f"{'mode':10} {'step s':>8} {'peak RSS MiB':>13} {'RSS before':>11} {'train peak':>11}")
    for mode, r in results.items():
        print(f"{mode:10} {r['step_s']:8.2f} {r['hwm_mib']:13.0f} {r['rss_before_mib']:11.0f} "
              f"{r['peak_train_mib']:11.0f}")
    full, lora = results["up_blocks"], results["lora"]
    print(f"time ratio {lora['step_s'] / full['step_s']:.2f}")
    print(f"memory ratio {lora['hwm_mib'] / full['hwm_mib']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
