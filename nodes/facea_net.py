"""FaceA-Net nodes: train an identity (LoRA + [feat] embeddings), prompt with it, inpaint faces with it."""
from __future__ import annotations

import logging

from ..errors import InvalidInputError, ModelFileError
from ..model_hints import ModelFolder
from ..trainers.precision import PRECISIONS
from ..validation import check_images
from ._common import (
    category,
    check_analyzer,
    checked_file_stem,
    file_choices,
    float_input,
    int_input,
    resolved_path,
    resume_input,
    training_seed_input,
)
from ._feedback import shows_warnings

logger = logging.getLogger("likeness")

CATEGORY = category("FaceA-Net")
NO_IDENTITY = "(no identity in models/likeness/identities)"
IDENTITIES = ModelFolder("FaceA-Net identity", "likeness", ("identities",), other_way=(
    "Train one with 'Train Identity (FaceA-Net)' (it saves there)."))
ATTRIBUTES_TIP = ("Facial attributes for the local task, comma separated: left_eye, right_eye, nose, mouth "
                  "('eyes' = both eyes; left/right = the image's left/right).")


def _check_identity(identity, name: str = "identity"):
    from ..techniques.facea_net.identity import Identity

    if not isinstance(identity, Identity):
        raise InvalidInputError(f"'{name}' must be an IDENTITY from Train Identity or Load Identity, "
                                f"got {type(identity).__name__}.")
    return identity


def _attributes(spec: str) -> tuple[str, ...]:
    from ..techniques.facea_net.inpaint import parse_regions

    if not spec.strip():
        return ()
    names = parse_regions(spec)
    if "face" in names:
        raise InvalidInputError("'face' is the global task, not an attribute; list eyes, nose or mouth.")
    return tuple(names)


def _previews(output):
    import torch

    images = [image for _step, image, _score in output.previews]
    if not images:
        return output.result.loss_curve
    size = images[0].shape[:2]
    return torch.stack([im for im in images if im.shape[:2] == size])


