"""Square windows of a photo that become M3Face's 512x512 condition canvases, and the faces in them.

M3Face's conditions (M3CelebA masks and landmark drawings) are square portraits, one face each. A
photo is brought to that frame in one of two ways:

- ``face``: one window per selected face, a square of ``crop_scale`` times the face box's long side
  centred on the box (2.2 frames head, hair and neck like the CelebA-HQ portraits; black outside the
  photo);
- ``image``: one window per image, the whole image letterboxed into a square (black bars), every
  selected face in it; for photos that already are portraits.

The window's crop of the photo is returned too, so the photo and its condition map line up pixel for
pixel (what Imagic editing needs).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import InvalidInputError, NoFaceError
from ...face_analysis.parsing.parser import faces_for_batch
from ...face_analysis.types import Face, FaceAnalysis

FRAMINGS = ("face", "image")
NO_FACE_ADVICE = ("Check Analyze Faces' preview: use a photo with a visible face, or a more sensitive analyzer "
                  "(lower det_threshold).")


@dataclass
class Window:
    image_index: int
    x0: float
    y0: float
    side: float
    faces: list[Face]        # in the source image's pixels


def face_windows(analysis: FaceAnalysis, batch: int, height: int, width: int, framing: str = "face",
                 crop_scale: float = 2.2, face_index: int = -1) -> tuple[list[Window], list[str]]:
    """The windows of an image batch (see the module doc) and notes (images without a face)."""
    if framing not in FRAMINGS:
        raise InvalidInputError(f"unknown framing '{framing}'; use one of {', '.join(FRAMINGS)}.")
    if not 1.0 <= float(crop_scale) <= 6.0:
        raise InvalidInputError(f"crop_scale must be between 1 and 6 face boxes, got {crop_scale}.")
    selected, notes = faces_for_batch(analysis, batch, height, width, face_index)
    windows = []
    for image_index, faces in enumerate(selected):
        if not faces and framing == "face":
            notes.append(f"image {image_index}: no face, left out.")
        if framing == "image":
            side = float(max(height, width))
            windows.append(Window(image_index, (width - side) / 2.0, (height - side) / 2.0, side, faces))
            continue
        for face in faces:
            x1, y1, x2, y2 = (float(v) for v in face.bbox)
            side = max(x2 - x1, y2 - y1, 1.0) * float(crop_scale)
            windows.append(Window(image_index, (x1 + x2 - side) / 2.0, (y1 + y2 - side) / 2.0, side, [face]))
    if not any(w.faces for w in windows):
        raise NoFaceError("no face was found in 'image', so there is nothing to draw a condition map of.",
                          NO_FACE_ADVICE)
    return windows, notes


def crop_window(rgb: torch.Tensor, window: Window, size: int) -> torch.Tensor:
    """``[size,size,3]`` float crop of one ``[H,W,3]`` image (antialiased bilinear; black outside the image)."""
    height, width = rgb.shape[:2]
    scale = size / window.side
    vx0, vy0 = max(0, int(np.floor(window.x0))), max(0, int(np.floor(window.y0)))
    vx1 = min(width, int(np.ceil(window.x0 + window.side)))
    vy1 = min(height, int(np.ceil(window.y0 + window.side)))
    canvas = torch.zeros(size, size, 3, dtype=torch.float32)
    if vx1 - vx0 < 1 or vy1 - vy0 < 1:
        return canvas
    # Sample the pixel centres of the output grid inside the source (exact geometry, no rounding of the window).
    xs = (torch.arange(size, dtype=torch.float64) + 0.5) / scale + window.x0
    ys = (torch.arange(size, dtype=torch.float64) + 0.5) / scale + window.y0
    source = rgb.permute(2, 0, 1).unsqueeze(0).float()
    if scale < 1.0:   # shrink first so bilinear sampling does not alias
        shrunk = (max(1, int(round(height * scale))), max(1, int(round(width * scale))))
        source = F.interpolate(source, size=shrunk, mode="bilinear", antialias=True, align_corners=False)
    grid_x = (xs / width * 2.0 - 1.0).float()
    grid_y = (ys / height * 2.0 - 1.0).float()
    grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], dim=-1).unsqueeze(0)
    sampled = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    inside = ((xs >= 0) & (xs < width)).view(1, -1) & ((ys >= 0) & (ys < height)).view(-1, 1)
    return (sampled.permute(1, 2, 0) * inside.unsqueeze(-1)).clamp(0.0, 1.0)


def faces_in_window(window: Window, size: int) -> list[Face]:
    """The window's faces in the coordinates of its ``size`` x ``size`` crop."""
    scale = size / window.side
    origin = np.array([window.x0, window.y0], dtype=np.float64)

    def move(points):
        if points is None:
            return None
        array = np.asarray(points, dtype=np.float64)
        return ((array[..., :2] - origin) * scale).astype(np.float32)

    moved = []
    for face in window.faces:
        box = np.asarray(face.bbox, np.float64).reshape(2, 2)
        moved.append(replace(face, bbox=move(box).reshape(4), kps=move(face.kps), landmarks=move(face.landmarks),
                             landmark_sets={k: move(v) for k, v in face.landmark_sets.items()}))
    return moved


def window_analysis(analysis: FaceAnalysis, windows: list[Window], size: int) -> FaceAnalysis:
    """FACES for the batch of window crops (one entry per window)."""
    return FaceAnalysis(faces=[faces_in_window(w, size) for w in windows], image_sizes=[(size, size)] * len(windows),
                        backend=analysis.backend, model_id=analysis.model_id, embedding_dim=analysis.embedding_dim)
