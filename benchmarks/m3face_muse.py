"""Benchmark: M3Face text -> condition map with a full-size aMUSEd-512 Muse (random weights), ours vs diffusers.

    python benchmarks/m3face_muse.py [--steps 12] [--runs 1] [--device auto]

Builds the aMUSEd-512 transformer (UVit2DModel: 22 layers, hidden 1024, 32x32 token grid downsampled to 16x16),
its VQ model (5 levels, 8192 codes, 512 px) and a CLIP-L text encoder with projection (12 layers, 768) in memory
with seeded random weights, and a byte-level CLIP tokenizer (77 tokens). Random weights cost what trained ones
cost: the unmasking schedule always runs every step on every token.

Configurations, each generating one 512x512 condition map with the same seed, steps and guidance 10:

- ours: ``techniques.m3face.muse.text_to_condition`` (what the M3Face Text to Condition node runs: the modality
  prefix, ComfyUI-style progress callback, moving the model to its device and back, the VQ decode);
- diffusers: ``AmusedPipeline.__call__`` on the same modules and prompt, ``output_type="np"``.

Prints the configuration, seconds per run of each (``--no-reference``: ours only), ``ratio`` = ours / diffusers and whether both made the same
image (same generator seed -> same tokens).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

PROMPT = "This attractive woman has narrow eyes, rosy cheeks, and wears heavy makeup."
TRANSFORMER_512 = dict(hidden_size=1024, use_bias=False, cond_embed_dim=768, micro_cond_encode_dim=256,
                       micro_cond_embed_dim=1280, encoder_hidden_size=768, vocab_size=8256, codebook_size=8192,
                       in_channels=768, block_out_channels=768, num_res_blocks=3, downsample=True, upsample=True,
                       block_num_heads=12, num_hidden_layers=22, num_attention_heads=16, intermediate_size=2816,
                       layer_norm_eps=1e-6, ln_elementwise_affine=True, sample_size=32)
VQ_512 = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 5,
              up_block_types=["UpDecoderBlock2D"] * 5, block_out_channels=[128, 256, 256, 512, 768], layers_per_block=2,
              norm_num_groups=32, latent_channels=64, num_vq_embeddings=8192, sample_size=32, lookup_from_codebook=True,
              force_upcast=True, mid_block_add_attention=False)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, projection_dim=768)


def build_model(device: torch.device):
    from diffusers import AmusedScheduler, UVit2DModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from likeness.host.devices import half_precision_dtype
    from likeness.techniques.m3face.muse import CLIP, MuseModel
    from m3face_support import write_clip_tokenizer

    dtype = half_precision_dtype(device)
    tokenizer_dir = tempfile.mkdtemp(prefix="likeness_muse_tok_")
    vocab = write_clip_tokenizer(tokenizer_dir, max_length=77)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    text_config = CLIPTextConfig(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                 pad_token_id=vocab - 1, **CLIP_L_TEXT)
    text_encoder = CLIPTextModelWithProjection(text_config).to(dtype).eval()
    transformer = UVit2DModel(**TRANSFORMER_512).eval()
    if dtype != torch.float32:
        transformer.to(dtype)
    vqvae = VQModel(**VQ_512).eval()
    scheduler = AmusedScheduler(mask_token_id=TRANSFORMER_512["vocab_size"] - 1)
    return MuseModel("amused-512 (random)", "", transformer, vqvae, scheduler, tokenizer, text_encoder, CLIP, device,
                     dtype)


def parameters(module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f}M"


def run_ours(model, steps: int, seed: int):
    from likeness.techniques.m3face.muse import text_to_condition

    start, cpu = time.perf_counter(), time.process_time()
    result = text_to_condition(model, PROMPT, "segmentation", steps=steps, guidance=10.0, seed=seed)
    # CPU seconds of this process too: on a shared machine the wall time also counts other processes' turns
    print(f"ours: process CPU {time.process_time() - cpu:.1f}s", flush=True)
    return time.perf_counter() - start, result.image


def run_diffusers(model, steps: int, seed: int):
    from likeness.techniques.m3face.muse import _move, prefixed_prompt

    pipe = model.pipeline("text")
    _move(model, model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        images = pipe(prefixed_prompt(PROMPT, "segmentation"), num_inference_steps=steps, guidance_scale=10.0,
                      generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    seconds = time.perf_counter() - start
    _move(model, torch.device("cpu"))
    return seconds, torch.from_numpy(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--runs", type=int, default=1, help="timed runs of each configuration (median printed)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-reference", action="store_true", help="time ours only (half the time on a slow CPU)")
    args = parser.parse_args()

    from _bootstrap import load_pack

    load_pack()
    from likeness.host.devices import torch_device

    device = torch_device(args.device)
    start = time.perf_counter()
    model = build_model(device)
    print(f"config: aMUSEd-512 transformer {parameters(model.transformer)} (22 layers, hidden 1024, grid 32x32), "
          f"VQ {parameters(model.vqvae)} (x{model.vae_scale_factor}), CLIP-L text {parameters(model.text_encoder)}; "
          f"{model.resolution}px, steps {args.steps}, guidance 10, batch 1, device {device}, dtype {model.dtype}, "
          f"torch threads {torch.get_num_threads()}, built in {time.perf_counter() - start:.1f}s", flush=True)
    ours, theirs, same = [], [], True
    for run in range(args.runs):
        seconds, image = run_ours(model, args.steps, seed=run)
        ours.append(seconds)
        print(f"run {run}: ours {ours[-1]:.2f}s", flush=True)
        if not args.no_reference:
            seconds, reference = run_diffusers(model, args.steps, seed=run)
            theirs.append(seconds)
            same = same and torch.allclose(image, reference.float(), atol=1e-5)
            print(f"run {run}: diffusers {theirs[-1]:.2f}s", flush=True)
    ours_s = sorted(ours)[len(ours) // 2]
    line = f"ours {ours_s:.2f}s ({ours_s / args.steps:.2f}s/step incl. text + VQ decode)"
    if theirs:
        theirs_s = sorted(theirs)[len(theirs) // 2]
        line += f"  diffusers {theirs_s:.2f}s  ratio {ours_s / theirs_s:.2f}  same image: {same}"
    print(line)


if __name__ == "__main__":
    main()
