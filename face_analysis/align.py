"""Aligned face crops with the ArcFace 5-point template, and paste-back.

The template and its scaling follow insightface's ``face_align.estimate_norm`` exactly (what
ArcFace, IP-Adapter FaceID-Plus and Face-MakeUp crop with): sizes that are multiples of 112 scale the
112 template; other sizes (256, 512) use the 128 convention (scale size/128, shifted right by
8·size/128). ``crop_scale`` > 1 zooms out around the crop centre (more hair and background).

The similarity transform (Umeyama, least squares over the five points) is computed here in numpy
(batched), and the warps are one batched ``kornia.geometry.transform.warp_affine`` call (bilinear,
zero padding, ``align_corners=True``: the same pixel convention as ``cv2.warpAffine``). The inverse
of every transform is kept, so edited crops (any square size) can be pasted back with
:func:`paste_back`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..deps import require
from ..errors import InvalidInputError
from .images import to_rgb_float
from .types import FaceAnalysis

ALIGN_SIZES = (112, 224, 256, 512)
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
MAX_WARP_SOURCE_BYTES = 256 << 20     # source pixels gathered per warp call


@dataclass
class AlignedFaces:
    """Crops ``[N,S,S,3]`` with the transforms that made them."""

    crops: torch.Tensor                   # [N, S, S, 3] float 0..1
    matrices: torch.Tensor                # [N, 2, 3] image pixel -> crop pixel
    inverse: torch.Tensor                 # [N, 2, 3] crop pixel -> image pixel
    image_indices: list[int]              # source image of each crop
    face_numbers: list[int]               # index of the face in FACES.faces[image]; -1 for pass-through
    size: int
    image_size: tuple[int, int]           # (H, W) of the source images
    passthrough: list[bool] = field(default_factory=list)   # whole image letterboxed (image had no face)

    def __len__(self) -> int:
        return len(self.image_indices)


def template(size: int, crop_scale: float = 1.0) -> np.ndarray:
    """The five target points for a ``size`` crop (insightface's convention), zoomed out by ``crop_scale``."""
    if size % 112 == 0:
        ratio, shift_x = size / 112.0, 0.0
    elif size % 128 == 0:
        ratio, shift_x = size / 128.0, 8.0 * size / 128.0
    else:
        raise InvalidInputError(f"crop size must be a multiple of 112 or 128 (e.g. {ALIGN_SIZES}), got {size}")
    points = ARCFACE_TEMPLATE_112.astype(np.float64) * ratio
    points[:, 0] += shift_x
    if crop_scale != 1.0:
        if crop_scale <= 0:
            raise InvalidInputError(f"crop_scale must be > 0, got {crop_scale}")
        centre = np.array([size / 2.0, size / 2.0])
        points = centre + (points - centre) / crop_scale
    return points


def similarity_transforms(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares similarity transforms (Umeyama 1991) ``[N,2,3]`` mapping ``source[N,K,2]`` onto ``target[K,2]``.

    Degenerate sources (all points equal) give NaN rows; callers replace them.
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    count = source.shape[1]
    src_mean = source.mean(1, keepdims=True)
    dst_mean = target.mean(0)
    src = source - src_mean
    dst = target - dst_mean
    covariance = np.einsum("kd,nke->nde", dst, src) / count            # [N,2,2] = dst^T src / K
    u, s, vt = np.linalg.svd(covariance)
    d = np.ones((source.shape[0], 2))
    d[np.linalg.det(covariance) < 0, 1] = -1.0
    rotation = u @ (d[:, :, None] * vt)
    variance = (src ** 2).sum(axis=(1, 2)) / count
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = (s * d).sum(1) / variance
    linear = rotation * scale[:, None, None]
    translation = dst_mean[None] - np.einsum("nde,ne->nd", linear, src_mean[:, 0])
    out = np.concatenate([linear, translation[:, :, None]], axis=2)
    out[~np.isfinite(out).all(axis=(1, 2)) | (variance < 1e-12)] = np.nan
    return out


def invert_affine(matrices: np.ndarray) -> np.ndarray:
    full = np.zeros((matrices.shape[0], 3, 3))
    full[:, :2] = matrices
    full[:, 2, 2] = 1.0
    return np.linalg.inv(full)[:, :2]


def box_transform(bbox: np.ndarray, size: int, crop_scale: float = 1.0) -> np.ndarray:
    """Axis-aligned transform putting a (square-ified) box into the crop: the fallback without keypoints."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    side = max(x2 - x1, y2 - y1, 1.0) * 1.6 * crop_scale   # the template's face fills ~60 % of the crop
    scale = size / side
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return np.array([[scale, 0, size / 2 - scale * cx], [0, scale, size / 2 - scale * cy]])


def letterbox_transform(height: int, width: int, size: int) -> np.ndarray:
    """The whole image, centred in the crop (pass-through of images without a face); pixel centres kept."""
    scale = size / max(height, width)
    return np.array([[scale, 0.0, (size - scale * width) / 2 + 0.5 * scale - 0.5],
                     [0.0, scale, (size - scale * height) / 2 + 0.5 * scale - 0.5]])


def align_faces(image, analysis: FaceAnalysis, size: int = 224, crop_scale: float = 1.0) -> AlignedFaces:
    """Crop every face of FACES from ``image`` (the batch FACES was computed on)."""
    if int(size) not in ALIGN_SIZES and not (size % 112 == 0 or size % 128 == 0):
        raise InvalidInputError(f"crop size must be one of {ALIGN_SIZES} (or a multiple of 112/128), got {size}")
    images, _notes = to_rgb_float(image)
    check_same_images(images, analysis)
    height, width = images.shape[1:3]
    target = template(size, crop_scale)
    keypoints, matrices, image_indices, numbers, passthrough = [], [], [], [], []
    for index, faces in enumerate(analysis.faces):
        if not faces:
            if analysis.on_no_face == "pass_through":
                matrices.append(letterbox_transform(height, width, size))
                keypoints.append(None)
                image_indices.append(index)
                numbers.append(-1)
                passthrough.append(True)
            continue
        for number, face in enumerate(faces):
            keypoints.append(np.asarray(face.kps, dtype=np.float64))
            matrices.append(None)
            image_indices.append(index)
            numbers.append(number)
            passthrough.append(False)
    with_kps = [i for i, k in enumerate(keypoints) if k is not None]
    if with_kps:
        solved = similarity_transforms(np.stack([keypoints[i] for i in with_kps]), target)
        for slot, matrix in zip(with_kps, solved, strict=True):
            if not np.isfinite(matrix).all():       # degenerate keypoints: frame the box instead
                face = analysis.faces[image_indices[slot]][numbers[slot]]
                matrix = box_transform(face.bbox, size, crop_scale)
            matrices[slot] = matrix
    if not matrices:
        empty = torch.zeros((0, 2, 3))
        return AlignedFaces(torch.zeros((0, size, size, 3)), empty, empty, [], [], size, (height, width), [])
    forward = np.stack(matrices)
    crops = warp_batch(images, image_indices, forward, (size, size))
    return AlignedFaces(crops, torch.from_numpy(forward).float(), torch.from_numpy(invert_affine(forward)).float(),
                        image_indices, numbers, size, (height, width), passthrough)


def check_same_images(images: torch.Tensor, analysis: FaceAnalysis) -> None:
    if images.shape[0] != len(analysis.faces):
        raise InvalidInputError(f"FACES describes {len(analysis.faces)} image(s) but the IMAGE batch has "
                                f"{images.shape[0]}; connect the image that was analysed.")
    size = (int(images.shape[1]), int(images.shape[2]))
    for index, analysed in enumerate(analysis.image_sizes):
        if tuple(analysed) != size:
            raise InvalidInputError(f"FACES was computed on a {analysed[1]}x{analysed[0]} image (index {index}) but "
                                    f"this IMAGE is {size[1]}x{size[0]}; connect the image that was analysed.")


def warp_batch(images: torch.Tensor, image_indices: list[int], matrices: np.ndarray,
               out_size: tuple[int, int]) -> torch.Tensor:
    """``images[B,H,W,C]`` warped by ``matrices[N,2,3]`` (source image per row) -> ``[N,h,w,C]``, batched."""
    kornia = require("kornia", "Face alignment")
    height, width, channels = images.shape[1:]
    per_face = height * width * channels * 4
    chunk = max(1, MAX_WARP_SOURCE_BYTES // max(per_face, 1))
    source = images.permute(0, 3, 1, 2)
    transforms = torch.from_numpy(np.asarray(matrices)).float()
    index = torch.tensor(image_indices, dtype=torch.long)
    out = []
    for start in range(0, len(image_indices), chunk):
        part = index[start:start + chunk]
        warped = kornia.geometry.transform.warp_affine(
            source.index_select(0, part), transforms[start:start + chunk], out_size,
            mode="bilinear", padding_mode="zeros", align_corners=True)
        out.append(warped)
    return torch.cat(out).permute(0, 2, 3, 1).clamp(0.0, 1.0).contiguous()


# ----------------------------------------------------------------------------------------- paste-back

def paste_back(image, aligned: AlignedFaces, crops, mask=None, feather: int = 8) -> torch.Tensor:
    """Warp (edited) crops back into the images they came from, blended by a feathered mask.

    ``crops`` ``[N,s,s,C]`` may have any square size (e.g. a face restorer's 512 output for 256 crops).
    ``mask`` is optional: in crop space (``[s,s]``, ``[1,s,s]`` or ``[N,s,s]``) or in image space
    (``[H,W]``, ``[1,H,W]`` or ``[B,H,W]``); without one the whole crop is pasted with a feathered edge.
    """
    kornia = require("kornia", "Face paste-back")
    images, _ = to_rgb_float(image, "image")
    crops, _ = to_rgb_float(crops, "crops")
    if images.shape[1:3] != aligned.image_size or images.shape[0] <= max(aligned.image_indices, default=-1):
        raise InvalidInputError(f"paste-back needs the images the faces were aligned from "
                                f"({aligned.image_size[1]}x{aligned.image_size[0]}, at least "
                                f"{max(aligned.image_indices, default=-1) + 1} image(s)); got {list(images.shape)}.")
    if crops.shape[0] != len(aligned):
        raise InvalidInputError(f"paste-back got {crops.shape[0]} crop(s) for {len(aligned)} aligned face(s); pass the "
                                f"crops in the order the Align node produced them.")
    if crops.shape[1] != crops.shape[2]:
        raise InvalidInputError(f"crops must be square; got {crops.shape[2]}x{crops.shape[1]}")
    crop_side = int(crops.shape[1])
    crop_mask, image_mask = _paste_masks(mask, len(aligned), crop_side, images.shape[0], aligned.image_size)
    if crop_mask is None:
        crop_mask = _edge_ramp(crop_side, feather).expand(len(aligned), -1, -1)
    elif feather > 0:
        sigma = max(feather / 2.0, 0.5)
        kernel = int(2 * round(3 * sigma) + 1)
        crop_mask = kornia.filters.gaussian_blur2d(crop_mask[:, None], (kernel, kernel), (sigma, sigma))[:, 0]
    # crop pixel (at the size given) -> aligned crop pixel -> image pixel
    factor = aligned.size / crop_side
    rescale = torch.tensor([[factor, 0, 0], [0, factor, 0], [0, 0, 1]], dtype=torch.float32)
    inverse = torch.cat([aligned.inverse, torch.tensor([[[0, 0, 1.0]]]).expand(len(aligned), -1, -1)], 1) @ rescale
    out = images.clone()
    height, width = aligned.image_size
    for slot, image_index in enumerate(aligned.image_indices):
        if aligned.passthrough and aligned.passthrough[slot]:
            continue
        matrix = inverse[slot:slot + 1, :2]
        stacked = torch.cat([crops[slot].permute(2, 0, 1), crop_mask[slot][None]], 0)[None]
        warped = kornia.geometry.transform.warp_affine(stacked, matrix, (height, width), mode="bilinear",
                                                       padding_mode="zeros", align_corners=True)[0]
        alpha = warped[3].clamp(0, 1)
        if image_mask is not None:
            alpha = alpha * image_mask[min(image_index, image_mask.shape[0] - 1)]
        alpha = alpha[..., None]
        out[image_index] = out[image_index] * (1 - alpha) + warped[:3].permute(1, 2, 0) * alpha
    return out.clamp(0, 1)


def _edge_ramp(side: int, feather: int) -> torch.Tensor:
    if feather <= 0:
        return torch.ones((1, side, side))
    coords = torch.arange(side, dtype=torch.float32)
    edge = torch.minimum(coords, side - 1 - coords)
    ramp = (edge / float(feather)).clamp(0, 1)
    return torch.minimum(ramp[None, :], ramp[:, None])[None]


def _paste_masks(mask, count: int, crop_side: int, batch: int, image_size: tuple[int, int]):
    """(crop-space mask [N,s,s] or None, image-space mask [B|1,H,W] or None); clear errors for other sizes."""
    if mask is None:
        return None, None
    if not isinstance(mask, torch.Tensor):
        raise InvalidInputError(f"mask must be a MASK tensor, got {type(mask).__name__}")
    mask = mask.detach().to("cpu", torch.float32)
    if mask.dim() == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3:
        raise InvalidInputError(f"mask must be [H,W] or [B,H,W]; got {list(mask.shape)}")
    mask = torch.nan_to_num(mask, nan=0.0).clamp(0, 1)
    spatial = tuple(mask.shape[1:])
    if spatial == (crop_side, crop_side):
        if mask.shape[0] not in (1, count):
            raise InvalidInputError(f"a crop-space mask needs 1 or {count} entries (one per crop); got {mask.shape[0]}")
        return mask.expand(count, -1, -1).contiguous(), None
    if spatial == tuple(image_size):
        if mask.shape[0] not in (1, batch):
            raise InvalidInputError(f"an image-space mask needs 1 or {batch} entries (one per image); got {mask.shape[0]}")
        return None, mask
    raise InvalidInputError(
        f"mask is {spatial[1]}x{spatial[0]}, but paste-back takes a mask the size of the crops "
        f"({crop_side}x{crop_side}) or of the image ({image_size[1]}x{image_size[0]}). Resize it first.")