class TrainIdentity:
    NODE_ID = "LikenessFaceATrainIdentity"
    DISPLAY_NAME = "Train Identity (FaceA-Net)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Learns one person from 3-5 photos (FaceA-Net): a rank-48 LoRA on the inpainting model's attention "
                   "layers plus [feat] embeddings per task, trained on the global task (redraw the masked face) and "
                   "local tasks (redraw a masked eye, nose or mouth). Saves the LoRA to models/loras/likeness/ and "
                   "the IDENTITY to models/likeness/identities/. Checkpoints let a cancelled run resume.")
    RETURN_TYPES = ("IDENTITY", "LORA_MODEL", "IMAGE", "IMAGE")
    RETURN_NAMES = ("identity", "lora", "loss_curve", "previews")
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The identity model: an SD1.5 inpainting checkpoint (9-channel UNet) is "
                      "best; a normal SD1.5 model works with a noise mask; an SDXL inpainting checkpoint keeps the "
                      "whole pipeline in SDXL (working size 1024)."}),
            "clip": ("CLIP", {"tooltip": "The text encoder of the same checkpoint."}),
            "vae": ("VAE", {"tooltip": "The VAE of the same checkpoint."}),
            "images": ("IMAGE", {"tooltip": "3-5 photos of the person (a batch; any sizes made equal by a batch node). "
                       "One clearly visible face each."}),
            "analyzer": ("FACE_ANALYZER", {"tooltip": "From a Face Analyzer loader: finds the faces and scores the "
                         "previews' identity similarity."}),
            "class_word": (["woman", "man", "person"], {"default": "woman", "tooltip": "The word the prompts use "
                           "('a woman face [feat]...'); also sets the default [feat] token count (man 3, else 4)."}),
            "name": ("STRING", {"default": "my_identity", "tooltip": "File name for the LoRA and the identity "
                     "(letters, digits, space, _ . -). Training again with the same name overwrites them."}),
            "steps": int_input(600, 1, 20000, "Optimizer steps. 600 keeps prompts controllable; 1000 (the paper) "
                               "fits the references tighter."),
            "seed": training_seed_input("Seed for LoRA init, noise, timesteps and task picks.", hi=2**31 - 1),
        }, "optional": {
            "rank": int_input(48, 1, 256, "LoRA rank (the paper: 48)."),
            "lr_lora": float_input(1.2e-4, 1e-7, 1.0, 1e-6, "Learning rate of the LoRA (the paper: 1.2e-4)."),
            "lr_embeddings": float_input(2e-3, 1e-7, 1.0, 1e-5, "Learning rate of the [feat] embeddings (the paper: 2e-3)."),
            "batch_size": int_input(4, 1, 64, "Samples per step: half global task, half local task."),
            "feat_tokens": int_input(0, 0, 16, "[feat] vectors per task; 0 = 3 for 'man', 4 otherwise."),
            "attributes": ("STRING", {"default": "left_eye, right_eye, nose, mouth", "tooltip": ATTRIBUTES_TIP}),
            "working_size": int_input(512, 64, 1024, "Side of the square face crops the model trains on.", step=8),
            "mask_shape": (["box", "region"], {"default": "box", "tooltip": "box: rectangles around face and parts "
                           "(the paper's detector boxes); region: the parsed shapes."}),
            "checkpoint_every": int_input(100, 0, 10000, "Steps between resumable checkpoints (0 = only at the end)."),
            "resume": resume_input(),
            "preview_every": int_input(0, 0, 10000, "Steps between validation previews (0 = only one at the end)."),
            "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "Recompute UNet blocks in the "
                                       "backward pass: much less memory for about a third more time."}),
            "precision": (list(PRECISIONS), {"default": "auto", "tooltip": "auto: bf16 mixed precision where the "
                          "hardware has bf16 (recent CPUs, most GPUs), else fp32. bf16 halves activation memory and "
                          "is faster; the LoRA and optimizer stay fp32."}),
            "parser": ("FACE_PARSER", {"tooltip": "Optional face parser for the region masks (default: drawn from "
                       "the landmarks)."}),
            "validation_image": ("IMAGE", {"tooltip": "Optional held-out photo of the person: the previews inpaint it "
                                 "and report identity similarity."}),
        }}

    @shows_warnings
    def train(self, model, clip, vae, images, analyzer, class_word, name, steps, seed, rank=48, lr_lora=1.2e-4,
              lr_embeddings=2e-3, batch_size=4, feat_tokens=0, attributes="left_eye, right_eye, nose, mouth",
              working_size=512, mask_shape="box", checkpoint_every=100, resume="auto", preview_every=0,
              gradient_checkpointing=True, precision="auto", parser=None, validation_image=None):
        from ..techniques.facea_net.files import identity_outputs
        from ..techniques.facea_net.training import TrainSettings, run_paths, train_identity

        check_images(images=images, validation_image=validation_image)
        check_analyzer(analyzer)
        name = checked_file_stem(name, "name", identity_outputs())
        if images.shape[0] < 3:
            logger.warning("FaceA-Net: %d reference photo(s); 3-5 give a much better identity", images.shape[0])
        settings = TrainSettings(
            class_word=class_word, feat_tokens=feat_tokens or None, steps=steps, rank=rank, lr_lora=lr_lora,
            lr_embed=lr_embeddings, batch_size=batch_size, seed=seed, attributes=_attributes(attributes),
            working_size=working_size, mask_shape=mask_shape, checkpoint_every=checkpoint_every,
            preview_every=preview_every, gradient_checkpointing=gradient_checkpointing, precision=precision,
            label=f"FaceA-Net {name}")
        identity_path, checkpoint = run_paths(name)
        output = train_identity(model, clip, vae, images, analyzer, settings, parser=parser,
                                validation_image=validation_image, checkpoint_path=checkpoint, resume=resume,
                                result_path=identity_path)
        return (output.identity, output.lora_state, output.result.loss_curve, _previews(output))


