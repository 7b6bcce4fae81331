"""M3Face Imagic nodes: train the edit (embedding + fine-tune) on one photo, interpolate the embeddings, reload them."""
from __future__ import annotations

import logging

from ..errors import InvalidInputError, ModelFileError
from ..model_hints import ModelFolder
from ..trainers.precision import PRECISIONS
from ..validation import check_images
from ._common import (
    category,
    checked_file_stem,
    file_choices,
    float_input,
    int_input,
    resolved_path,
    resume_input,
    run_outputs,
    training_seed_input,
)
from ._feedback import shows_warnings

logger = logging.getLogger("likeness")

CATEGORY = category("M3Face")
EMBEDDING_TYPE = "M3FACE_IMAGIC_EMBEDDING"
FOLDER, SUBFOLDER = "likeness", "m3face_imagic"
NO_FILE = "(no file in models/likeness/m3face_imagic)"
EMBEDDINGS = ModelFolder("M3Face Imagic embedding", FOLDER, (SUBFOLDER,), other_way=(
    "Train one with 'M3Face Imagic Train' (it saves there)."))
MODES = ["up_blocks", "lora"]
LAYERS = ["2and3", "only1", "only2", "only3", "1and2", "all"]


def _files() -> list[str]:
    from ..host.folders import list_files

    return file_choices(lambda: list_files(FOLDER, SUBFOLDER), NO_FILE)


def _run_file_paths(name: str) -> list[str]:
    from ..techniques.m3face.imagic import run_paths

    return list(run_paths(name).values())


class M3FaceImagicTrain:
    NODE_ID = "LikenessM3FaceImagicTrain"
    DISPLAY_NAME = "M3Face Imagic Train"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Imagic editing as in M3Face's edit script, in two training stages on one photo, with the "
                   "FaceControlNet fed the photo's ORIGINAL condition map: (1) the target prompt's embedding is "
                   "optimised to reconstruct the photo (model and ControlNet frozen), (2) the UNet's up blocks (or a "
                   "LoRA on them) are fine-tuned with that embedding. Then sample from 'M3Face Imagic Interpolate' "
                   "with the EDITED condition map on the output model. Shows progress, honours cancel, resumes from "
                   "checkpoints; saves the embeddings to models/likeness/m3face_imagic/<name>.safetensors and the "
                   "fine-tuned weights to models/loras/likeness/m3face_imagic_<name>.safetensors.")
    RETURN_TYPES = ("MODEL", EMBEDDING_TYPE, "CONDITIONING", "CONDITIONING", "IMAGE")
    RETURN_NAMES = ("model", "imagic_embedding", "optimized_conditioning", "target_conditioning", "loss_curve")
    FUNCTION = "train"
    OUTPUT_NODE = True  # training (and saving) is the point, even with nothing connected downstream

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.5 model the FaceControlNet belongs to (left unchanged: the "
                                    "output is a copy with the fine-tuned weights as patches)."}),
                "vae": ("VAE", {"tooltip": "Encodes the photo."}),
                "control_net": ("CONTROL_NET", {"tooltip": "The FaceControlNet (segmentation or landmark), frozen."}),
                "photo": ("IMAGE", {"tooltip": "The photo to edit (one image; centre square, resized)."}),
                "condition": ("IMAGE", {"tooltip": "The photo's ORIGINAL condition map (mask or landmarks); the "
                                        "edited map goes to Apply ControlNet when sampling."}),
                "name": ("STRING", {"default": "my_edit", "tooltip": "File name of the saved embeddings, weights "
                                    "and training checkpoints."}),
                "target_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "The edit's target text "
                                  "(needs 'clip'; ignored when 'target_conditioning' is connected)."}),
                "embedding_steps": int_input(500, 1, 100000, "Stage 1 steps (embedding optimisation)."),
                "embedding_lr": float_input(1e-3, 1e-7, 1.0, 1e-5, "Stage 1 Adam learning rate."),
                "finetune_steps": int_input(1000, 1, 100000, "Stage 2 steps (model fine-tune)."),
                "finetune_lr": float_input(5e-5, 1e-7, 1.0, 1e-6, "Stage 2 Adam learning rate."),
                "finetune_mode": (MODES, {"tooltip": "up_blocks: the official subset of UNet weights (about 14 GB "
                                  "of VRAM at 512 px). lora: a LoRA on that subset's attention layers (small GPUs)."}),
                "layers": (LAYERS, {"tooltip": "Which UNet up blocks stage 2 trains (the edit script's --unet_layer; "
                           "2and3 = the two highest-resolution up blocks, its default)."}),
                "lora_rank": int_input(16, 1, 256, "LoRA rank (lora mode only)."),
                "seed": training_seed_input("Seeds the noise and timesteps of both stages (same seed + settings = "
                                            "same result)."),
                "resume": resume_input(),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Encodes 'target_prompt'."}),
                "target_conditioning": ("CONDITIONING", {"tooltip": "The target prompt already encoded (one "
                                        "prompt); used instead of clip + target_prompt."}),
                "resolution": int_input(512, 64, 2048, "Training size of the photo (square).", step=64),
                "control_strength": float_input(1.0, 0.0, 2.0, 0.01, "ControlNet strength while training (the "
                                                "script uses 1)."),
                "checkpoint_every": int_input(100, 0, 100000, "Write a resumable checkpoint every N steps of each "
                                              "stage (0 = only at the end of a stage)."),
                "precision": (list(PRECISIONS), {"tooltip": "auto: bf16 mixed precision where the hardware has "
                              "it, else fp32. Trained weights stay fp32."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Stage 2: recompute "
                                           "activations in the backward pass (same result, less memory, slower)."}),
            },
        }

    @shows_warnings
    def train(self, model, vae, control_net, photo, condition, name, target_prompt, embedding_steps, embedding_lr,
              finetune_steps, finetune_lr, finetune_mode, layers, lora_rank, seed, resume, clip=None,
              target_conditioning=None, resolution=512, control_strength=1.0, checkpoint_every=100,
              precision="auto", gradient_checkpointing=False):
        from ..techniques.m3face.imagic import ImagicSettings, run_imagic, run_paths
        from ..techniques.m3face.imagic_embedding import encode_target, target_from_conditioning

        check_images(photo=photo, condition=condition)
        stem = checked_file_stem(name, "name", run_outputs(_run_file_paths))
        settings = ImagicSettings(embedding_steps=embedding_steps, embedding_lr=embedding_lr,
                                  finetune_steps=finetune_steps, finetune_lr=finetune_lr, mode=finetune_mode,
                                  layers=layers, lora_rank=lora_rank, seed=seed, resolution=resolution,
                                  control_strength=control_strength, precision=precision,
                                  gradient_checkpointing=gradient_checkpointing, checkpoint_every=checkpoint_every)
        settings.check()
        if target_conditioning is not None:
            target, pooled = target_from_conditioning(target_conditioning)
        elif clip is not None:
            target, pooled = encode_target(clip, target_prompt)
        else:
            raise InvalidInputError("Connect 'clip' (with a target prompt) or 'target_conditioning'.")
        out = run_imagic(model, vae, control_net, photo, condition, target, settings, pooled=pooled,
                         paths=run_paths(stem), resume=resume)
        logger.info("M3Face Imagic '%s': final losses %.4g (embedding) and %.4g (fine-tune)", stem,
                    out.embedding_result.losses[-1], out.finetune_result.losses[-1])
        embedding = out.embedding
        return (out.model, embedding, embedding.conditioning(embedding.optimized),
                embedding.conditioning(embedding.target), out.loss_curve)


