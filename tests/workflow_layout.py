"""Lay out the example workflows as ComfyUI's frontend saves them: stages as groups, a note per stage.

``python tests/workflow_layout.py`` rewrites every file in ``example_workflows/`` from its current
graph (API or UI format) plus the layout below: which nodes form each stage (a group, left to right),
how they stack in columns, and the stage's note (what to connect, what to expect). The graph itself
(node ids, types, titles, widget values, links) is kept; seeds get "control after generate: fixed".

The real frontend builds the file: the script starts ComfyUI with this pack (``browser_support``),
creates the nodes in the page so their sizes are the frontend's own, places them, adds the groups and
notes, and saves what "Export" would (``app.graphToPrompt().workflow``) with the view at 100 % zoom on
the first stage. The committed JSON files are the product; this script is how they were made.

:func:`layout_problems` (overlapping nodes, nodes outside groups, stages too tall for the screen) is
shared with the browser test, which measures the graph the frontend actually drew.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
EXAMPLES_DIR = os.path.join(ROOT, "example_workflows")
logger = logging.getLogger("likeness.workflow_layout")

# Geometry (graph units = screen pixels at 100 % zoom).
NODE_TITLE = 30           # LiteGraph.NODE_TITLE_HEIGHT: the title bar above a node's pos
GROUP_HEADER = 44         # group title (font 24 -> 34 px) plus a margin
PAD = 20                  # inside a group, around its nodes
GAP_Y = 34                # between a node and the title bar of the next one (room for the pack badge)
GAP_X = 50                # between columns (room for the links)
GROUP_GAP = 70            # between stages
MIN_COLUMN_WIDTH = 300
CANVAS = (1536, 922)      # the canvas on a 1600x1000 screen (minus the sidebar and the menu bars)
CANVAS_ORIGIN = (16, 12)  # where the first stage's corner lands on the canvas (extra.ds.offset at 100 %)
MAX_STAGE_WIDTH, MAX_STAGE_HEIGHT = CANVAS[0] - 2 * CANVAS_ORIGIN[0], CANVAS[1] - CANVAS_ORIGIN[1] - 8
NOTE_CHAR_WIDTH, NOTE_LINE_HEIGHT = 7.2, 15  # the note's textarea font at 100 % zoom

# Minimum sizes where the frontend's own would cramp what the node shows.
MIN_SIZES = {"LoadImage": (300, 340), "PreviewImage": (300, 290), "SaveImage": (300, 290),
             "CLIPTextEncode": (400, 120)}

# LGraphCanvas.node_colors[...].groupcolor
BLUE, GREEN, YELLOW, PURPLE, CYAN, BROWN = "#3f789e", "#8A8", "#b58b2a", "#a1309b", "#8AA", "#b06634"


@dataclass(frozen=True)
class Stage:
    title: str
    note: str
    columns: tuple[tuple[int, ...], ...]  # node ids, each column top to bottom
    color: str = BLUE


@dataclass(frozen=True)
class Example:
    name: str  # file name without .json: the template browser shows it as the title
    stages: tuple[Stage, ...]


MODELS_HINT = "'python <pack> models verify' lists what is missing; 'models fetch ID' downloads one."
SD15 = ("Realistic_Vision_V4.0.safetensors (models fetch realistic-vision-v4) or any SD1.5 checkpoint.")
SDXL = "sd_xl_base_1.0.safetensors (models fetch sdxl-base) or any SDXL checkpoint."
SDXL_BASE_NAME = "sd_xl_base_1.0.safetensors"
SDXL_INPAINT_UNET = "sdxl-inpainting-0.1-unet.fp16.safetensors (models fetch sdxl-inpainting-unet)"
M3FACE_MODELS = ("v1-5-pruned-emaonly.safetensors (models fetch sd15-base) or an SD1.5 checkpoint; "
                 "m3face_{branch}.safetensors (models fetch m3face-controlnet-...); the FaceConditioning-english "
                 "Muse folder in models/likeness/m3face/ (faceconditioning-english-*). " + MODELS_HINT)
M3FACE_MUSE_NOTE = "Muse (aMUSEd) draws the condition from the description: 12 steps, guidance 10, fixed seed."
M3FACE_SAMPLING = "uni_pc, 20 steps, CFG 7.5 (the authors' validation settings)."
FLUX = ("flux1-dev.safetensors (models fetch flux1-dev: a gated repository, set HF_TOKEN) in models/diffusion_models/; "
        "clip_l.safetensors and t5xxl_fp16.safetensors (models fetch flux-clip-l flux-t5xxl-fp16) in "
        "models/text_encoders/; ae.safetensors (models fetch flux-ae) in models/vae/.")
PULID_FILES = ("pulid_flux_v0.9.1.safetensors (models fetch pulid-flux-v0.9.1) in models/pulid/; "
               "EVA02_CLIP_L_336_psz14_s6B.pt (eva02-clip-l-14-336) in models/clip_vision/; "
               "insightface antelopev2 (insightface-antelopev2: PuLID was trained on it); BiSeNet face_parsing.pth "
               f"(bisenet-face-parsing). {MODELS_HINT}")
PULID_APPLY = ("weight 1 = the official 'id weight' (0-3: more likeness, less prompt freedom). start_at 0.14 = the "
               "official 'start inserting ID' at step 4 of 28, recommended for photos; 0-0.04 for stylised images.")
PULID_SAMPLING = ("cfg 1 with FluxGuidance 4, euler / simple, 28 steps (the official demo's). The negative prompt is "
                  "read only with real CFG (cfg > 1 and FluxGuidance 1: the official 'true CFG'). Expect ")


def _sample_stage(title: str, expect: str, columns) -> Stage:
    return Stage(title, f"Sampling as usual. Expect {expect}", columns, YELLOW)


EXAMPLES: tuple[Example, ...] = (
    Example("Face analysis - first run, no downloads", (
        Stage("1. Reference photo and analyzer",
              "Runs with no model downloads: the dlib analyzer's models ship in its pip packages (pip install "
              "dlib-bin face-recognition-models).\nPick a portrait in Load Image (files in ComfyUI/input/, or "
              "Upload). Every stage reads this photo.", ((1,), (2,))),
        Stage("2. Detect and align",
              "Analyze Faces keeps the largest face; the preview boxes every face (green = selected).\nAlign Faces "
              "cuts the 224 px ArcFace-aligned crop the identity techniques use.", ((3, 5), (4, 6)), GREEN),
        Stage("3. Identity embedding",
              "One embedding per face, combined, saved to models/likeness/embeds/reference_identity.safetensors "
              "(Load Face Embeds reuses it without the photo).", ((7, 8, 9),), GREEN),
        Stage("4. Regions and pose",
              "Face Regions draws the whole-face mask from the landmarks (no parser weights; the BiSeNet "
              "face_parsing.pth gives finer regions). Face Keypoint Map draws the 5-keypoint pose map.",
              ((30, 31, 35), (32, 33), (34, 36)), BROWN),
        Stage("5. Check a generated image",
              "Load the image to check (e.g. a result of the other examples). Face Identity Similarity compares "
              "its face with the reference embedding: dlib passes at distance < 0.6. The preview shows the "
              "verdict.", ((10,), (11,), (12,)), CYAN),
    )),
    Example("Face Fusion - one identity", (
        Stage("1. Model and adapter",
              f"{SD15}\nFace Fusion has no released weights: run 'Face Fusion - train an adapter' first. It saves "
              "models/likeness/fusion/my_face.safetensors; press R (refresh) to see a new file here.", ((1, 2),)),
        Stage("2. Reference face",
              "A photo of the person. dlib finds the face (no downloads); Align Faces makes the 512 px reference "
              "crop.", ((3,), (4, 5, 6)), GREEN),
        Stage("3. Apply Face Fusion",
              "The reference face's keys and values join every cross-attention. weight 1 = full effect, 0 = off. "
              "capture 'per step' is the paper's; the cached modes are faster.", ((7,),), GREEN),
        _sample_stage("4. Prompt and sample", "a 512x512 image of the person in output/ (likeness_fusion_*.png).",
                      ((8, 9, 10), (11,), (12, 13))),
    )),
    Example("Face Fusion - one identity (SDXL)", (
        Stage("1. Model and adapter",
              f"{SDXL}\nFace Fusion has no released weights. Fusion Adapter New starts an untrained SDXL adapter "
              "(each layer's face keys and values from its self-attention: reference-only attention). For the "
              "trained effect run 'Face Fusion - train an adapter' with this checkpoint, then load its file with "
              "Fusion Adapter Loader instead (an SD1.5 adapter is refused here).", ((1, 2),)),
        Stage("2. Reference face",
              "A photo of the person. dlib finds the face (no downloads); Align Faces makes the 512 px reference "
              "crop.", ((3,), (4, 5, 6)), GREEN),
        Stage("3. Apply Face Fusion",
              "The reference face's keys and values join every cross-attention (the reference pass gets the "
              "prompt's pooled and size conds). weight 1 = full effect, 0 = off. capture 'per step' is the paper's; "
              "the cached modes are faster.", ((7,),), GREEN),
        _sample_stage("4. Prompt and sample",
                      "a 1024x1024 image of the person in output/ (likeness_fusion_sdxl_*.png).",
                      ((8, 9, 10), (11,), (12, 13))),
    )),
    Example("Face Fusion - several photos of one person", (
        Stage("1. Model and adapter",
              f"{SD15}\nThe adapter comes from 'Face Fusion - train an adapter' (my_face.safetensors); press R to "
              "refresh the list after training.", ((1, 2),)),
        Stage("2. Photos of the same person",
              "Two or more photos of one person, batched (same size: resize them first if they differ).",
              ((3, 14), (15,)), GREEN),
        Stage("3. Faces",
              "One face per photo (photos without a face are skipped); the batch of aligned crops is the "
              "multi-reference (Eq. 6).", ((4, 5, 6),), GREEN),
        Stage("4. Apply Face Fusion",
              "reference_budget 2: more references are pooled to the cost of two. Cached capture runs the "
              "references once.", ((7,),), GREEN),
        _sample_stage("5. Prompt and sample", "a 512x512 image in output/ (likeness_fusion_multiref_*.png).",
                      ((8, 9, 10), (11,), (12, 13))),
    )),
    Example("Face Fusion - two people", (
        Stage("1. Model and adapter",
              f"{SD15}\nThe adapter comes from 'Face Fusion - train an adapter' (my_face.safetensors).", ((1, 2),)),
        Stage("2. Person A",
              "Photo of the person for the left side of the image.", ((3,), (4, 5, 6)), GREEN),
        Stage("3. Person B",
              "Photo of the person for the right side (uses the analyzer of stage 2).", ((20,), (21, 22)), GREEN),
        Stage("4. Where each face goes",
              "Masks of the output size (768x512): left half for A, right half for B. Each face's keys only "
              "reach queries inside its own mask (Eq. 7).", ((30, 31), (32, 33)), BROWN),
        Stage("5. Identities and Apply Face Fusion",
              "Chain one Fusion Identity per person (reference crops + mask) into Apply Face Fusion's "
              "identities input.", ((40, 41), (7,)), GREEN),
        _sample_stage("6. Prompt and sample", "a 768x512 image with A on the left and B on the right.",
                      ((8, 9, 10), (11,), (12, 13))),
    )),
    Example("Face Fusion - train an adapter", (
        Stage("1. Model and face analyzer",
              f"Train on the model you will generate with: {SD15}\ndlib aligns each photo's face as its "
              "reference crop (no downloads).", ((1, 2),)),
        Stage("2. Train",
              "Photos of faces (10 or more), each with a same-name .txt caption, in ComfyUI/input/likeness_faces/."
              "\nSaves models/likeness/fusion/my_face.safetensors, which the other Face Fusion examples load. "
              "Cancel keeps the last checkpoint: Run again continues from it (resume auto; the seed is fixed). Run "
              "again after it finished: the finished adapter is returned, nothing is retrained.",
              ((3,), (4,)), PURPLE),
        Stage("3. Try it: reference face",
              "A photo of someone to test the adapter with, aligned like the training crops.", ((5,), (6, 7)),
              GREEN),
        Stage("4. Apply Face Fusion",
              "Uses the adapter just trained (or the one loaded from the cache when nothing changed).", ((8,),),
              GREEN),
        _sample_stage("5. Prompt and sample", "a 512x512 image in output/ (likeness_fusion_trained_*.png).",
                      ((9, 10, 11), (12,), (13, 14))),
    )),
    Example("Face Fusion - one identity (Flux)", (
        Stage("1. FLUX.1 model and adapter",
              f"{FLUX}\nFace Fusion has no released weights. Fusion Adapter New starts an untrained Flux adapter: per "
              "block a low-rank projection that starts as the identity, so the reference image's own keys and values "
              "join each block's joint attention (as FLUX.1 Kontext sees a reference image). For the trained effect "
              "run 'Face Fusion - train an adapter (Flux)', then load my_flux_face.safetensors with Fusion Adapter "
              "Loader instead (an SD1.5 or SDXL adapter is refused here).", ((1, 2, 3), (4,))),
        Stage("2. Reference face",
              "A photo of the person. dlib finds the face (no downloads); Align Faces makes the 512 px reference "
              "crop.", ((5,), (6, 7, 8)), GREEN),
        Stage("3. Apply Face Fusion",
              "The reference face runs through the same DiT; each block's reference keys and values join its joint "
              "attention next to the prompt's and the image's. weight 1 = full effect, 0 = off. capture 'per step' "
              "is the paper's (one more DiT pass per step); the cached modes are faster.", ((9,),), GREEN),
        Stage("4. Prompt and sample",
              "cfg 1 with FluxGuidance 3.5, euler / simple, 20 steps; the negative prompt is read only with cfg > 1. "
              "Expect a 1024x1024 image of the person in output/ (likeness_fusion_flux_*.png); an untrained adapter "
              "carries less of the identity than a trained one.", ((10, 11, 12), (13, 14), (15, 16)), YELLOW),
    )),
    Example("Face Fusion - train an adapter (Flux)", (
        Stage("1. FLUX.1 model and face analyzer",
              f"Train on the model you will generate with: {FLUX}\ndlib aligns each photo's face as its reference "
              "crop (no downloads).", ((1, 2), (3, 4))),
        Stage("2. Train",
              "Photos of faces (10 or more), each with a same-name .txt caption, in ComfyUI/input/likeness_faces/."
              "\nOnly the adapter learns (rank 16 per block; bf16 where the GPU has it, gradient checkpointing on); "
              "FLUX.1 dev itself is 24 GB in bf16, so this needs a large GPU. guidance 3.5 is what the adapter is "
              "trained under: sample with the same. Saves models/likeness/fusion/my_flux_face.safetensors. Cancel "
              "keeps the last checkpoint: Run again continues from it (resume auto; the seed is fixed). Run again "
              "after it finished: the finished adapter is returned, nothing is retrained.", ((5,), (6,)), PURPLE),
        Stage("3. Try it: reference face",
              "A photo of someone to test the adapter with, aligned like the training crops.", ((7,), (8, 9)),
              GREEN),
        Stage("4. Apply Face Fusion",
              "Uses the adapter just trained (or the one loaded from the cache when nothing changed).", ((10,),),
              GREEN),
        Stage("5. Prompt and sample",
              "cfg 1 with FluxGuidance 3.5 (as trained), euler / simple, 20 steps. Expect a 1024x1024 image in "
              "output/ (likeness_fusion_flux_trained_*.png).", ((11, 12, 13), (14, 15), (16, 17)), YELLOW),
    )),
    Example("ConsistentID - portrait", (
        Stage("1. Models",
              f"{SD15}\nConsistentID-v1.bin, CLIP-ViT-H-14, insightface buffalo_l and BiSeNet face_parsing.pth. "
              f"{MODELS_HINT}", ((1, 2, 3), (4, 14))),
        Stage("2. Reference face", "A clear photo of the person's face.", ((5,), (6,)), GREEN),
        Stage("3. ConsistentID Encode",
              "Write the prompt here, not in a CLIP Text Encode: the node adds the facial words and returns the "
              "model, positive and negative.", ((9,),), GREEN),
        _sample_stage("4. Sample", "a 512x512 portrait in output/ (likeness_consistentid_*.png).",
                      ((10, 11), (12, 13))),
    )),
    Example("ConsistentID - portrait (SDXL)", (
        Stage("1. Models",
              f"{SDXL}\nConsistentID_SDXL-v1.bin (models fetch consistentid-sdxl), CLIP-ViT-H-14, insightface "
              f"buffalo_l and BiSeNet face_parsing.pth. {MODELS_HINT}", ((1, 2, 3), (4, 14))),
        Stage("2. Reference face", "A clear photo of the person's face.", ((5,), (6,)), GREEN),
        Stage("3. ConsistentID Encode",
              "Write the prompt here, not in a CLIP Text Encode: the node adds the facial words (both SDXL text "
              "encoders) and returns the model, positive and negative. merge_at 0.62 = the official step 30 of 50.",
              ((9,),), GREEN),
        _sample_stage("4. Sample", "an 864x1152 portrait in output/ (likeness_consistentid_sdxl_*.png). Euler, 50 "
                      "steps, CFG 5 (the official SDXL script's).", ((10, 11), (12, 13))),
    )),
    Example("ConsistentID - identity in a masked region", (
        Stage("1. Models",
              f"{SD15}\nConsistentID-v1.bin, CLIP-ViT-H-14, insightface buffalo_l and BiSeNet face_parsing.pth. "
              f"{MODELS_HINT}", ((1, 2, 3), (4, 14))),
        Stage("2. Reference face", "A clear photo of the person's face.", ((5,), (6,)), GREEN),
        Stage("3. Where the identity goes",
              "A mask of the output size: white where the identity acts (here the left half).", ((15, 16), (17,)),
              BROWN),
        Stage("4. ConsistentID Encode", "The mask input limits the identity to the white area.", ((9,),), GREEN),
        _sample_stage("5. Sample", "a 512x512 image whose left half carries the identity.", ((10, 11), (12, 13))),
    )),
    Example("ConsistentID - fine-tune on your photos", (
        Stage("1. Models",
              f"{SD15}\nCLIP-ViT-H-14, insightface buffalo_l, BiSeNet face_parsing.pth and ConsistentID-v1.bin (the "
              f"start). {MODELS_HINT}", ((1, 2), (3, 4, 5))),
        Stage("2. Train",
              "Photos of the person with same-name .txt captions in ComfyUI/input/likeness_faces/. Saves "
              "models/likeness/consistentid/my_consistentid.safetensors (press R to list it in the loader). Cancel "
              "keeps the last checkpoint: Run again continues from it; after it finished, Run again returns the "
              "result without training.", ((6,), (7,)), PURPLE),
        Stage("3. Try it: reference face", "A photo of the person.", ((8,), (9,)), GREEN),
        Stage("4. ConsistentID Encode", "Uses the weights just trained.", ((10,),), GREEN),
        _sample_stage("5. Sample", "a 512x768 image in output/ (likeness_consistentid_trained_*.png).",
                      ((11, 12), (13, 14))),
    )),
    Example("Face-MakeUp - portrait", (
        Stage("1. Models",
              f"{SD15}\nface_makeup_sd15.bin (models fetch face-makeup-sd15), CLIP-ViT-H-14, insightface buffalo_l. "
              f"{MODELS_HINT}", ((1, 2), (3, 4))),
        Stage("2. Reference face", "A clear photo of the person's face.", ((5,), (6,)), GREEN),
        Stage("3. Prompt and Face-MakeUp Apply",
              "Identity tokens in every cross-attention plus a pose ControlNet on the conditioning (it follows the "
              "reference's head pose). ID weight 0.6 is the paper's.", ((7, 8), (9,)), GREEN),
        _sample_stage("4. Sample", "a 512x512 image in output/ (likeness_face_makeup_*.png).", ((10, 11), (12, 13))),
    )),
    Example("Face-MakeUp - head pose from another photo", (
        Stage("1. Models",
              f"{SD15}\nface_makeup_sd15.bin (models fetch face-makeup-sd15), CLIP-ViT-H-14, insightface buffalo_l. "
              f"{MODELS_HINT}", ((1, 2), (3, 4))),
        Stage("2. Reference face", "The person whose identity you want.", ((5,), (6,)), GREEN),
        Stage("3. Head pose from another photo",
              "Any photo with the head pose you want; the keypoint map is drawn at the output size. Head Pose "
              "shows its yaw, pitch and roll.", ((14,), (15, 16, 17)), BROWN),
        Stage("4. Prompt and Face-MakeUp Apply", "pose_map takes the other photo's keypoint map.", ((7, 8), (9,)),
              GREEN),
        _sample_stage("5. Sample", "the reference person in the other photo's head pose.", ((10, 11), (12, 13))),
    )),
    Example("Face-MakeUp - mix two identities", (
        Stage("1. Models",
              f"{SD15}\nface_makeup_sd15.bin (models fetch face-makeup-sd15), CLIP-ViT-H-14, insightface buffalo_l. "
              f"{MODELS_HINT}", ((1, 2), (3, 4))),
        Stage("2. Two identities",
              "Photos of two people, the same size, batched. mix_weights below sets each one's share.",
              ((5, 14), (15, 6)), GREEN),
        Stage("3. Prompt and Face-MakeUp Apply", "mix_weights '0.5, 0.5' mixes the two people equally.",
              ((7, 8), (9,)), GREEN),
        _sample_stage("4. Sample", "a face that resembles both people.", ((10, 11), (12, 13))),
        Stage("5. Check the mix",
              "Analyzes the result; Identity Mixing Balance reports its similarity to each person and each one's "
              "share (text output, shown in the queue's history).", ((16,), (17,)), CYAN),
    )),
    Example("FaceID PlusV2 - portrait (baseline)", (
        Stage("1. Models",
              f"{SD15}\nip-adapter-faceid-plusv2_sd15.bin (models fetch ipadapter-faceid-plusv2-sd15), "
              f"CLIP-ViT-H-14, insightface buffalo_l. {MODELS_HINT}", ((1, 2), (3, 4))),
        Stage("2. Reference face", "A clear photo of the person's face.", ((5,), (6,)), GREEN),
        Stage("3. Prompt and FaceID Apply",
              "IP-Adapter FaceID PlusV2 with the same inputs as Face-MakeUp, for comparison.", ((7, 8), (9,)),
              GREEN),
        _sample_stage("4. Sample", "a 512x512 image in output/ (likeness_faceid_plusv2_*.png).", ((10, 11), (12, 13))),
    )),
    Example("FaceID PlusV2 - portrait (SDXL)", (
        Stage("1. Models",
              f"{SDXL} The official demo used RealVisXL V3.0.\nip-adapter-faceid-plusv2_sdxl.bin (models fetch "
              f"ipadapter-faceid-plusv2-sdxl), CLIP-ViT-H-14, insightface buffalo_l. {MODELS_HINT}", ((1, 2), (3, 4))),
        Stage("2. Reference face", "A clear photo of the person's face.", ((5,), (6,)), GREEN),
        Stage("3. Prompt and FaceID Apply",
              "IP-Adapter FaceID PlusV2 on SDXL: ID tokens (ArcFace + CLIP-H of the face) in every cross-attention "
              "and the adapter's LoRA merged. weight 1, s_scale 1 (the official demo's).", ((7, 8), (9,)), GREEN),
        _sample_stage("4. Sample", "a 1024x1024 image in output/ (likeness_faceid_plusv2_sdxl_*.png). 30 steps, "
                      "CFG 7.5 (the official demo's).", ((10, 11), (12, 13))),
    )),
    Example("InstantID - portrait (SDXL)", (
        Stage("1. Models",
              f"{SDXL}\ninstantid-ip-adapter.bin (models fetch instantid-ip-adapter) in models/likeness/instantid/, "
              "the IdentityNet instantid-controlnet.safetensors (models fetch instantid-controlnet), insightface "
              f"antelopev2 (models fetch insightface-antelopev2; InstantID was trained on it). {MODELS_HINT}",
              ((1, 2), (3, 4))),
        Stage("2. Reference face",
              "A clear photo of the person's face. Its 5 keypoints, drawn at the output size, give the pose.",
              ((5,), (6, 7)), GREEN),
        Stage("3. Prompt and InstantID Apply",
              "ID tokens in every cross-attention plus the IdentityNet (a ControlNet fed the ID tokens) on the "
              "conditioning. 0.8 and 0.8 are the official adapter and IdentityNet strengths: raise them for "
              "likeness, lower the adapter for more prompt control.", ((8, 9), (10,)), GREEN),
        _sample_stage("4. Sample", "a 1024x1024 image in output/ (likeness_instantid_*.png). Euler, 30 steps, CFG 5 "
                      "(the official demo's).", ((11, 12), (13, 14))),
    )),
    Example("FaceA-Net - train an identity", (
        Stage("1. Photos of the person",
              "3 to 5 photos of one person, one clearly visible face each (any sizes).", ((2, 3), (4,)), GREEN),
        Stage("2. Same size, one batch", "Scaled to 768x768 and batched for the trainer.", ((5, 6, 7), (8, 9)),
              GREEN),
        Stage("3. Models",
              "An SD1.5 inpainting checkpoint: sd-v1-5-inpainting.ckpt (models fetch sd15-inpainting). dlib finds "
              "the faces (no downloads).", ((1, 10),)),
        Stage("4. Train",
              "Saves the identity 'anna' (models/likeness/identities/anna.safetensors and its LoRA) that the other "
              "FaceA-Net examples load; press R to list it there. Cancel keeps the last checkpoint: Run again "
              "continues from it; after it finished, Run again returns the result without training.",
              ((11,), (12, 13)), PURPLE),
    )),
    Example("FaceA-Net - attribute transfer (nose)", (
        Stage("1. Photos of the other person",
              "Photos of the person whose attribute (here the nose) the identity takes.", ((3, 4), (5, 6, 7)),
              GREEN),
        Stage("2. Identity and models",
              "The identity to change ('FaceA-Net - train an identity' makes anna.safetensors), the inpainting "
              "checkpoint it was trained on (sd-v1-5-inpainting.ckpt) and dlib.", ((1, 2, 9),)),
        Stage("3. Transfer the attribute",
              "About 100 steps on the local task only. Saves the new identity anna_with_bens_nose.",
              ((10,), (14,)), PURPLE),
        Stage("4. Use it: inpaint a scene",
              "A scene with a face; the new identity is inpainted into it. Expect output/facea/attribute_transfer_*.",
              ((11,), (12,), (13,)), YELLOW),
    )),
    Example("FaceA-Net - put an identity into a scene", (
        Stage("1. Scene (any model)",
              f"Generate the scene with any checkpoint: {SD15} The identity only redraws the face.",
              ((1, 4), (2, 3), (5, 6)), YELLOW),
        Stage("2. Identity",
              "The inpainting checkpoint the identity was trained on (sd-v1-5-inpainting.ckpt) and the identity "
              "from 'FaceA-Net - train an identity' (anna.safetensors).", ((7,), (8, 9))),
        Stage("3. Face Inpaint",
              "Finds the face, inpaints it with the identity at 512 px and blends it back. Expect the scene before "
              "and after in output/facea/.", ((10,), (11, 12)), GREEN),
    )),
    Example("FaceA-Net - train an identity (SDXL)", (
        Stage("1. Photos of the person",
              "3 to 5 photos of one person, one clearly visible face each (any sizes).", ((2, 3), (4,)), GREEN),
        Stage("2. Same size, one batch", "Scaled to 1536x1536 and batched for the trainer.", ((5, 6, 7), (8, 9)),
              GREEN),
        Stage("3. Models",
              f"{SDXL_INPAINT_UNET} in models/diffusion_models/ (Load Diffusion Model) with the text encoders and VAE "
              f"of {SDXL_BASE_NAME} (models fetch sdxl-base). dlib finds the faces (no downloads).",
              ((1, 14), (10,))),
        Stage("4. Train",
              "Trains at 1024 px and saves the identity 'anna_sdxl' (models/likeness/identities/anna_sdxl.safetensors "
              "and its LoRA) that 'FaceA-Net - put an identity into a scene (SDXL)' loads; press R to list it there. "
              "An SDXL identity only fits SDXL models. Cancel keeps the last checkpoint: Run again continues from it.",
              ((11,), (12, 13)), PURPLE),
    )),
    Example("FaceA-Net - put an identity into a scene (SDXL)", (
        Stage("1. Scene (any SDXL model)",
              f"Generate the scene with any SDXL checkpoint: {SDXL} The identity only redraws the face.",
              ((1, 4), (2, 3), (5, 6)), YELLOW),
        Stage("2. Identity",
              f"The SDXL inpainting UNet the identity was trained on ({SDXL_INPAINT_UNET}, with the base "
              "checkpoint's text encoders and VAE) and the identity from 'FaceA-Net - train an identity (SDXL)' "
              "(anna_sdxl.safetensors).", ((7,), (8, 9))),
        Stage("3. Face Inpaint",
              "Finds the face, inpaints it with the identity at 1024 px and blends it back. Expect the scene before "
              "and after in output/facea/ (scene_sdxl_*).", ((10,), (11, 12)), GREEN),
    )),
    Example("FaceA-Net - two identities in one scene", (
        Stage("1. Scene (any model)",
              f"Generate a scene with two people: {SD15}", ((1, 4), (2, 3), (5, 6)), YELLOW),
        Stage("2. Identities",
              "The inpainting checkpoint (sd-v1-5-inpainting.ckpt) and one identity per face, left to right "
              "(anna, and ben: train him with 'FaceA-Net - train an identity' and the name ben).", ((7, 9), (8, 13))),
        Stage("3. Face Inpaint",
              "selection 'all': faces get identity, identity_2 from left to right. Expect the scene before and "
              "after in output/facea/.", ((10,), (11, 12)), GREEN),
    )),
    Example("FaceA-Net - step by step (power users)", (
        Stage("1. Scene and face crop",
              "The scene photo; dlib finds the face, Face Crop cuts it with context and makes the inpaint mask.",
              ((1,), (2, 3, 4)), BROWN),
        Stage("2. Identity",
              "Inpainting checkpoint (sd-v1-5-inpainting.ckpt) and identity (anna.safetensors): its LoRA on the "
              "model, its [feat] prompt as positive.", ((5, 6), (7, 8, 9)), GREEN),
        Stage("3. Inpaint the crop", "The stock inpainting chain on the 512 px crop.", ((10,), (11, 12)), YELLOW),
        Stage("4. Paste back",
              "Blends the inpainted crop back into the full scene. Expect output/facea/power_user_*.", ((13, 14),),
              CYAN),
    )),
    Example("Likeness Metrics - measure a Face-MakeUp portrait", (
        Stage("1. Models",
              f"{SD15}\nface_makeup_sd15.bin (models fetch face-makeup-sd15), CLIP-ViT-H-14, insightface buffalo_l. "
              f"{MODELS_HINT}", ((1, 2), (3, 4))),
        Stage("2. Reference face", "A clear photo of the person's face.", ((5,), (6,)), GREEN),
        Stage("3. Prompt and Face-MakeUp Apply",
              "The prompt is written once in 'Positive': the text encoder and the metrics (CLIP-T) both read it.",
              ((20, 8), (7, 9)), GREEN),
        _sample_stage("4. Sample", "a 512x512 image in output/ (likeness_measured_*.png).", ((10, 11), (12, 13))),
        Stage("5. Measure the likeness",
              "Likeness Metrics compares the image with the reference: FaceSim (ArcFace from the analyzer, dlib as "
              "an independent judge), CLIP-T / CLIP-I and DINO (model folders in models/likeness/evaluation/), and "
              "the copy-paste check against a second real photo of the person. The table and the contact sheet "
              "show the scores; Save Metrics writes them as CSV/JSON next to the image.",
              ((21,), (22,), (23, 24, 25)), CYAN),
    )),
    Example("M3Face - text to mask to face", (
        Stage("1. Models", M3FACE_MODELS.format(branch="segmentation_english"), ((1,), (2, 5))),
        Stage("2. Text to segmentation mask",
              f"{M3FACE_MUSE_NOTE} Edit the description; the preview shows the generated mask.", ((3,), (4,)),
              BROWN),
        Stage("3. Prompt and FaceControlNet",
              "The same description as the prompt, an empty negative; Apply ControlNet feeds the mask at strength 1.",
              ((6, 7), (8,)), GREEN),
        _sample_stage("4. Sample", f"a 512x512 face shaped by the mask. {M3FACE_SAMPLING}", ((9, 10), (11, 12))),
    )),
    Example("M3Face - text to landmarks to face", (
        Stage("1. Models", M3FACE_MODELS.format(branch="landmark_english"), ((1,), (2, 5))),
        Stage("2. Text to landmark drawing",
              f"{M3FACE_MUSE_NOTE} modality 'landmark' adds the landmark prefix; the preview shows the drawing.",
              ((3,), (4,)), BROWN),
        Stage("3. Prompt and FaceControlNet",
              "The same description as the prompt, an empty negative; the landmark FaceControlNet at strength 1.",
              ((6, 7), (8,)), GREEN),
        _sample_stage("4. Sample", f"a 512x512 face with the drawn pose and features. {M3FACE_SAMPLING}",
                      ((9, 10), (11, 12))),
    )),
    Example("M3Face - repaint the hair region", (
        Stage("1. Models", M3FACE_MODELS.format(branch="segmentation_english")
              + "\nBiSeNet face_parsing.pth (models fetch bisenet-face-parsing): the landmark parser has no hair.",
              ((1,), (10, 13))),
        Stage("2. Photo to segmentation mask",
              "A portrait photo; dlib finds the face, the parser's classes are painted in the palette on a 512 px "
              "square around the face (face_crop is the photo in the same frame).", ((2, 3), (4, 5), (6,)), BROWN),
        Stage("3. Hair mask and repaint",
              "The hair region of the same frame (grown 16 px) is regenerated by Muse from the new description; "
              "the rest of the mask is kept.", ((7, 8), (9,), (11, 12)), BROWN),
        Stage("4. Prompt and FaceControlNet", "The new description as the prompt, the edited mask as the condition.",
              ((14, 15), (16,)), GREEN),
        _sample_stage("5. Sample", f"a face with the new hair. {M3FACE_SAMPLING}", ((17, 18), (19, 20))),
    )),
    Example("M3Face - Imagic edit from an edited mask", (
        Stage("1. Models",
              "v1-5-pruned-emaonly.safetensors (models fetch sd15-base) or an SD1.5 checkpoint; "
              "m3face_segmentation_english.safetensors (models fetch m3face-controlnet-segmentation-english); BiSeNet "
              f"face_parsing.pth (models fetch bisenet-face-parsing). {MODELS_HINT}", ((1,), (8,))),
        Stage("2. Photo and its mask",
              "The photo to edit and its ORIGINAL mask (same frame). Save the preview, paint the change (hair, "
              "smile...) with the palette's colours and put it in ComfyUI/input/ as m3face_edited_mask.png.",
              ((2, 3), (4, 5), (6, 7)), BROWN),
        Stage("3. Imagic training",
              "Stage 1 fits the target prompt's embedding to the photo (500 steps), stage 2 fine-tunes the UNet's "
              "up blocks (1000 steps; lora for small GPUs). Saves models/likeness/m3face_imagic/my_edit. Cancel "
              "keeps a checkpoint; Run again resumes.", ((10,), (11,)), GREEN),
        Stage("4. Edited mask and interpolation",
              "alpha 0.9 mixes target and fitted embeddings (try 0.8 to 1.1); the EDITED mask steers the "
              "FaceControlNet.", ((9,), (12, 13), (14,)), GREEN),
        _sample_stage("5. Sample", "the photo's face with the edit, on the fine-tuned model.", ((15, 16), (17, 18))),
    )),
    Example("M3Face - multilingual prompt", (
        Stage("1. Models",
              "AltDiffusion-m18 diffusers folder in models/likeness/m3face/ (models fetch altdiffusion-m18-*), "
              "FaceConditioning-mlin (faceconditioning-mlin-*), m3face_segmentation_mlin.safetensors "
              f"(m3face-controlnet-segmentation-mlin). {MODELS_HINT}", ((1,), (2, 5))),
        Stage("2. Text to segmentation mask",
              "A French description (English, German, Italian, Spanish work too) through the multilingual Muse.",
              ((3,), (4,)), BROWN),
        Stage("3. Multilingual prompt and FaceControlNet",
              "AltDiffusion's XLM-R encoder takes the same French text; the mlin FaceControlNet takes the mask.",
              ((6, 7), (8,)), GREEN),
        _sample_stage("4. Sample", f"a 512x512 face from the French description. {M3FACE_SAMPLING}",
                      ((9, 10), (11, 12))),
    )),
    Example("PuLID-FLUX - portrait", (
        Stage("1. FLUX.1 model",
              f"{FLUX} FLUX.1 schnell loads the same way (4 steps; it has no guidance input).", ((1, 2, 3),)),
        Stage("2. PuLID-FLUX files and face analysis", PULID_FILES, ((4, 5), (6, 7))),
        Stage("3. Reference face to ID tokens",
              "A clear photo of the person. PuLID-FLUX Embed makes 32 ID tokens from it (the antelopev2 embedding and "
              "EVA-CLIP of the aligned, parsed face). A batch of photos of one person is averaged; an image without "
              "a face stops with its name.", ((8,), (9,)), GREEN),
        Stage("4. Apply PuLID-FLUX",
              "After every 2nd double block and every 4th single block the image tokens attend to the ID tokens. "
              + PULID_APPLY, ((10,),), GREEN),
        Stage("5. Prompt and sample",
              PULID_SAMPLING + "an 896x1152 portrait of the person in output/ (likeness_pulid_flux_*.png).",
              ((11, 12, 13), (14, 15), (16, 17)), YELLOW),
    )),
    Example("PuLID-FLUX - two people with masks", (
        Stage("1. FLUX.1 model", FLUX, ((1, 2, 3),)),
        Stage("2. PuLID-FLUX files and face analysis", PULID_FILES, ((4, 5), (6, 7))),
        Stage("3. Person A", "Photo of the person for the left side of the image.", ((8,), (9,)), GREEN),
        Stage("4. Person B", "Photo of the person for the right side (the loaders of stage 2 serve both).",
              ((20,), (21,)), GREEN),
        Stage("5. Where each person goes",
              "Masks of the output size (1152x896): left half for A, right half for B. Image tokens outside a "
              "person's mask get nothing from that person.", ((30, 31), (32, 33)), BROWN),
        Stage("6. Two Apply PuLID-FLUX",
              "One Apply per person, each with its embeds and mask; B's takes the model A's returns. " + PULID_APPLY,
              ((10, 18),), GREEN),
        Stage("7. Prompt and sample",
              PULID_SAMPLING + "a 1152x896 image with A on the left and B on the right (likeness_pulid_flux_two_*.png). "
              "Ask for two people in the prompt.", ((11, 12, 13), (14, 15), (16, 17)), YELLOW),
    )),
)


# --------------------------------------------------------------------------------------------------
# Geometry


@dataclass
class Box:
    label: str
    x: float
    y: float
    w: float
    h: float

    def intersects(self, other: "Box") -> bool:
        return (self.x < other.x + other.w and other.x < self.x + self.w
                and self.y < other.y + other.h and other.y < self.y + self.h)

    def contains(self, other: "Box") -> bool:
        return (self.x <= other.x and self.y <= other.y and other.x + other.w <= self.x + self.w
                and other.y + other.h <= self.y + self.h)


def layout_problems(nodes: list[Box], groups: list[Box]) -> list[str]:
    """Overlapping nodes (title bars included), nodes in no group or several, overlapping groups, and
    groups too big to see whole on the 1600x1000 screen at 100 % zoom."""
    problems = []
    for i, a in enumerate(nodes):
        problems += [f"{a.label} overlaps {b.label}" for b in nodes[i + 1:] if a.intersects(b)]
        owners = [g.label for g in groups if g.contains(a)]
        if len(owners) != 1:
            problems.append(f"{a.label} is inside {len(owners)} groups {owners}")
    for i, a in enumerate(groups):
        problems += [f"group {a.label} overlaps group {b.label}" for b in groups[i + 1:] if a.intersects(b)]
        if a.h > MAX_STAGE_HEIGHT or a.w > MAX_STAGE_WIDTH:
            problems.append(f"group {a.label} is {a.w:.0f}x{a.h:.0f}, more than one screen")
    return problems


def note_height(text: str, width: float, minimum: float = 0) -> int:
    per_line = max(1, int((width - 24) / NOTE_CHAR_WIDTH))
    lines = sum(max(1, math.ceil(len(paragraph) / per_line)) for paragraph in text.split("\n"))
    return int(max(minimum, lines * NOTE_LINE_HEIGHT + 36))


@dataclass
class Placed:
    nodes: dict[int, tuple[float, float, float, float]]  # id -> x, y (below the title bar), w, h
    groups: list[dict]


def note_ids(example: Example, node_ids) -> list[int]:
    """One note per stage, numbered after the graph's nodes."""
    first = max(node_ids) + 1
    return [first + index for index in range(len(example.stages))]