class AttributeTransfer:
    NODE_ID = "LikenessFaceAAttributeTransfer"
    DISPLAY_NAME = "Attribute Transfer (FaceA-Net)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Gives an identity another person's facial attribute (FaceA-Net's attribute-level manipulation): "
                   "continues the identity's LoRA and that attribute's [feat] embeddings for ~100 steps on the local "
                   "task only, with photos of the other person. Saves the result under a new name.")
    RETURN_TYPES = ("IDENTITY", "LORA_MODEL", "IMAGE")
    RETURN_NAMES = ("identity", "lora", "loss_curve")
    FUNCTION = "transfer"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The identity model the identity was trained on."}),
            "clip": ("CLIP", {"tooltip": "The text encoder of the same checkpoint."}),
            "vae": ("VAE", {"tooltip": "The VAE of the same checkpoint."}),
            "identity": ("IDENTITY", {"tooltip": "The identity to change (its LoRA is continued)."}),
            "images": ("IMAGE", {"tooltip": "Photos of the person whose attribute is taken."}),
            "analyzer": ("FACE_ANALYZER", {"tooltip": "From a Face Analyzer loader."}),
            "attributes": ("STRING", {"default": "nose", "tooltip": ATTRIBUTES_TIP}),
            "name": ("STRING", {"default": "my_identity_new_nose", "tooltip": "File name of the new identity and "
                     "LoRA."}),
            "steps": int_input(100, 1, 5000, "Steps of the local task (the paper: ~100)."),
            "seed": training_seed_input("Seed for noise, timesteps and attribute picks.", hi=2**31 - 1),
        }, "optional": {
            "lr_lora": float_input(1.2e-4, 1e-7, 1.0, 1e-6, "Learning rate of the LoRA."),
            "lr_embeddings": float_input(2e-3, 1e-7, 1.0, 1e-5, "Learning rate of the attribute's [feat] embeddings."),
            "batch_size": int_input(4, 1, 64, "Samples per step."),
            "working_size": int_input(512, 64, 1024, "Side of the square face crops.", step=8),
            "parser": ("FACE_PARSER", {"tooltip": "Optional face parser for the attribute masks."}),
        }}

    @shows_warnings
    def transfer(self, model, clip, vae, identity, images, analyzer, attributes, name, steps, seed, lr_lora=1.2e-4,
                 lr_embeddings=2e-3, batch_size=4, working_size=512, parser=None):
        from ..techniques.facea_net.files import identity_outputs
        from ..techniques.facea_net.lora import identity_lora_state
        from ..techniques.facea_net.training import (
            TrainSettings,
            attribute_transfer_settings,
            run_paths,
            train_identity,
        )

        check_images(images=images)
        identity = _check_identity(identity)
        check_analyzer(analyzer)
        name = checked_file_stem(name, "name", identity_outputs(("lora", "identity")))
        chosen = _attributes(attributes)
        if not chosen:
            raise InvalidInputError("Attribute Transfer needs at least one attribute (e.g. 'nose').")
        rank = int(identity.metadata.get("rank", 48))
        base = TrainSettings(class_word=identity.class_word, rank=rank, lr_lora=lr_lora, lr_embed=lr_embeddings,
                             batch_size=batch_size, seed=seed, working_size=working_size,
                             label=f"FaceA-Net attribute transfer {name}")
        settings = attribute_transfer_settings(base, chosen, steps)
        output = train_identity(model, clip, vae, images, analyzer, settings, parser=parser, base_identity=identity,
                                base_lora=identity_lora_state(identity), result_path=run_paths(name)[0])
        return (output.identity, output.lora_state, output.result.loss_curve)


