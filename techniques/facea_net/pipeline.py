"""The FaceA-Net inference chain: find faces in a scene, redraw each with its identity, paste back.

For every image of the batch: the face analysis chain finds and selects faces (left to right); each
selected face is matched to an identity (one identity: every face; several: left to right, or by
similarity to each identity's reference embedding); its crop is inpainted by the identity model (the
identity's LoRA applied like the stock LoraLoader does, the prompt T'_id with its [feat] vectors) and
blended back at the original resolution. An image without a face is passed through unchanged (with a
warning) or raises, as chosen.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ...errors import InvalidInputError, NoFaceError
from .identity import Identity
from .inpaint import (
    CropInfo,
    build_masks,
    crop_image,
    crop_region_masks,
    make_crop_info,
    parse_regions,
    paste_back,
    region_mask_for,
    sample_inpaint,
)
from .lora import apply_lora_to_model, check_identity_fits, identity_lora_state
from .prompt import build_identity_conditioning

logger = logging.getLogger("likeness")

ASSIGNMENTS = ("left_to_right", "most_similar")
NO_FACE = ("pass_through", "error")
NO_FACE_ADVICE = ("Set on_no_face to 'pass_through' to return such images unchanged, or change "
                  "selection / face_index.")


@dataclass
class InpaintSettings:
    text: str = "a photo of a face, natural skin, sharp focus"   # T_id: expression, accessories, style
    negative: str = "blurry, deformed, lowres"
    selection: str = "largest"            # largest / index / all (face analysis selection)
    face_index: int = 0
    assignment: str = "left_to_right"
    regions: str = "face"
    mask_shape: str = "box"
    grow: int = 16
    feather: int = 24
    context: float = 2.0
    working_size: int = 512
    steps: int = 25
    cfg: float = 5.0
    sampler_name: str = "euler_ancestral"
    scheduler: str = "normal"
    denoise: float = 1.0
    seed: int = 0
    lora_strength: float = 1.0
    feat_strength: float = 1.0
    on_no_face: str = "pass_through"

    def __post_init__(self):
        if self.assignment not in ASSIGNMENTS:
            raise InvalidInputError(f"assignment must be one of {ASSIGNMENTS}, got {self.assignment!r}.")
        if self.on_no_face not in NO_FACE:
            raise InvalidInputError(f"on_no_face must be one of {NO_FACE}, got {self.on_no_face!r}.")
        self.region_names = parse_regions(self.regions)


@dataclass
class FaceCrops:
    """FACEA_CROPS: working crops of selected faces and where they go back (power-user chain)."""

    infos: list[CropInfo]
    blend: torch.Tensor          # [N,h,w]
    image_sizes: list[tuple[int, int]]
    notes: list[str] = field(default_factory=list)


def analyze_scene(analyzer, image: torch.Tensor, settings: InpaintSettings, embed: bool):
    from ...face_analysis.analyze import analyze

    on_no_face = "error" if settings.on_no_face == "error" else "pass_through"
    result = analyze(analyzer, image, selection=settings.selection, face_index=settings.face_index,
                     on_no_face=on_no_face, embed=embed, no_face_advice=NO_FACE_ADVICE)
    return result.faces


def assign_identities(faces: Sequence, identities: Sequence[Identity], mode: str) -> list[tuple[int, int]]:
    """(face position, identity index) pairs: one identity -> every face; several -> left to right (extra
    faces untouched) or greedily by cosine similarity to each identity's reference embedding."""
    if not identities:
        raise InvalidInputError("Face Inpaint needs at least one IDENTITY.")
    if len(identities) == 1:
        return [(i, 0) for i in range(len(faces))]
    if mode == "left_to_right":
        return [(i, i) for i in range(min(len(faces), len(identities)))]
    scores = np.full((len(faces), len(identities)), -2.0)
    for i, face in enumerate(faces):
        emb = getattr(face, "embedding", None)
        for j, ident in enumerate(identities):
            if emb is None or ident.reference_embedding is None:
                continue
            a = np.asarray(emb, dtype=np.float64).reshape(-1)
            b = ident.reference_embedding.detach().cpu().double().numpy().reshape(-1)
            if a.shape == b.shape:
                scores[i, j] = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
    if (scores <= -2.0).all():
        logger.warning("Face Inpaint: no identity has a reference embedding from this analyzer; "
                       "assigning left to right instead of by similarity.")
        return [(i, i) for i in range(min(len(faces), len(identities)))]
    pairs, used_faces, used_ids = [], set(), set()
    for flat in np.argsort(-scores, axis=None):
        i, j = np.unravel_index(flat, scores.shape)
        if i in used_faces or j in used_ids or scores[i, j] <= -2.0:
            continue
        pairs.append((int(i), int(j)))
        used_faces.add(i)
        used_ids.add(j)
    return sorted(pairs)


def assignment_notes(image_index: int, faces: int, identities: int, pairs: Sequence[tuple[int, int]]) -> list[str]:
    """What an assignment leaves out: faces that get no identity (left unchanged) and identities no face gets."""
    notes = []
    unassigned = sorted(set(range(faces)) - {i for i, _ in pairs})
    unused = sorted(set(range(identities)) - {j for _, j in pairs})
    if unassigned:
        notes.append(f"image {image_index}: face(s) {unassigned} (left to right) got no identity and were left "
                     f"unchanged ({identities} identities for {faces} faces)")
    if unused:
        notes.append(f"image {image_index}: identity number(s) {[j + 1 for j in unused]} were not used "
                     f"({identities} identities for {faces} faces)")
    return notes


