"""Train ConsistentID: fine-tunes (or builds) a CONSISTENTID in the graph on the frozen model."""
from __future__ import annotations

import logging

from ..errors import InvalidInputError
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

CATEGORY = category("ConsistentID")


class TrainConsistentID:
    NODE_ID = "LikenessTrainConsistentID"
    DISPLAY_NAME = "Train ConsistentID"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Trains ConsistentID's FacialEncoder and ID projector (optionally also its LoRA and ID-attention "
                   "weights) on face photos with the model frozen: the noise loss, half the time inside the person "
                   "only, plus the facial attention-localization loss that keeps each facial token's attention on its "
                   "region; 10% of the steps drop the text and image condition. Shows progress, honours cancel, "
                   "checkpoints every N steps (resume continues exactly), saves to models/likeness/consistentid/"
                   "<name>.safetensors (official key layout) and outputs the model with a loss-curve image.")
    RETURN_TYPES = ("CONSISTENTID", "IMAGE")
    RETURN_NAMES = ("consistentid", "loss_curve")
    FUNCTION = "train"
    OUTPUT_NODE = True  # training (and saving) is the point, even with nothing connected downstream

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.5- or SDXL-family model to train for (frozen); SDXL trains "
                                    "with its pooled and size conditioning."}),
                "clip": ("CLIP", {"tooltip": "Its text encoder(s): encode the captions with the facial prompt."}),
                "vae": ("VAE", {"tooltip": "Encodes the training images."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP-ViT-H-14, the image encoder ConsistentID uses for "
                                                "the whole face and the facial regions."}),
                "face_analyzer": ("FACE_ANALYZER", {"tooltip": "InsightFace loader with buffalo_l: finds the face and "
                                                    "its ArcFace identity vector."}),
                "parser": ("FACE_PARSER", {"tooltip": "Face Parser Loader (BiSeNet face_parsing.pth): the facial "
                                           "regions and their masks for the localization loss."}),
                "name": ("STRING", {"default": "my_consistentid", "tooltip": "File name in models/likeness/"
                                    "consistentid/ (and of its training checkpoint)."}),
                "steps": int_input(1000, 1, 1000000, "Optimizer steps in total (a resumed run continues up to this)."),
                "learning_rate": float_input(1e-4, 1e-7, 1.0, 1e-6, "AdamW learning rate for every trained module "
                                             "(official: 1e-4)."),
                "batch_size": int_input(1, 1, 64, "Images per micro-batch."),
                "grad_accumulation": int_input(4, 1, 256, "Micro-batches per optimizer step (effective batch = "
                                               "batch size x this; the paper used 16)."),
                "seed": training_seed_input("Seeds the data order, noise, timesteps and dropouts (same seed + settings = "
                                            "same result)."),
                "checkpoint_every": int_input(50, 0, 100000, "Write a resumable checkpoint every N steps "
                                              "(0 = only at the end)."),
                "resume": resume_input(),
                "resolution": int_input(512, 64, 2048, "Training image size (square, centre crop; official 512).",
                                        step=64),
                "train_processors": ("BOOLEAN", {"default": False, "tooltip": "Also train the rank-128 LoRA and the "
                                                 "ID-attention weights (to_k_ip/to_v_ip), as the official full "
                                                 "training does. Off = only FacialEncoder + projector (safer on "
                                                 "small photo sets)."}),
            },
            "optional": {
                "consistentid": ("CONSISTENTID", {"tooltip": "Start from these weights (a copy is trained), e.g. "
                                                  "ConsistentID-v1.bin. Without it a new model is built (slow to "
                                                  "train; initialised like the official trainer)."}),
                "images": ("IMAGE", {"tooltip": "Training images (used instead of, or together with, the folder)."}),
                "captions": ("STRING", {"multiline": True, "default": "", "tooltip": "Captions for 'images': one "
                             "line per image, or one text for all. Empty = 'a photo of a person'."}),
                "folder": ("STRING", {"default": "", "tooltip": "Folder of training images with same-stem .txt "
                           "captions, relative to ComfyUI's input folder."}),
                "localization_weight": float_input(0.01, 0.0, 1.0, 0.001, "Weight of the facial attention-"
                                                   "localization loss (paper: 0.01; 0 = noise loss only)."),
                "condition_dropout": float_input(0.1, 0.0, 1.0, 0.01, "Share of steps trained with empty text and "
                                                 "a blank image (keeps classifier-free guidance working; "
                                                 "official 0.1)."),
                "background_mask_prob": float_input(0.5, 0.0, 1.0, 0.05, "Share of images whose noise loss counts "
                                                    "only inside the person (official 0.5)."),
            },
        }

    @shows_warnings
    def train(self, model, clip, vae, clip_vision, face_analyzer, parser, name, steps, learning_rate, batch_size,
              grad_accumulation, seed, checkpoint_every, resume, resolution, train_processors, consistentid=None,
              images=None, captions="", folder="", localization_weight=0.01, condition_dropout=0.1,
              background_mask_prob=0.5):
        from ..face_analysis.parsing import FaceParser
        from ..host.paths import INPUT, resolve_user_path
        from ..techniques.consistentid import training
        from ..techniques.consistentid.loader import load_consistentid
        from ..trainers.datasets import training_sources

        check_images(images=images)
        stem = checked_file_stem(name, "name", run_outputs(training.run_paths))
        check_analyzer(face_analyzer, "face_analyzer")
        if not isinstance(parser, FaceParser):
            raise InvalidInputError("'parser' must come from the Face Parser Loader node.")
        if consistentid is not None and getattr(consistentid, "facial_encoder", None) is None:
            raise InvalidInputError("'consistentid' must come from the ConsistentID Loader.")
        folder_path = resolve_user_path(folder, INPUT, "training folder") if folder and folder.strip() else None
        sources = training_sources(images, captions, folder_path)
        settings = training.ConsistentIDTrainSettings(
            steps=steps, lr=learning_rate, batch_size=batch_size, grad_accumulation=grad_accumulation, seed=seed,
            checkpoint_every=checkpoint_every, resolution=resolution, localization_weight=localization_weight,
            condition_dropout=condition_dropout, background_mask_prob=background_mask_prob,
            train_processors=bool(train_processors))
        result_path, checkpoint = training.run_paths(stem)
        output = training.train_consistentid(model, vae, clip, clip_vision, face_analyzer, parser, sources, settings,
                                             start=consistentid, checkpoint_path=checkpoint, resume=resume,
                                             result_path=result_path)
        logger.info("ConsistentID saved to %s (%d steps, final loss %s, facial term %s)", result_path,
                    output.result.step, output.weights.metadata.get("final_loss"),
                    output.weights.metadata.get("final_facial_loss"))
        return (load_consistentid(result_path), output.result.loss_curve)


NODE_CLASSES = [TrainConsistentID]
