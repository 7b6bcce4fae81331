"""Photo -> M3Face segmentation condition: frame, parse with the pack's parser, recolour by class name.

The pack's FACE_PARSER (BiSeNet, or the landmark fallback) labels each framed crop in its own order;
the labels are carried into M3Face's class order by name (:mod:`.classes`) and painted with a
palette (:mod:`.palette`). With the landmark fallback the map has no hair, hat, glasses or clothes
(the fallback cannot see them): load BiSeNet weights for maps that look like M3CelebA's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import InvalidInputError
from ...face_analysis.parsing import FaceParser, parse_faces
from ...face_analysis.parsing.parser import rgb_batch
from ...face_analysis.types import FaceAnalysis
from .classes import M3FACE_ORDER, PACK_PARSER_ORDER, convert_labels
from .framing import crop_window, face_windows, window_analysis
from .palette import Palette, render_label_map

DEFAULT_SIZE = 512


@dataclass
class ConditionMaps:
    maps: torch.Tensor        # IMAGE [N,S,S,3]: the condition maps
    crops: torch.Tensor       # IMAGE [N,S,S,3]: the photo in the same frame
    labels: torch.Tensor | None  # [N,S,S] int64 M3Face-order ids (segmentation only)
    sources: list[int]        # image of the input batch behind each map
    notes: list[str]


def framed_crops(images, analysis: FaceAnalysis, size: int, framing: str, crop_scale: float,
                 face_index: int) -> tuple[torch.Tensor, FaceAnalysis, list[int], list[str]]:
    """The window crops of a batch ``[N,S,S,3]``, FACES in their coordinates, their source images, notes."""
    rgb, notes = rgb_batch(images)
    batch, height, width, _ = rgb.shape
    windows, window_notes = face_windows(analysis, batch, height, width, framing, crop_scale, face_index)
    crops = torch.stack([crop_window(rgb[w.image_index], w, size) for w in windows])
    return crops, window_analysis(analysis, windows, size), [w.image_index for w in windows], notes + window_notes


def parse_to_m3face(parser: FaceParser, images, analysis: FaceAnalysis, crop_scale: float = 2.2,
                    device=None) -> tuple[torch.Tensor, list[str]]:
    """``[B,H,W]`` int64 M3Face-order labels of the selected faces of every image (pack parser, names mapped)."""
    result = parse_faces(parser, images, analysis, crop_scale=crop_scale, device=device)
    return convert_labels(result.labels.long(), PACK_PARSER_ORDER, M3FACE_ORDER), result.notes


def labels_at_size(labels: torch.Tensor, height: int, width: int, source: str = "photo",
                   target: str = "mask image") -> torch.Tensor:
    """A ``[H,W]`` label map resized (nearest) to ``height`` x ``width``; another aspect ratio is refused."""
    if tuple(labels.shape) == (height, width):
        return labels
    source_h, source_w = labels.shape
    if abs(source_w / source_h - width / height) > 0.01 * (width / height):
        raise InvalidInputError(f"'{source}' is {source_w}x{source_h} but '{target}' is {width}x{height} (another "
                                f"aspect ratio): they cannot show the same picture. Give the {source} that "
                                f"'{target}' was made from, uncropped.")
    resized = F.interpolate(labels[None, None].float(), size=(height, width), mode="nearest-exact")
    return resized[0, 0].long()


def segmentation_maps(parser: FaceParser, images, analysis: FaceAnalysis, palette: Palette, size: int = DEFAULT_SIZE,
                      framing: str = "face", crop_scale: float = 2.2, face_index: int = -1,
                      device=None) -> ConditionMaps:
    """One ``size`` x ``size`` colour segmentation map per face (``framing="face"``) or per image."""
    crops, crop_faces, sources, notes = framed_crops(images, analysis, size, framing, crop_scale, face_index)
    labels, parse_notes = parse_to_m3face(parser, crops, crop_faces, crop_scale, device)
    maps = torch.from_numpy(render_label_map(labels, palette).astype(np.float32) / 255.0)
    return ConditionMaps(maps, crops, labels, sources, notes + parse_notes)