class LoadIdentity:
    NODE_ID = "LikenessFaceALoadIdentity"
    DISPLAY_NAME = "Load Identity (FaceA-Net)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads an identity trained by Train Identity from models/likeness/identities/ ([feat] embeddings, "
                   "class word and the name of its LoRA in models/loras/).")
    RETURN_TYPES = ("IDENTITY",)
    RETURN_NAMES = ("identity",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = _identity_files()
        return {"required": {
            "identity": (files, {"default": files[0], "tooltip": "An identity file in models/likeness/identities/."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, identity):
        return IDENTITIES.choice_problem(identity, _identity_files(), NO_IDENTITY)

    def load(self, identity):
        from ..host.folders import resolve
        from ..techniques.facea_net.identity import load_identity

        if identity == NO_IDENTITY:
            raise ModelFileError(IDENTITIES.missing_message())
        return (load_identity(resolved_path(resolve, "likeness", identity, "identities")),)


def _identity_files() -> list[str]:
    from ..host.folders import list_files

    return file_choices(lambda: list_files("likeness", "identities", {".safetensors"}), NO_IDENTITY)


class IdentityPrompt:
    NODE_ID = "LikenessFaceAIdentityPrompt"
    DISPLAY_NAME = "Identity Prompt (FaceA-Net)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes the face prompt T_id (expression, accessories, style) and appends the identity's task "
                   "prompts with their learned [feat] embeddings at the padding positions (T'_id), for the face and "
                   "each attribute. Use it as the positive conditioning of the identity model.")
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The identity model's text encoder."}),
            "identity": ("IDENTITY", {"tooltip": "From Train Identity or Load Identity."}),
            "text": ("STRING", {"multiline": True, "default": "a photo of a face, smiling",
                     "tooltip": "T_id: what the face should look like (expression, glasses, makeup, style)."}),
        }, "optional": {
            "tasks": ("STRING", {"default": "face, left_eye, right_eye, nose, mouth", "tooltip": "Which learned task "
                      "prompts to append ('face' and/or attributes)."}),
            "feat_strength": float_input(1.0, 0.0, 2.0, 0.05, "Scales how far the [feat] vectors move the task "
                                         "prompts (1 = as trained)."),
        }}

    def encode(self, clip, identity, text, tasks="face, left_eye, right_eye, nose, mouth", feat_strength=1.0):
        from ..techniques.facea_net.inpaint import parse_regions
        from ..techniques.facea_net.prompt import build_identity_conditioning

        identity = _check_identity(identity)
        return (build_identity_conditioning(clip, identity, text, parse_regions(tasks), feat_strength),)


class ApplyIdentityLora:
    NODE_ID = "LikenessFaceAApplyIdentityLora"
    DISPLAY_NAME = "Apply Identity LoRA (FaceA-Net)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Applies an identity's LoRA to the identity model exactly as the stock LoraLoader does (from "
                   "memory right after training, else from its file in models/loras/).")
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The identity (inpainting) model."}),
            "identity": ("IDENTITY", {"tooltip": "From Train Identity or Load Identity."}),
            "strength": float_input(1.0, -4.0, 4.0, 0.05, "LoRA strength (1 = as trained)."),
        }}

    @shows_warnings
    def apply(self, model, identity, strength):
        from ..techniques.facea_net.lora import apply_lora_to_model, check_identity_fits, identity_lora_state

        identity = _check_identity(identity)
        check_identity_fits(identity, model)
        state = identity_lora_state(identity)
        if state is None:
            logger.warning("FaceA-Net: identity '%s' has no LoRA; the model is unchanged", identity.name)
            return (model,)
        return (apply_lora_to_model(model, state, strength),)


def _inpaint_inputs() -> dict:
    from ..host.sampling import sampler_names

    samplers, schedulers = sampler_names()
    return {
        "text": ("STRING", {"multiline": True, "default": "a photo of a face, natural skin, sharp focus",
                 "tooltip": "T_id: what the face should look like (expression, accessories, style)."}),
        "negative": ("STRING", {"multiline": True, "default": "blurry, deformed, lowres",
                     "tooltip": "Negative prompt for the face."}),
        "seed": int_input(0, 0, 2**31 - 1, "Sampling seed (face k uses seed + k)."),
        "steps": int_input(25, 1, 200, "Sampling steps per face."),
        "cfg": float_input(5.0, 0.0, 30.0, 0.1, "Guidance scale; the paper notes it strongly affects quality."),
        "sampler_name": (samplers, {"default": "euler_ancestral" if "euler_ancestral" in samplers else samplers[0],
                         "tooltip": "ComfyUI sampler."}),
        "scheduler": (schedulers, {"default": "normal" if "normal" in schedulers else schedulers[0],
                      "tooltip": "ComfyUI scheduler."}),
        "denoise": float_input(1.0, 0.0, 1.0, 0.01, "1 redraws the masked face completely; lower keeps more of it."),
    }