def place(example: Example, sizes: dict[int, tuple[float, float]], types: dict[int, str]) -> Placed:
    """Stages left to right; in each, the note across the top and the columns below it, or the note atop
    the shortest column when a tall node would not fit on the screen under a full-width note. ``sizes``
    are the frontend's minimum sizes, notes (``types`` "Note") included."""
    placed = Placed({}, [])
    graph_ids = [i for i, kind in types.items() if kind != "Note"]
    left = 0.0
    for stage, note_id in zip(example.stages, note_ids(example, graph_ids), strict=True):
        left += _place_stage(placed, stage, note_id, left, sizes, types) + GROUP_GAP
    return placed


def _node_size(node_id: int, width: float, sizes, types) -> tuple[float, float]:
    return width, max(sizes[node_id][1], MIN_SIZES.get(types[node_id], (0, 0))[1])


def _place_stage(placed: Placed, stage: Stage, note_id: int, left: float, sizes, types) -> float:
    """Place one stage's note and nodes from ``left``; add its group; return the group's width."""
    widths = [max([MIN_COLUMN_WIDTH] + [max(sizes[i][0], MIN_SIZES.get(types[i], (0, 0))[0]) for i in column])
              for column in stage.columns]
    heights = [sum(NODE_TITLE + _node_size(i, w, sizes, types)[1] + GAP_Y for i in column) - GAP_Y
               for column, w in zip(stage.columns, widths, strict=True)]
    inner = sum(widths) + GAP_X * (len(widths) - 1)
    note_h = note_height(stage.note, inner, sizes[note_id][1])
    columns_top = GROUP_HEADER + NODE_TITLE + note_h + GAP_Y
    note_column = None
    if columns_top + max(heights) + PAD > MAX_STAGE_HEIGHT:  # the note goes atop the shortest column
        note_column = heights.index(min(heights))
        note_h = note_height(stage.note, widths[note_column], sizes[note_id][1])
        columns_top = GROUP_HEADER
    x, bottom = left + PAD, 0.0
    for column_index, (column, width) in enumerate(zip(stage.columns, widths, strict=True)):
        y = columns_top
        if note_column == column_index:
            placed.nodes[note_id] = (x, y + NODE_TITLE, width, note_h)
            y += NODE_TITLE + note_h + GAP_Y
        for node_id in column:
            w, h = _node_size(node_id, width, sizes, types)
            placed.nodes[node_id] = (x, y + NODE_TITLE, w, h)
            y += NODE_TITLE + h + GAP_Y
        bottom = max(bottom, y - GAP_Y)
        x += width + GAP_X
    if note_column is None:
        placed.nodes[note_id] = (left + PAD, GROUP_HEADER + NODE_TITLE, inner, note_h)
    placed.groups.append({"title": stage.title, "color": stage.color,
                          "bounding": [left, 0, inner + 2 * PAD, bottom + PAD]})
    return inner + 2 * PAD


