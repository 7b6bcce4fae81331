"""The contact sheet: every image as a tile with its scores written under it (an IMAGE for previews and saving).

Tiles are letterboxed to ``tile`` x ``tile`` on dark grey; under each, ``name value`` pairs are packed into as
few lines as the tile's width allows. A copy-paste flag is drawn in red.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

BACKGROUND = 32
TEXT_COLOUR = (235, 235, 235)
FLAG_COLOUR = (240, 70, 60)
FONT_SCALE_PER_PX = 0.42 / 256
GAP = 6


def _letterbox(image: torch.Tensor, tile: int) -> np.ndarray:
    height, width = image.shape[:2]
    scale = tile / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    resized = F.interpolate(image[None, ..., :3].permute(0, 3, 1, 2).float(), size=size, mode="bilinear",
                            align_corners=False, antialias=True)[0].permute(1, 2, 0)
    canvas = np.full((tile, tile, 3), BACKGROUND, np.uint8)
    top, left = (tile - size[0]) // 2, (tile - size[1]) // 2
    canvas[top:top + size[0], left:left + size[1]] = (resized.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    return canvas


def _cells(row: dict, columns: list[str]) -> list[tuple[str, tuple[int, int, int]]]:
    from .report import format_cell

    cells = [(f"#{row['image']}", TEXT_COLOUR)]
    for column in columns:
        if column == "copy_flag" and row.get(column) == 1.0:
            cells.append(("COPY-PASTE", FLAG_COLOUR))
        else:
            cells.append((f"{column} {format_cell(row.get(column))}", TEXT_COLOUR))
    return cells


def _pack_lines(cells, width: int, scale: float, thickness: int) -> list[list[tuple[str, tuple]]]:
    import cv2

    lines: list[list] = [[]]
    used = 0
    for text, colour in cells:
        needed = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0] + GAP
        if lines[-1] and used + needed > width:
            lines.append([])
            used = 0
        lines[-1].append((text, colour))
        used += needed
    return lines


def _caption(row: dict, columns: list[str], tile: int) -> np.ndarray:
    import cv2

    scale = max(0.3, tile * FONT_SCALE_PER_PX)
    thickness = 1
    line_height = int(cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][1] * 1.9) + 2
    lines = _pack_lines(_cells(row, columns), tile - 2 * GAP, scale, thickness)
    band = np.full((line_height * len(lines) + GAP, tile, 3), BACKGROUND, np.uint8)
    for number, line in enumerate(lines):
        x, y = GAP, line_height * (number + 1)
        for text, colour in line:
            cv2.putText(band, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)
            x += cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0] + GAP
    return band


def draw_sheet(images: torch.Tensor, rows: list[dict], columns: list[str], tile: int = 256,
               per_row: int = 4) -> torch.Tensor:
    """IMAGE ``[1,H,W,3]``: ``images[i]`` over the scores of ``rows[i]``, ``per_row`` tiles a line."""
    tile, per_row = max(64, int(tile)), max(1, int(per_row))
    tiles = [np.concatenate([_letterbox(image, tile), _caption(row, columns, tile)])
             for image, row in zip(images, rows, strict=True)]
    height = max(t.shape[0] for t in tiles)
    count = min(per_row, len(tiles))
    lines = math.ceil(len(tiles) / count)
    sheet = np.full((lines * (height + GAP) + GAP, count * (tile + GAP) + GAP, 3), BACKGROUND // 2, np.uint8)
    for index, tile_image in enumerate(tiles):
        top, left = GAP + (index // count) * (height + GAP), GAP + (index % count) * (tile + GAP)
        sheet[top:top + tile_image.shape[0], left:left + tile] = tile_image
    return torch.from_numpy(sheet).float().div(255.0)[None]