def face_crop(image: torch.Tensor, face, settings: InpaintSettings, parser=None, image_index: int = 0):
    """(CropInfo, crop [h,w,3], InpaintMasks) of one face of one image [H,W,C]."""
    info = make_crop_info(face.bbox, tuple(image.shape[:2]), settings.context, settings.working_size,
                          image_index, square=True)
    crop = crop_image(image, info)
    regions = crop_region_masks(face, info, settings.region_names, crop, parser, settings.mask_shape)
    masks = build_masks(region_mask_for(regions, settings.region_names), settings.grow, settings.feather)
    return info, crop, masks


def crop_faces(image: torch.Tensor, analysis, settings: InpaintSettings, parser=None):
    """Every selected face of every image as a working crop (the Face Crop node)."""
    crops, samples, blends, infos, notes = [], [], [], [], []
    for b in range(image.shape[0]):
        faces = analysis.faces[b] if b < len(analysis.faces) else []
        if not faces:
            notes.append(f"image {b}: no face selected")
        for face in faces:
            info, crop, masks = face_crop(image[b].float(), face, settings, parser, b)
            crops.append(crop[..., :3])
            samples.append(masks.sample)
            blends.append(masks.blend)
            infos.append(info)
    if not crops:
        raise NoFaceError("Face Crop: no face selected in any image; check the FACES input.")
    return (torch.stack(crops), torch.stack(samples),
            FaceCrops(infos, torch.stack(blends), [tuple(image.shape[1:3])] * image.shape[0], notes))


def paste_faces(image: torch.Tensor, generated: torch.Tensor, crops: FaceCrops) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend generated crops [N,h,w,3] back into their images (the Face Paste node)."""
    if generated.shape[0] != len(crops.infos):
        raise InvalidInputError(f"{generated.shape[0]} generated crops for {len(crops.infos)} face crops; "
                                "keep the batch from Face Crop through sampling.")
    out = image.clone()
    masks = torch.zeros(image.shape[:3])
    for k, info in enumerate(crops.infos):
        if info.image_index >= image.shape[0] or tuple(image.shape[1:3]) != tuple(info.image_size):
            raise InvalidInputError("Face Paste: the image is not the one the crops were taken from "
                                    f"(expected {info.image_size}, got {tuple(image.shape[1:3])}).")
        gen = generated[k, ..., :3]
        if tuple(gen.shape[:2]) != tuple(info.work_size):
            gen = torch.nn.functional.interpolate(gen.permute(2, 0, 1)[None], size=info.work_size, mode="bicubic",
                                                  align_corners=False)[0].permute(1, 2, 0).clamp(0, 1)
        out[info.image_index], full = paste_back(out[info.image_index], gen, crops.blend[k], info)
        masks[info.image_index] = torch.maximum(masks[info.image_index], full)
    return out, masks


def inpaint_faces(model, clip, vae, image: torch.Tensor, analyzer, identities: Sequence[Identity],
                  settings: InpaintSettings, parser=None, progress_factory=None
                  ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Redraw the selected faces of every image with their identities; returns (IMAGE, MASK, notes).

    ``progress_factory(total)`` (optional) makes a progress bar over the faces (the host's, in ComfyUI).
    """
    if image.ndim != 4 or image.shape[-1] < 3:
        raise InvalidInputError(f"Face Inpaint needs an IMAGE [B,H,W,3]; got {tuple(image.shape)}.")
    identities = [i for i in identities if i is not None]
    for identity in identities:
        check_identity_fits(identity, model)
    by_similarity = settings.assignment == "most_similar" and len(identities) > 1
    analysis = analyze_scene(analyzer, image, settings, embed=by_similarity)
    out = image.clone()
    masks = torch.zeros(image.shape[:3])
    notes: list[str] = []
    patched_models: dict[int, object] = {}
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(settings.negative))
    jobs = []
    for b in range(image.shape[0]):
        faces = analysis.faces[b]
        if not faces:
            notes.append(f"image {b}: no face found; passed through unchanged")
            continue
        pairs = assign_identities(faces, identities, settings.assignment)
        notes += assignment_notes(b, len(faces), len(identities), pairs)
        jobs += [(b, faces[i], j) for i, j in pairs]
    progress = progress_factory(len(jobs)) if progress_factory is not None and jobs else None
    for k, (b, face, j) in enumerate(jobs):
        identity = identities[j]
        if j not in patched_models:
            patched_models[j] = apply_lora_to_model(model, identity_lora_state(identity), settings.lora_strength)
        info, crop, m = face_crop(out[b].float(), face, settings, parser, b)
        positive = build_identity_conditioning(clip, identity, settings.text, feat_strength=settings.feat_strength)
        generated = sample_inpaint(patched_models[j], vae, positive, negative, crop[None, ..., :3], m.sample[None],
                                   settings.seed + k, settings.steps, settings.cfg, settings.sampler_name,
                                   settings.scheduler, settings.denoise)
        out[b], full = paste_back(out[b], generated[0], m.blend, info)
        masks[b] = torch.maximum(masks[b], full)
        if progress is not None:
            progress.update_absolute(k + 1)
    for note in notes:
        logger.warning("Face Inpaint (FaceA-Net): %s", note)
    return out, masks, notes
