"""``python path/to/likeness train fusion|consistentid --data DIR --checkpoint FILE ...``: the adapter trainers
outside the graph, on a folder of images with same-stem ``.txt`` captions.

The command runs the task the Train Face Fusion / Train ConsistentID node runs (same settings and defaults,
same training checkpoint and result file under ComfyUI's models folder for the same ``--name``, so the node
and the command line resume each other's runs). Started by ``torchrun`` it trains data-parallel, one
process per GPU (or CPU process with gloo), each on its share of every batch::

    torchrun --nproc-per-node 4 path/to/likeness train fusion --data faces/ --checkpoint sd15.safetensors \\
        --name my_faces --batch-size 8

Face Fusion on Flux takes the model as ComfyUI's separate files (or an all-in-one ``--checkpoint``)::

    python path/to/likeness train fusion --data faces/ --diffusion-model flux1-dev.safetensors \\
        --text-encoder clip_l.safetensors --text-encoder t5xxl_fp16.safetensors --vae ae.safetensors \\
        --resolution 512 --guidance 3.5 --precision bf16

Models are loaded by file through the host adapters (:mod:`..host.training`). Nothing here imports torch or
ComfyUI before the arguments are parsed, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields

from .console import say

logger = logging.getLogger("likeness")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
TECHNIQUES = ("fusion", "consistentid")
DEFAULT_NAMES = {"fusion": "my_face", "consistentid": "my_consistentid"}

# command-line option -> settings field, per technique (None = not given: the settings' own default)
COMMON_OPTIONS = {"steps": int, "lr": float, "batch_size": int, "grad_accumulation": int, "seed": int,
                  "checkpoint_every": int, "resolution": int}
FUSION_OPTIONS = {"reference_size": int, "crop_scale": float, "face_weight": float, "caption_dropout": float,
                  "reference_downsample": int}
FLUX_FUSION_OPTIONS = {"guidance": float, "rank": int}   # fusion on a Flux model (ignored on SD1.5/SDXL)
CONSISTENTID_OPTIONS = {"localization_weight": float, "condition_dropout": float, "background_mask_prob": float}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` sub-command's arguments."""
    parser.add_argument("technique", choices=TECHNIQUES, help="which adapter to train")
    parser.add_argument("--data", required=True, metavar="DIR", help="folder of images with same-stem .txt captions")
    parser.add_argument("--checkpoint", metavar="FILE", help="the single-file checkpoint to train for (SD1.5, SDXL "
                                                               "or an all-in-one Flux file)")
    parser.add_argument("--diffusion-model", metavar="FILE", help="instead of --checkpoint: a diffusion model file "
                        "(e.g. flux1-dev.safetensors, as Load Diffusion Model), with --text-encoder and --vae")
    parser.add_argument("--text-encoder", action="append", default=[], metavar="FILE", help="with --diffusion-model: "
                        "a text encoder file, given once per file (Flux: clip_l and t5xxl, as DualCLIPLoader)")
    parser.add_argument("--clip-type", default="flux", help="with --diffusion-model: the text encoders' type "
                                                            "(DualCLIPLoader's 'type'; default flux)")
    parser.add_argument("--vae", metavar="FILE", help="use this VAE instead of the checkpoint's")
    parser.add_argument("--name", help="name of the result and training checkpoint in the models folder "
                                       "(default: my_face / my_consistentid, as the node)")
    parser.add_argument("--out", metavar="FILE", help="write the result here instead of the models folder")
    parser.add_argument("--state", metavar="FILE", help="training checkpoint (default: the node's, for --name)")
    parser.add_argument("--resume", choices=("auto", "fresh", "require"), default="auto",
                        help="auto: continue a matching checkpoint, else start over; fresh: start over; "
                             "require: continue or fail")
    for name, kind in {**COMMON_OPTIONS, **FUSION_OPTIONS, **FLUX_FUSION_OPTIONS, **CONSISTENTID_OPTIONS}.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                            help=f"{name.replace('_', ' ')} (default: the node's)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                        help="fusion on Flux: bf16 mixed precision or fp32 (default auto: bf16 where native)")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_const",
                        const=False, default=None, help="fusion on Flux: keep the blocks' activations (faster, more "
                                                        "memory) instead of recomputing them in the backward pass")
    parser.add_argument("--reference-noise", choices=("same_sigma", "clean"), default=None, help="fusion")
    parser.add_argument("--adapter", metavar="FILE", help="fusion: continue training this adapter file")
    parser.add_argument("--analyzer", default=None, metavar="KIND",
                        help="face analyzer: none, dlib, or insightface:PACK (fusion default: none; "
                             "consistentid default: insightface:buffalo_l)")
    parser.add_argument("--clip-vision", metavar="FILE", help="consistentid: CLIP-ViT-H-14 (required)")
    parser.add_argument("--parser", default="landmarks", metavar="FILE",
                        help="consistentid: BiSeNet face parser file, or 'landmarks' (default)")
    parser.add_argument("--start", metavar="FILE", help="consistentid: fine-tune these weights (default: new model)")
    parser.add_argument("--train-processors", action="store_true", help="consistentid: also train LoRA + ID "
                                                                        "attention")
    parser.add_argument("--comfyui", metavar="PATH", help="ComfyUI folder (default: $COMFYUI_PATH or the "
                                                          "ComfyUI this pack is in)")
    parser.add_argument("--base-directory", metavar="DIR", help="ComfyUI base directory (its models/ is used)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto", help="as `run --device`")
    parser.add_argument("--verbose", action="store_true", help="full tracebacks")