def _mask_inputs() -> dict:
    return {
        "regions": ("STRING", {"default": "face", "tooltip": "What to redraw: face, or attributes such as 'eyes, "
                    "mouth' (left/right = the image's left/right)."}),
        "mask_shape": (["box", "region"], {"default": "box", "tooltip": "box: a rectangle around each region (as "
                       "trained by default); region: the parsed shape."}),
        "grow": int_input(16, 0, 256, "Pixels (at the working size) the mask grows by."),
        "feather": int_input(24, 0, 256, "Width (working pixels) of the soft blend edge; pixels outside the "
                             "feathered mask are returned unchanged."),
        "context": float_input(2.0, 1.0, 6.0, 0.05, "Crop side in face-box sizes: how much surrounding the model "
                               "sees."),
        "working_size": int_input(512, 64, 2048, "Side of the square crop the model works at (512 for SD1.5, 1024 for SDXL).", step=8),
    }


class FaceInpaint:
    NODE_ID = "LikenessFaceAInpaint"
    DISPLAY_NAME = "Face Inpaint (FaceA-Net)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("The FaceA-Net decoupling in one node: finds the faces in a scene made by any model, crops each "
                   "with context to the working size, redraws it with the identity model + identity LoRA + identity "
                   "prompt, and blends it back at the original resolution. Several identities go to several faces "
                   "(left to right, or by similarity).")
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    FUNCTION = "inpaint"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "model": ("MODEL", {"tooltip": "The identity model the identity was trained on (SD1.5 or SDXL inpainting)."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder."}),
            "vae": ("VAE", {"tooltip": "Its VAE."}),
            "image": ("IMAGE", {"tooltip": "The scene (one image or a batch)."}),
            "analyzer": ("FACE_ANALYZER", {"tooltip": "From a Face Analyzer loader."}),
            "identity": ("IDENTITY", {"tooltip": "The identity for the first (or every) face."}),
            "selection": (["largest", "all", "index"], {"default": "largest", "tooltip": "Which faces to redraw: the "
                          "largest, all (numbered left to right), or the one at face_index."}),
        }
        required.update(_inpaint_inputs())
        optional = {
            "identity_2": ("IDENTITY", {"tooltip": "Identity for the second face."}),
            "identity_3": ("IDENTITY", {"tooltip": "Identity for the third face."}),
            "identity_4": ("IDENTITY", {"tooltip": "Identity for the fourth face."}),
            "assignment": (["left_to_right", "most_similar"], {"default": "left_to_right", "tooltip": "With several "
                           "identities: face k (left to right) gets identity k, or each face gets the identity whose "
                           "reference photos it resembles most."}),
            "face_index": int_input(0, 0, 64, "For selection 'index': 0 is the leftmost face."),
            "lora_strength": float_input(1.0, 0.0, 2.0, 0.05, "Strength of the identity LoRA."),
            "feat_strength": float_input(1.0, 0.0, 2.0, 0.05, "Strength of the [feat] embeddings."),
            "on_no_face": (["pass_through", "error"], {"default": "pass_through", "tooltip": "An image without a "
                           "face: return it unchanged with a warning, or stop with an error."}),
            "parser": ("FACE_PARSER", {"tooltip": "Optional face parser for region masks (default: landmarks)."}),
        }
        optional.update(_mask_inputs())
        return {"required": required, "optional": optional}

    @shows_warnings
    def inpaint(self, model, clip, vae, image, analyzer, identity, selection, text, negative, seed, steps, cfg,
                sampler_name, scheduler, denoise, identity_2=None, identity_3=None, identity_4=None,
                assignment="left_to_right", face_index=0, lora_strength=1.0, feat_strength=1.0,
                on_no_face="pass_through", parser=None, regions="face", mask_shape="box", grow=16, feather=24,
                context=2.0, working_size=512):
        from ..host.progress import Progress
        from ..techniques.facea_net.pipeline import InpaintSettings, inpaint_faces

        check_images(image=image)
        check_analyzer(analyzer)
        identities = [_check_identity(i, n) for i, n in ((identity, "identity"), (identity_2, "identity_2"),
                                                           (identity_3, "identity_3"), (identity_4, "identity_4"))
                      if i is not None]
        settings = InpaintSettings(text=text, negative=negative, selection=selection, face_index=face_index,
                                   assignment=assignment, regions=regions, mask_shape=mask_shape, grow=grow,
                                   feather=feather, context=context, working_size=working_size, steps=steps, cfg=cfg,
                                   sampler_name=sampler_name, scheduler=scheduler, denoise=denoise, seed=seed,
                                   lora_strength=lora_strength, feat_strength=feat_strength, on_no_face=on_no_face)
        out, mask, _notes = inpaint_faces(model, clip, vae, image, analyzer, identities, settings, parser,
                                          lambda total: Progress(total, "Face Inpaint (FaceA-Net)"))
        return (out, mask)


class FaceCrop:
    NODE_ID = "LikenessFaceACrop"
    DISPLAY_NAME = "Face Crop (FaceA-Net)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Power-user chain, step 1: cuts every selected face out of the images as a square working crop "
                   "with context and builds its inpaint masks. Inpaint the crops with stock nodes "
                   "(InpaintModelConditioning + KSampler with the sample mask), then use Face Paste.")
    RETURN_TYPES = ("IMAGE", "MASK", "MASK", "FACEA_CROPS")
    RETURN_NAMES = ("crops", "sample_mask", "blend_mask", "crop_info")
    FUNCTION = "crop"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "image": ("IMAGE", {"tooltip": "The scene (the images FACES were found in)."}),
            "faces": ("FACES", {"tooltip": "From Analyze Faces: every selected face is cropped."}),
        }
        required.update(_mask_inputs())
        return {"required": required, "optional": {
            "parser": ("FACE_PARSER", {"tooltip": "Optional face parser for region masks (default: landmarks)."}),
        }}

    @shows_warnings
    def crop(self, image, faces, regions, mask_shape, grow, feather, context, working_size, parser=None):
        from ..face_analysis.types import FaceAnalysis
        from ..techniques.facea_net.pipeline import InpaintSettings, crop_faces

        check_images(image=image)
        if not isinstance(faces, FaceAnalysis):
            raise InvalidInputError("'faces' must be FACES from the Analyze Faces node.")
        settings = InpaintSettings(regions=regions, mask_shape=mask_shape, grow=grow, feather=feather,
                                   context=context, working_size=working_size)
        crops, sample, info = crop_faces(image, faces, settings, parser)
        for note in info.notes:
            logger.warning("Face Crop (FaceA-Net): %s", note)
        return (crops, sample, info.blend, info)


class FacePaste:
    NODE_ID = "LikenessFaceAPaste"
    DISPLAY_NAME = "Face Paste (FaceA-Net)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Power-user chain, step 3: blends the inpainted crops back into the original images at full "
                   "resolution with the feathered masks from Face Crop; everything outside them stays unchanged.")
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    FUNCTION = "paste"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The original images given to Face Crop."}),
            "crops": ("IMAGE", {"tooltip": "The inpainted crops (same batch order as Face Crop's output)."}),
            "crop_info": ("FACEA_CROPS", {"tooltip": "From Face Crop."}),
        }}

    def paste(self, image, crops, crop_info):
        from ..techniques.facea_net.pipeline import FaceCrops, paste_faces

        check_images(image=image, crops=crops)
        if not isinstance(crop_info, FaceCrops):
            raise InvalidInputError("'crop_info' must come from the Face Crop (FaceA-Net) node.")
        return paste_faces(image, crops, crop_info)


NODE_CLASSES = [TrainIdentity, AttributeTransfer, LoadIdentity, IdentityPrompt, ApplyIdentityLora, FaceInpaint,
                FaceCrop, FacePaste]
