"""Train Face Fusion: trains a FUSION_ADAPTER in the graph on the frozen model."""
from __future__ import annotations

import logging

from ..trainers.precision import PRECISIONS
from ..validation import check_images
from ._common import (
    category,
    check_analyzer,
    checked_file_stem,
    float_input,
    int_input,
    resume_input,
    run_outputs,
    training_seed_input,
)
from ._feedback import shows_warnings

logger = logging.getLogger("likeness")

CATEGORY = category("Face Fusion")
REFERENCE_NOISE_CHOICES = {"same noise level (paper)": "same_sigma", "clean reference": "clean"}


class TrainFaceFusion:
    NODE_ID = "LikenessTrainFaceFusion"
    DISPLAY_NAME = "Train Face Fusion"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Trains a Face Fusion adapter (only the per-layer Linear_kf / Linear_vf, on Flux the per-block "
                   "key/value projections; the model stays frozen) from face photos: each image's aligned face crop is the reference and the image the target, with "
                   "the model's own noise loss. Shows progress, honours cancel, writes a checkpoint every N steps "
                   "(resume continues exactly; changed settings start over or stop, as 'resume' says), saves the "
                   "adapter to models/likeness/fusion/<name>.safetensors and outputs it with a loss-curve image.")
    RETURN_TYPES = ("FUSION_ADAPTER", "IMAGE")
    RETURN_NAMES = ("fusion_adapter", "loss_curve")
    FUNCTION = "train"
    OUTPUT_NODE = True  # training (and saving) is the point, even with nothing connected downstream

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.5, SDXL or Flux model to train for (frozen; only the adapter "
                                    "learns; SDXL and Flux: resolution 1024 or 512)."}),
                "vae": ("VAE", {"tooltip": "Encodes the training images and the reference crops."}),
                "clip": ("CLIP", {"tooltip": "Encodes the captions (same-stem .txt files, or the captions text)."}),
                "name": ("STRING", {"default": "my_face", "tooltip": "File name of the adapter in "
                                    "models/likeness/fusion/ (and of its training checkpoint)."}),
                "steps": int_input(500, 1, 100000, "Optimizer steps in total (a resumed run continues up to this)."),
                "learning_rate": float_input(1e-4, 1e-7, 1.0, 1e-6, "AdamW learning rate for Linear_kf / Linear_vf."),
                "batch_size": int_input(1, 1, 64, "Images per micro-batch."),
                "grad_accumulation": int_input(1, 1, 256, "Micro-batches per optimizer step (effective batch = "
                                               "batch size x this)."),
                "seed": training_seed_input("Seeds the data order, noise and timesteps (same seed + settings = same "
                                            "adapter)."),
                "checkpoint_every": int_input(50, 0, 100000, "Write a resumable checkpoint every N steps "
                                              "(0 = only at the end)."),
                "resume": resume_input(),
                "resolution": int_input(512, 64, 2048, "Training image size (square, centre crop).", step=64),
                "reference_size": ([256, 384, 512], {"default": 256, "tooltip": "Side of the aligned reference "
                                   "face crop. Bigger = more detail, slower."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Training images (used instead of, or together with, the folder)."}),
                "captions": ("STRING", {"multiline": True, "default": "", "tooltip": "Captions for 'images': one "
                             "line per image, or one text for all. Empty = 'a photo of a person'."}),
                "folder": ("STRING", {"default": "", "tooltip": "Folder of training images with same-stem .txt "
                           "captions, relative to ComfyUI's input folder."}),
                "face_analyzer": ("FACE_ANALYZER", {"tooltip": "Finds and aligns each face for the reference crop "
                                  "(recommended). Without it the middle of each image is used."}),
                "fusion_adapter": ("FUSION_ADAPTER", {"tooltip": "Start from this adapter (a copy is trained) "
                                   "instead of a new one initialised from the model's self-attention."}),
                "face_weight": float_input(1.0, 0.1, 10.0, 0.1, "Loss weight inside the detected face (1 = plain "
                                           "loss; 2-3 focus training on the face). Needs the face analyzer."),
                "reference_noise": (list(REFERENCE_NOISE_CHOICES), {"tooltip": "Noise the reference at the training "
                                    "step's level (as at per-step inference) or keep it clean (as cached inference)."}),
                "reference_downsample": int_input(2, 1, 4, "SD1.5/SDXL: the reference pass's highest-resolution "
                                                  "self-attention uses keys averaged over NxN blocks (ToDo; faster). "
                                                  "Use the same value in Apply Face Fusion (its default is 2). 1 = "
                                                  "exact. Not used on Flux."),
                "guidance": float_input(3.5, 0.0, 100.0, 0.1, "Flux dev: the distilled guidance the adapter is "
                                        "trained under (sample with the same; schnell ignores it)."),
                "precision": (list(PRECISIONS), {"default": "auto", "tooltip": "Flux: bf16 mixed precision (fp32 "
                              "adapter weights) or fp32; auto = bf16 where the hardware has it."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "Flux: recompute each block in "
                                           "the backward pass (much less memory, ~30% slower)."}),
                "rank": int_input(16, 1, 256, "Flux: rank of a new adapter's per-block key/value projections "
                                  "(a connected adapter keeps its own)."),
            },
        }

    @shows_warnings
    def train(self, model, vae, clip, name, steps, learning_rate, batch_size, grad_accumulation, seed,
              checkpoint_every, resume, resolution, reference_size, images=None, captions="", folder="",
              face_analyzer=None, fusion_adapter=None, face_weight=1.0, reference_noise="same noise level (paper)",
              reference_downsample=2, guidance=3.5, precision="auto", gradient_checkpointing=True, rank=16):
        from ..host.paths import INPUT, resolve_user_path
        from ..techniques.face_fusion import training
        from ..trainers.datasets import training_sources

        check_images(images=images)
        stem = checked_file_stem(name, "name", run_outputs(training.run_paths))
        if face_analyzer is not None:
            check_analyzer(face_analyzer, "face_analyzer")
        folder_path = resolve_user_path(folder, INPUT, "training folder") if folder and folder.strip() else None
        sources = training_sources(images, captions, folder_path)
        settings = training.make_settings(   # the model's settings class (Flux: + guidance, precision, ...)
            model, steps=steps, lr=learning_rate, batch_size=batch_size, grad_accumulation=grad_accumulation, seed=seed,
            checkpoint_every=checkpoint_every, resolution=resolution, reference_size=int(reference_size),
            face_weight=face_weight, reference_noise=REFERENCE_NOISE_CHOICES.get(reference_noise, reference_noise),
            reference_downsample=reference_downsample, guidance=guidance, precision=precision,
            gradient_checkpointing=gradient_checkpointing, rank=rank)
        result_path, checkpoint = training.run_paths(stem)
        output = training.train_face_fusion(model, vae, clip, sources, settings, analyzer=face_analyzer,
                                            adapter=fusion_adapter, checkpoint_path=checkpoint, resume=resume,
                                            result_path=result_path)
        logger.info("Face Fusion adapter saved to %s (%d steps, final loss %s)", result_path, output.result.step,
                    output.adapter.metadata.get("final_loss"))
        return (output.adapter, output.result.loss_curve)


NODE_CLASSES = [TrainFaceFusion]