class M3FaceImagicInterpolate:
    NODE_ID = "LikenessM3FaceImagicInterpolate"
    DISPLAY_NAME = "M3Face Imagic Interpolate"
    CATEGORY = CATEGORY
    DESCRIPTION = ("The conditioning for an Imagic edit: alpha * target + (1 - alpha) * optimised embedding (the "
                   "edit script's formula; alpha 1 = the target prompt, 0 = the photo's reconstruction). The script "
                   "tries 0.8, 0.9, 1 and 1.1. Sample it on the Imagic model with the EDITED condition map.")
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "interpolate"

    @classmethod
    def INPUT_TYPES(cls):
        from ..techniques.m3face.imagic_embedding import DEFAULT_ALPHA

        return {"required": {
            "imagic_embedding": (EMBEDDING_TYPE, {"tooltip": "From M3Face Imagic Train or Load Imagic Embedding."}),
            "alpha": float_input(DEFAULT_ALPHA, -1.0, 2.0, 0.01, "Weight of the target prompt: higher = stronger "
                                 "edit, lower = closer to the photo (values above 1 extrapolate)."),
        }}

    def interpolate(self, imagic_embedding, alpha):
        return (imagic_embedding.conditioning(imagic_embedding.interpolate(alpha)),)


class M3FaceLoadImagicEmbedding:
    NODE_ID = "LikenessM3FaceLoadImagicEmbedding"
    DISPLAY_NAME = "M3Face Load Imagic Embedding"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads the embeddings an 'M3Face Imagic Train' run saved in models/likeness/m3face_imagic/ "
                   "(use its fine-tuned weights, models/loras/likeness/m3face_imagic_<name>.safetensors, with the "
                   "stock LoraLoaderModelOnly).")
    RETURN_TYPES = (EMBEDDING_TYPE,)
    RETURN_NAMES = ("imagic_embedding",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"embedding_name": (_files(), {"tooltip": "A file in models/likeness/m3face_imagic/."})}}

    @classmethod
    def VALIDATE_INPUTS(cls, embedding_name):
        return EMBEDDINGS.choice_problem(embedding_name, _files(), NO_FILE)

    def load(self, embedding_name):
        from ..host.folders import resolve
        from ..techniques.m3face.imagic_embedding import load_embedding

        if embedding_name == NO_FILE:
            raise ModelFileError(EMBEDDINGS.missing_message())
        return (load_embedding(resolved_path(resolve, FOLDER, embedding_name, SUBFOLDER)),)


NODE_CLASSES = [M3FaceImagicTrain, M3FaceImagicInterpolate, M3FaceLoadImagicEmbedding]