def settings_from_args(cls, args: argparse.Namespace, extra: dict | None = None):
    """A settings dataclass from the options that were given (the others keep the dataclass defaults)."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**{**given, **(extra or {})})


# --------------------------------------------------------------------------------------------------
# Running


class ConsoleReport:
    """Progress lines on rank 0: the loop's progress object (step) and step callback (loss)."""

    def __init__(self, total: int, every: int = 0):
        self.total = total
        self.every = every or max(1, total // 50)
        self.loss = float("nan")

    def __call__(self, step: int, loss: float) -> None:
        self.loss = loss

    def update_absolute(self, value: int, preview=None) -> None:
        if value and (value % self.every == 0 or value == self.total):
            say(f"step {value}/{self.total}  loss {self.loss:.5f}", flush=True)


def _analyzer(spec: str | None):
    if not spec or spec == "none":
        return None
    if spec == "dlib":
        from ..face_analysis.analyzers.dlib_backend import load_dlib

        return load_dlib()
    kind, _, pack = spec.partition(":")
    if kind != "insightface" or not pack:
        raise ValueError(f"--analyzer must be none, dlib or insightface:PACK, got {spec!r}")
    from ..face_analysis.analyzers.insightface_backend import load_insightface

    return load_insightface(pack)


def _report(settings) -> dict:
    """The loop options that print progress on the console."""
    report = ConsoleReport(settings.steps)
    return {"progress_factory": lambda total, label: report, "step_callback": report}


def _train_fusion(args, model, clip, vae, sources):
    """Train a Face Fusion adapter (rank 0 writes it); returns the TrainResult."""
    from ..techniques.face_fusion import training
    from ..techniques.face_fusion.adapter import load_fusion_adapter

    names = [*COMMON_OPTIONS, *FUSION_OPTIONS, *FLUX_FUSION_OPTIONS, "reference_noise", "precision",
             "gradient_checkpointing"]
    settings = training.make_settings(model, **{name: getattr(args, name, None) for name in names})
    result_path, checkpoint = training.run_paths(args.name)
    adapter = load_fusion_adapter(args.adapter) if args.adapter else None
    output = training.train_face_fusion(model, vae, clip, sources, settings, analyzer=_analyzer(args.analyzer),
                                        adapter=adapter, checkpoint_path=args.state or checkpoint,
                                        resume=args.resume, result_path=args.out or result_path, **_report(settings))
    return output.result


def _train_consistentid(args, model, clip, vae, sources):
    """Train ConsistentID (rank 0 writes it); returns the TrainResult."""
    from ..face_analysis.parsing import LANDMARKS_CHOICE
    from ..face_analysis.parsing.loader import load_face_parser
    from ..host.training import load_clip_vision_file
    from ..techniques.consistentid import training
    from ..techniques.consistentid.loader import load_consistentid

    settings = settings_from_args(training.ConsistentIDTrainSettings, args,
                                  {"train_processors": bool(args.train_processors)})
    result_path, checkpoint = training.run_paths(args.name)
    parser = load_face_parser(LANDMARKS_CHOICE if args.parser == "landmarks" else os.path.abspath(args.parser))
    output = training.train_consistentid(
        model, vae, clip, load_clip_vision_file(args.clip_vision), _analyzer(args.analyzer or "insightface:buffalo_l"),
        parser, sources, settings, start=load_consistentid(args.start) if args.start else None,
        checkpoint_path=args.state or checkpoint, resume=args.resume, result_path=args.out or result_path,
        **_report(settings))
    return output.result


def _load_host(args):
    """ComfyUI prepared in this process (after the process group chose this rank's GPU), models loaded."""
    from ..host.folders import register_model_folders
    from ..host.headless import prepare_host
    from ..host.training import load_checkpoint_file, load_diffusion_model_file, load_text_encoder_files, load_vae_file
    from .runner import find_comfyui

    prepare_host(find_comfyui(args.comfyui), device=args.device, base_directory=args.base_directory)
    register_model_folders()
    if args.diffusion_model:
        return (load_diffusion_model_file(args.diffusion_model), load_text_encoder_files(args.text_encoder, args.clip_type),
                load_vae_file(args.vae))
    model, clip, vae = load_checkpoint_file(args.checkpoint)
    return model, clip, load_vae_file(args.vae) if args.vae else vae


def run_training(args: argparse.Namespace, world) -> str | None:
    """Train as ``args`` say; rank 0 writes the result file and returns its path."""
    import torch

    from ..trainers.datasets import read_image_folder

    model, clip, vae = _load_host(args)
    sources = read_image_folder(os.path.abspath(args.data))
    train = _train_fusion if args.technique == "fusion" else _train_consistentid
    with torch.inference_mode():  # as ComfyUI runs nodes: the trainers escape it themselves
        result = train(args, model, clip, vae, sources)
    if not world.is_main:
        return None
    say(f"{args.technique}: {result.step} steps (started at {result.start_step}), final loss "
        f"{result.losses[-1]:.5f}; wrote {', '.join(result.result_files)}", flush=True)
    return result.result_files[0]


def _setup_logging(rank: int, verbose: bool) -> None:
    """The pack's log on stderr, rank 0 only (INFO; other ranks: errors); ComfyUI's chatter only with --verbose."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    logger.setLevel(logging.INFO if rank == 0 else logging.ERROR)


def usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the command line before anything is loaded (None = nothing)."""
    if not os.path.isdir(args.data):
        return f"--data {args.data}: no such folder"
    if args.diffusion_model:
        if args.checkpoint:
            return "give either --checkpoint or --diffusion-model, not both"
        if not args.text_encoder or not args.vae:
            return "--diffusion-model needs --text-encoder FILE (once per file; Flux: clip_l and t5xxl) and --vae FILE"
        files = [("--diffusion-model", args.diffusion_model), ("--vae", args.vae)] + \
            [("--text-encoder", path) for path in args.text_encoder]
    elif not args.checkpoint:
        return "give --checkpoint FILE (or --diffusion-model FILE with --text-encoder and --vae)"
    else:
        files = [("--checkpoint", args.checkpoint)]
    for option, path in files:
        if not os.path.isfile(path):
            return f"{option} {path}: no such file"
    if args.technique == "consistentid" and not args.clip_vision:
        return "consistentid needs --clip-vision FILE (CLIP-ViT-H-14)"
    return None


def main(argv: list[str]) -> int:
    """``train`` entry point; returns the exit code."""
    from ..errors import LikenessError
    from .main import _exit_code, pack_command

    parser = argparse.ArgumentParser(prog=f"{pack_command()} train", description="Train a Face Fusion adapter or "
                                     "ConsistentID on a folder of images (data-parallel under torchrun).")
    add_train_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return _exit_code(exc)
    args.name = args.name or DEFAULT_NAMES[args.technique]
    problem = usage_problem(args)
    if problem:
        say(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    from ..trainers import distributed

    _setup_logging(int(os.environ.get("RANK", "0")), args.verbose)
    world = distributed.init_from_environment()
    try:
        run_training(args, world)
    except KeyboardInterrupt:
        say("interrupted; the same command continues from the last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (LikenessError, ValueError, OSError) as exc:
        if args.verbose:
            raise
        say(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        distributed.shutdown()
    return EXIT_OK
