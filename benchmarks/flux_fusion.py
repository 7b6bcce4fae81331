"""Benchmark: Face Fusion's cost on a FLUX.1 DiT in real ComfyUI sampling (CPU).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/flux_fusion.py [--double 2 --single 4] [--rounds 5]
        [--rows unpatched,cached,per-step] [--tiny]

The model and the harness are ``flux_bench.py``'s (FLUX.1-dev width, 2 of the 19 double + 4 of the 38 single
blocks by default, 512 px, 512 T5 tokens, bf16). Rows:

- ``unpatched``: the model as loaded;
- ``cached``: Face Fusion with an untrained Flux adapter (``new_fusion_adapter``: identity-init low-rank key/value
  projections per block), one reference latent of the generated image's size (64x64: a 512 px face, 1024
  reference tokens), ``capture_mode="cached_clean"`` (one reference pass per model clone, paid in the warm-up),
  the node's other defaults (weight 1, uncond none, all blocks); every block's joint attention sees the 1024 face
  keys besides its text and image keys. Target <= 1.15 x unpatched;
- ``per-step`` (on request, ``--rows``): the paper's mode, one reference pass per sampling step (cost shown, no
  target).

The adapter's projections are identity-initialised, so an untrained adapter costs what a trained one does.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import flux_bench  # noqa: E402
from flux_bench import Row, RowUnavailable  # noqa: E402


def fusion_row(capture_mode: str):
    def build(base, setting):
        try:
            from likeness.techniques.face_fusion import FusionIdentityLatents, apply_face_fusion, new_fusion_adapter
        except ImportError as exc:
            raise RowUnavailable(f"Face Fusion on Flux is not on this branch ({exc})") from exc
        import torch

        try:
            adapter = new_fusion_adapter(base)
        except Exception as exc:   # the UNet-only adapter refuses a DiT: Flux support is not on this branch
            raise RowUnavailable(f"Face Fusion on Flux is not on this branch ({exc})") from exc
        side = setting.shape.latent
        reference = torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(9))
        model = apply_face_fusion(base, adapter, [FusionIdentityLatents(reference)], capture_mode=capture_mode)
        flux_bench.count_engine_work(model, ROW_OF_MODE[capture_mode])
        return model
    return build


ROW_OF_MODE = {"cached_clean": "cached", "per_step": "per-step"}


ROWS = {
    "unpatched": Row("the model as loaded", flux_bench.unpatched),
    "cached": Row("Face Fusion, untrained Flux adapter, 1 reference (64x64 latent, 1024 tokens), cached_clean "
                  "capture", fusion_row("cached_clean"), targets=((1.15, "unpatched"),)),
    "per-step": Row("as cached with per_step capture (the paper: one reference pass per step)", fusion_row("per_step")),
}
DEFAULT_ROWS = "unpatched,cached"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    flux_bench.add_arguments(parser)
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"rows to run, of {', '.join(ROWS)}")
    args = parser.parse_args(argv)
    if not args.comfyui or not os.path.isfile(os.path.join(args.comfyui, "comfy", "model_patcher.py")):
        parser.error("set COMFYUI_PATH or --comfyui to a ComfyUI checkout")
    names = [n for n in args.rows.split(",") if n]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    rows = {name: ROWS[name] for name in names}
    if args.worker:
        return flux_bench.worker_main(rows, args)
    flux_bench.run_benchmark(__file__, "Face Fusion on FLUX.1 vs unpatched", rows, args, extra_flags=["--rows", args.rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
