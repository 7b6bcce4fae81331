"""The PuLID-FLUX ID embedding of reference images, as the official ``PuLIDPipeline.get_id_embedding`` makes it:

1. the pack's face analyzer (antelopev2) picks the face (largest by default) and gives its raw 512-d embedding;
2. the face is aligned to a 512 crop (the pack's ArcFace-template warp, as the most used ComfyUI port does; the
   official code uses facexlib's own detector and template) and parsed (the pack's FACE_PARSER, BiSeNet);
   background, neck, clothes, ears and earrings (labels 0, 16, 18, 7, 8, 9, 14, 15) turn white, the rest grey;
3. EVA02-CLIP-L-14-336 reads it (336 px bicubic, OpenAI mean/std): the projected CLS, L2-normalised, joins the
   ArcFace vector (1280-d); the IDFormer turns that plus EVA's five hidden states into the ID tokens;
4. uncond tokens = the IDFormer on all-zero inputs (the official ``cal_uncond``).

Several reference images: the ID tokens of every face are averaged (what the ComfyUI port does; the official
pipeline takes one image).
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import IncompatibleEmbedsError, InvalidInputError, NoFaceError
from ...face_analysis.align import align_faces, template
from ...face_analysis.analyze import analyze
from ...face_analysis.parsing import FaceParser, parse_faces
from ...face_analysis.types import Face, FaceAnalysis
from .checkpoint import PulidFluxModel
from .embeds import PulidFluxEmbeds
from .eva_clip import EvaClipVision

logger = logging.getLogger("likeness")

ALIGN_SIZE = 512
ARCFACE_DIM = 512
WHITE_LABELS = (0, 16, 18, 7, 8, 9, 14, 15)   # the official bg_label list (pipeline_flux.get_id_embedding)
NO_FACE_ADVICE = ("PuLID-FLUX needs a visible face in every reference image: crop closer to the face, use a larger "
                  "image, or load the analyzer with a lower det_threshold.")


def _gray(rgb: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` -> the official ``to_gray`` (BT.601 luma in all three channels)."""
    luma = 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]
    return luma.expand(-1, 3, -1, -1)


def crops_as_faces(count: int, size: int, analysis: FaceAnalysis) -> FaceAnalysis:
    """The aligned crops as a FACES value: one face per crop filling it, with the template's keypoints (the parser
    then reads each whole crop, as the official code parses the 512 aligned face)."""
    kps = template(size).astype(np.float32)
    box = np.array([0, 0, size, size], dtype=np.float32)
    faces = [[Face(bbox=box, score=1.0, kps=kps, image_index=i)] for i in range(count)]
    return FaceAnalysis(faces=faces, image_sizes=[(size, size)] * count, backend=analysis.backend,
                        model_id=analysis.model_id)


def face_feature_images(images: torch.Tensor, analysis: FaceAnalysis, parser: FaceParser,
                        device: torch.device | None = None) -> torch.Tensor:
    """``[N, 3, 512, 512]`` in 0..1: each selected face aligned, grey features on white (official preprocessing)."""
    aligned = align_faces(images, analysis, size=ALIGN_SIZE)
    keep = [i for i, through in enumerate(aligned.passthrough) if not through]
    crops = aligned.crops[keep]
    labels = parse_faces(parser, crops, crops_as_faces(len(keep), ALIGN_SIZE, analysis), crop_scale=1.0,
                         device=device).labels
    rgb = crops.permute(0, 3, 1, 2).float()
    white = torch.isin(labels.long(), torch.tensor(WHITE_LABELS)).unsqueeze(1)
    return torch.where(white, torch.ones_like(rgb), _gray(rgb))


