"""What the FaceID-family apply nodes take from the reference photos: blended ID tokens and the default pose map.

Each reference image contributes its first selected face: the ArcFace vector, and for Plus / PlusV2 /
Face-MakeUp the CLIP-H hidden states of that face aligned to 224 px. Several references are blended before
the projector (:func:`mixing.mix_identities`) with the user's mix weights, typed as one comma-separated string.
"""
from __future__ import annotations

import torch

from ...errors import InvalidInputError
from ...face_analysis.analyze import warn_images_without_face
from .apply import IDTokens, arcface_from_faces, clip_hidden_states, encode_id_tokens
from .checkpoint import FaceIDCheckpoint
from .mixing import mix_identities

CLIP_CROP_SIZE = 224


def parse_mix_weights(text: str, count: int) -> list[float] | None:
    """``"0.7, 0.3"`` (commas or semicolons) -> one weight per identity; empty text -> None (equal weights)."""
    if not text or not text.strip():
        return None
    try:
        weights = [float(w) for w in text.replace(";", ",").split(",") if w.strip()]
    except ValueError as exc:
        raise InvalidInputError(f"mix_weights must be numbers separated by commas, got {text!r}.") from exc
    if len(weights) != count:
        raise InvalidInputError(f"mix_weights has {len(weights)} value(s) but {count} image(s) have a face.")
    return weights


def _first_face_clip_states(clip_vision, image: torch.Tensor, faces, with_face: list[int]
                            ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """CLIP hidden states ``[1, N, D]`` of each listed image's first face (aligned crop) and of the zero input."""
    from ...face_analysis.align import align_faces

    aligned = align_faces(image, faces, size=CLIP_CROP_SIZE)
    first_crop: dict[int, int] = {}
    for crop_index, (img, number) in enumerate(zip(aligned.image_indices, aligned.face_numbers, strict=True)):
        if number == 0 and img not in first_crop:
            first_crop[img] = crop_index
    crops = aligned.crops[[first_crop[i] for i in with_face]]
    with torch.no_grad():
        hidden = clip_hidden_states(clip_vision, crops)
        zero = clip_hidden_states(clip_vision, None)
    return list(hidden.split(1)), zero


def faceid_tokens(checkpoint: FaceIDCheckpoint, image: torch.Tensor, faces, clip_vision, s_scale: float,
                  mix_weights: str = "") -> IDTokens:
    """Cond/uncond ID tokens from the first face of each image of ``image`` (IMAGE ``[B,H,W,3]``), blended.

    ``faces`` is the FACES of the same batch; ``clip_vision`` is needed by the variants that read CLIP-H.
    """
    if len(faces) != image.shape[0]:
        raise InvalidInputError(f"FACES describes {len(faces)} image(s) but the IMAGE batch has {image.shape[0]}.")
    arcfaces = arcface_from_faces(faces, raw=checkpoint.raw_arcface)
    with_face = [i for i, f in enumerate(faces.first_face_per_image()) if f is not None]
    if not with_face:
        raise InvalidInputError("no face in any reference image.")
    warn_images_without_face(faces, "image")
    clip_rows: list[torch.Tensor | None] = [None] * len(with_face)
    zero = None
    if checkpoint.needs_clip_vision:
        if clip_vision is None:
            raise InvalidInputError(f"{checkpoint.name} needs the CLIP vision model (CLIP-ViT-H-14).")
        clip_rows, zero = _first_face_clip_states(clip_vision, image, faces, with_face)
    identities = [(arcfaces[i:i + 1], c) for i, c in zip(with_face, clip_rows, strict=True)]
    arcface, clip = mix_identities(identities, parse_mix_weights(mix_weights, len(identities)))
    return encode_id_tokens(checkpoint, arcface, clip, zero, s_scale=s_scale)


def reference_pose_map(faces) -> torch.Tensor:
    """The 5-keypoint map ``[1,H,W,3]`` of the first reference image with a face (drawn as Face-MakeUp draws it)."""
    from ...face_analysis.pose import kps_maps

    first = next((i for i, f in enumerate(faces.first_face_per_image()) if f is not None), 0)
    return kps_maps(faces).image[first:first + 1]