def placed_boxes(placed: Placed) -> tuple[list[Box], list[Box]]:
    nodes = [Box(f"#{i}", x, y - NODE_TITLE, w, h + NODE_TITLE) for i, (x, y, w, h) in placed.nodes.items()]
    groups = [Box(g["title"], *g["bounding"]) for g in placed.groups]
    return nodes, groups


# --------------------------------------------------------------------------------------------------
# The graph, built by the frontend


def api_graph(prompt: dict) -> dict:
    """Nodes (id, type, title, widget values) and links (from, slot, to, input) of an API prompt."""
    nodes, links = [], []
    for node_id, node in prompt.items():
        widgets = {}
        for name, value in node.get("inputs", {}).items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                links.append([int(value[0]), int(value[1]), int(node_id), name])
            else:
                widgets[name] = value
        nodes.append({"id": int(node_id), "type": node["class_type"],
                      "title": (node.get("_meta") or {}).get("title"), "widgets": widgets})
    return {"nodes": nodes, "links": links}


TO_API_JS = """async (workflow) => {
  await app.loadGraphData(workflow, true, true, "layout-source");
  return (await app.graphToPrompt()).output;
}"""

BUILD_JS = """(spec) => {
  const graph = app.graph;
  graph.clear();
  const made = new Map();
  for (const n of spec.nodes) {
    const node = LiteGraph.createNode(n.type);
    if (!node) throw new Error(`node type ${n.type} is not registered`);
    node.id = n.id;
    if (n.title && n.title !== node.title) node.title = n.title;
    graph.add(node);
    made.set(n.id, node);
    for (const [name, value] of Object.entries(n.widgets)) {
      const widget = node.widgets?.find((w) => w.name === name);
      if (!widget) throw new Error(`#${n.id} ${n.type} has no widget '${name}'`);
      widget.value = value;
    }
    for (const widget of node.widgets ?? []) if (widget.name === "control_after_generate") widget.value = "fixed";
  }
  for (const note of spec.notes) {
    const node = LiteGraph.createNode("Note");
    node.id = note.id;
    graph.add(node);
    node.widgets[0].value = note.text;
    made.set(note.id, node);
  }
  for (const [fromId, fromSlot, toId, inputName] of spec.links) {
    const target = made.get(toId);
    const slot = target.findInputSlot(inputName);
    if (slot < 0) throw new Error(`#${toId} ${target.type} has no input '${inputName}'`);
    if (!made.get(fromId).connect(fromSlot, target, slot)) throw new Error(`#${fromId} cannot feed #${toId}.${inputName}`);
  }
  // computeSize: what the frontend enlarges a node to when it loads the file (titles, widgets, text areas)
  return Object.fromEntries([...made].map(([id, node]) => {
    const [w, h] = node.computeSize();
    return [id, [node.type, Math.max(node.size[0], w), Math.max(node.size[1], h)]];
  }));
}"""