def eva_inputs(face_images: torch.Tensor, eva: EvaClipVision) -> torch.Tensor:
    size = eva.image_size
    # the official resize of a tensor (pipeline_flux.get_id_embedding) antialiases when it shrinks
    pixels = F.interpolate(face_images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(eva.mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(eva.std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def id_tokens(pulid: PulidFluxModel, eva: EvaClipVision, arcface: torch.Tensor, face_images: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ID tokens ``[N, T, C]``, uncond tokens ``[1, T, C]``) for ``N`` faces (``arcface`` raw ``[N, 512]``)."""
    encoder = pulid.encoder
    parameter = next(encoder.parameters())
    device, dtype = parameter.device, parameter.dtype
    eva_parameter = next(eva.model.parameters())
    with torch.inference_mode():
        pooled, hidden = eva(eva_inputs(face_images, eva).to(eva_parameter.device, eva_parameter.dtype))
        pooled = F.normalize(pooled.float(), dim=-1)
        id_vector = torch.cat((arcface.float().to(pooled.device), pooled), dim=-1).to(device, dtype)
        hidden = [h.to(device, dtype) for h in hidden]
        tokens = encoder(id_vector, hidden)
        uncond = encoder(torch.zeros_like(id_vector[:1]), [torch.zeros_like(h[:1]) for h in hidden])
    return tokens.float(), uncond.float()


@contextlib.contextmanager
def on_device(device: torch.device, *modules: torch.nn.Module):
    """Run ``modules`` on ``device`` for the block, then put each back where it was (the offload device)."""
    before = [next(m.parameters()).device for m in modules]
    try:
        for module in modules:
            module.to(device)
        yield
    finally:
        for module, where in zip(modules, before, strict=True):
            module.to(where)


def _check_analyzer(analysis: FaceAnalysis) -> None:
    if analysis.embedding_dim not in (None, ARCFACE_DIM):
        raise IncompatibleEmbedsError(
            f"PuLID-FLUX was trained on antelopev2's 512-d ArcFace embedding; the analyzer makes "
            f"{analysis.embedding_dim}-d embeddings ({analysis.model_id}). Load the insightface analyzer with "
            "antelopev2.")
    if "antelopev2" not in str(analysis.model_id).lower():
        logger.warning("PuLID-FLUX: the analyzer is %s; PuLID-FLUX was trained on antelopev2's embedding",
                       analysis.model_id)


def embed_faces(images: torch.Tensor, analyzer, parser: FaceParser, eva: EvaClipVision, pulid: PulidFluxModel,
                selection: str = "largest", face_index: int = 0, device: torch.device | None = None
                ) -> PulidFluxEmbeds:
    """PULID_FLUX_EMBEDS of the person in ``images`` (IMAGE ``[B, H, W, 3]``; one face per image, averaged)."""
    if not isinstance(pulid, PulidFluxModel):
        raise InvalidInputError("'pulid_flux' must come from a PuLID-FLUX Loader node")
    if not isinstance(eva, EvaClipVision):
        raise InvalidInputError("'eva_clip' must come from an EVA-CLIP Loader (PuLID-FLUX) node")
    try:
        result = analyze(analyzer, images, selection=selection, face_index=face_index, on_no_face="error",
                         embed=True, no_face_advice=NO_FACE_ADVICE)
    except NoFaceError as exc:
        raise exc.with_advice(NO_FACE_ADVICE) from exc
    analysis = result.faces
    _check_analyzer(analysis)
    faces = [face for per_image in analysis.faces for face in per_image]
    if any(face.embedding is None for face in faces):
        raise InvalidInputError("the analyzer gave no identity embedding; load it with a recognition model "
                                "(insightface antelopev2)")
    arcface = torch.from_numpy(np.stack([np.asarray(face.embedding, dtype=np.float32) for face in faces]))
    if device is None:
        from ...host.devices import torch_device
        device = torch_device()
    with on_device(device, eva.model, pulid.encoder):
        face_images = face_feature_images(images, analysis, parser, device)
        tokens, uncond = id_tokens(pulid, eva, arcface, face_images.to(device))
    sources = [f"image {face.image_index}" for face in faces]
    if len(faces) > 1:
        sources.append(f"mean of {len(faces)} faces")
    return PulidFluxEmbeds(tokens.mean(dim=0, keepdim=True), uncond, pulid.source, sources)