PLACE_JS = """async (placed) => {
  const graph = app.graph;
  for (const [id, [x, y, w, h]] of Object.entries(placed.nodes)) {
    const node = graph.getNodeById(Number(id));
    node.pos = [x, y];
    node.setSize([w, h]);
    if (node.type !== "Note") node.properties["Node name for S&R"] ??= node.type;
  }
  for (const g of placed.groups) {
    const group = new LiteGraph.LGraphGroup(g.title);
    group.color = g.color;
    group.pos = [g.bounding[0], g.bounding[1]];
    group.size = [g.bounding[2], g.bounding[3]];
    graph.add(group);
  }
  return JSON.stringify((await app.graphToPrompt()).workflow);
}"""


def read_prompt(page, path: str) -> dict:
    """The example's graph as an API prompt (a UI file is converted by the frontend itself)."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if "nodes" in data:
        data = page.evaluate(TO_API_JS, data)
    return data


def build_example(page, example: Example, path: str) -> dict:
    graph = api_graph(read_prompt(page, path))
    graph_ids = [node["id"] for node in graph["nodes"]]
    staged = [i for stage in example.stages for column in stage.columns for i in column]
    if sorted(staged) != sorted(graph_ids):
        raise ValueError(f"{example.name}: stages list {sorted(staged)}, the graph has {sorted(graph_ids)}")
    graph["notes"] = [{"id": i, "text": stage.note}
                      for i, stage in zip(note_ids(example, graph_ids), example.stages, strict=True)]
    built = page.evaluate(BUILD_JS, graph)
    sizes = {int(i): (w, h) for i, (_, w, h) in built.items()}
    types = {int(i): t for i, (t, _, _) in built.items()}
    placed = place(example, sizes, types)
    problems = layout_problems(*placed_boxes(placed))
    if problems:
        raise ValueError(f"{example.name}: " + "; ".join(problems))
    workflow = json.loads(page.evaluate(PLACE_JS, {"nodes": {str(k): v for k, v in placed.nodes.items()},
                                                   "groups": placed.groups}))
    workflow["extra"]["ds"] = {"scale": 1, "offset": list(CANVAS_ORIGIN)}
    return workflow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout")
    parser.add_argument("names", nargs="*", help="only these examples (file names without .json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.path.insert(0, TESTS)
    from playwright.sync_api import sync_playwright

    import browser_support

    missing = browser_support.missing_requirements(args.comfyui)
    if missing:
        parser.error("missing: " + ", ".join(missing))
    chosen = [e for e in EXAMPLES if not args.names or e.name in args.names]
    with tempfile.TemporaryDirectory(prefix="likeness-layout-") as base:
        browser_support.prepare_base(base, ROOT)
        with browser_support.ComfyServer(base, args.comfyui) as server, sync_playwright() as playwright:
            browser, page, errors = browser_support.open_page(playwright, server.url)
            try:
                for example in chosen:
                    path = os.path.join(EXAMPLES_DIR, example.name + ".json")
                    workflow = build_example(page, example, path)
                    with open(path, "w", encoding="utf-8") as handle:
                        json.dump(workflow, handle, indent=2, ensure_ascii=False)
                        handle.write("\n")
                    logger.info("wrote %s", path)
            finally:
                browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
