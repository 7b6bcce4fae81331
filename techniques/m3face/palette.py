"""Segmentation palettes (class name -> RGB) as data, and label map <-> colour image conversion.

A palette is JSON (the format :func:`palette_to_json` writes and the shipped files in
``data/palettes/`` use)::

    {"format": "likeness.m3face.palette", "version": 1, "name": "...", "source": "...",
     "classes": {"background": [0, 0, 0], "skin": [204, 0, 0], ...}}

A bare ``{"skin": [204, 0, 0], ...}`` object is accepted too. Class names are M3Face's
(:mod:`.classes`; BiSeNet spellings such as ``eyeglasses`` are folded onto them). Missing classes are
filled from a base palette when one is given (and named in the notes), otherwise refused.

The official M3Face palette (``utils/plot_mask.py``) could not be read; the shipped palettes are the
two most likely candidates, and :mod:`.calibrate` learns the real one from an official mask.

:func:`render_label_map` and its inverse :func:`labels_from_colours` are the one place that turns label
maps into condition images and back (the condition editing and Imagic examples reuse them).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import InvalidInputError
from .classes import DATA_DIR, M3FACE_ORDER, canonical_name, label_order, m3face_classes

PALETTE_FORMAT = "likeness.m3face.palette"
DEFAULT_PALETTE = "celebamask_hq"
UNMATCHED = -1   # labels_from_colours: a pixel farther than max_distance from every palette colour


@dataclass
class Palette:
    """RGB colour of every M3Face class (all 19 present)."""

    name: str
    colours: dict[str, tuple[int, int, int]]
    source: str = ""

    def array(self, order: str = M3FACE_ORDER) -> np.ndarray:
        """uint8 ``[classes, 3]``: row ``i`` is the colour of label ``i`` of ``order``."""
        return np.array([self.colours[canonical_name(n)] for n in label_order(order).labels], dtype=np.uint8)

    def with_colours(self, colours: dict[str, tuple[int, int, int]], name: str, source: str = "") -> Palette:
        return Palette(name, {**self.colours, **colours}, source)


def _colour(value, what: str) -> tuple[int, int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)):
        raise InvalidInputError(f"{what} must be three integers 0..255 (R, G, B), got {value!r}.")
    return tuple(int(v) for v in value)


def palette_from_dict(data: dict, what: str = "palette", base: Palette | None = None) -> tuple[Palette, list[str]]:
    """A :class:`Palette` from parsed JSON (full format or a bare class -> RGB mapping), and notes."""
    if not isinstance(data, dict):
        raise InvalidInputError(f"{what} must be a JSON object of class name -> [R, G, B], got {type(data).__name__}.")
    if "classes" in data:
        if data.get("format", PALETTE_FORMAT) != PALETTE_FORMAT:
            raise InvalidInputError(f"{what} has format {data.get('format')!r}, expected '{PALETTE_FORMAT}'.")
        classes = data["classes"]
        if not isinstance(classes, dict):
            raise InvalidInputError(f"{what}: 'classes' must be an object of class name -> [R, G, B].")
    else:
        classes = data
    colours: dict[str, tuple[int, int, int]] = {}
    for key, value in classes.items():
        name = canonical_name(key, f"in {what}")
        if name in colours:
            raise InvalidInputError(f"{what} gives class '{name}' twice ('{key}' is another spelling of it).")
        colours[name] = _colour(value, f"{what}: the colour of '{key}'")
    missing = [n for n in m3face_classes() if n not in colours]
    notes = []
    if missing and base is None:
        raise InvalidInputError(f"{what} lacks the classes {', '.join(missing)}; give a colour for each of the "
                                f"19 classes ({', '.join(m3face_classes())}).")
    if missing:
        notes.append(f"{what} has no colour for {', '.join(missing)}: taken from the '{base.name}' palette.")
        colours = {**{n: base.colours[n] for n in missing}, **colours}
    ordered = {n: colours[n] for n in m3face_classes()}
    return Palette(str(data.get("name", "custom")), ordered, str(data.get("source", ""))), notes


def parse_palette_json(text: str, what: str = "palette_json", base: Palette | None = None) -> tuple[Palette, list[str]]:
    """A palette from JSON text; syntax errors raise InvalidInputError naming ``what`` and the position."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}). "
                                "Paste the palette_json output of 'M3Face Palette from Mask', or leave it empty to "
                                "use the chosen palette.") from exc
    return palette_from_dict(data, what, base)


def palette_to_json(palette: Palette) -> str:
    """The palette as JSON, one class per line (readable, diffable)."""
    head = {"format": PALETTE_FORMAT, "version": 1, "name": palette.name, "source": palette.source}
    lines = [f"  {json.dumps(n)}: [{', '.join(str(v) for v in palette.colours[n])}]" for n in m3face_classes()]
    opening = json.dumps(head, ensure_ascii=False)[:-1]
    return opening + ',\n "classes": {\n' + ",\n".join(lines) + "\n }\n}\n"


@functools.lru_cache(maxsize=1)
def _shipped() -> dict[str, Palette]:
    folder = os.path.join(DATA_DIR, "palettes")
    palettes = {}
    for file_name in sorted(os.listdir(folder)):
        if file_name.endswith(".json"):
            with open(os.path.join(folder, file_name), encoding="utf-8") as handle:
                palette, _ = palette_from_dict(json.load(handle), file_name)
            palettes[os.path.splitext(file_name)[0]] = palette
    return palettes


def shipped_palette_names() -> list[str]:
    names = list(_shipped())
    return [DEFAULT_PALETTE] + [n for n in names if n != DEFAULT_PALETTE]


def shipped_palette(name: str = DEFAULT_PALETTE) -> Palette:
    palettes = _shipped()
    if name not in palettes:
        raise InvalidInputError(f"unknown palette '{name}'; the pack ships {', '.join(palettes)}.")
    return palettes[name]


# ----------------------------------------------------------------------------- label map <-> colours

def as_uint8_rgb(image, what: str = "image") -> np.ndarray:
    """uint8 ``[..., H, W, 3]`` from an IMAGE tensor / float array in 0..1 or a uint8 array (rounded, not floored)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu", torch.float32).numpy()
    array = np.asarray(image)
    if array.ndim < 3 or array.shape[-1] != 3:
        raise InvalidInputError(f"{what} must be RGB with 3 channels last ([..., H, W, 3]), got shape {list(array.shape)}.")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
        raise InvalidInputError(f"{what} must be uint8 or finite floats in 0..1, got {array.dtype}.")
    return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)


def _label_ids(labels, order: str) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    names = label_order(order).labels
    if array.dtype.kind in "UO":   # class names
        lookup = {canonical_name(n): i for i, n in enumerate(names)}
        unique, inverse = np.unique(array, return_inverse=True)
        ids = np.array([lookup[canonical_name(n, "in the label map")] for n in unique.tolist()], dtype=np.int64)
        return ids[inverse].reshape(array.shape)
    if array.dtype.kind not in "iu":
        raise InvalidInputError(f"a label map must hold integer ids or class names, got dtype {array.dtype}.")
    if array.size and (array.min() < 0 or array.max() >= len(names)):
        raise InvalidInputError(f"a label map in order '{order}' holds ids outside 0..{len(names) - 1}.")
    return array.astype(np.int64)


def render_label_map(labels, palette: Palette, order: str = M3FACE_ORDER) -> np.ndarray:
    """uint8 ``[..., H, W, 3]``: each pixel in its class's colour.

    ``labels``: ids in ``order`` (numpy or tensor, any leading shape) or an array of class names.
    """
    return palette.array(order)[_label_ids(labels, order)]


def labels_from_colours(image, palette: Palette, order: str = M3FACE_ORDER,
                        max_distance: float | None = None) -> np.ndarray:
    """int64 ``[..., H, W]`` label ids (in ``order``) of the nearest palette colour of every pixel.

    Pixels farther than ``max_distance`` (Euclidean, 0..255 units) from every palette colour get
    :data:`UNMATCHED`. Classes sharing a colour resolve to the first of them in ``order``.
    """
    rgb = as_uint8_rgb(image).astype(np.int32)
    colours = palette.array(order).astype(np.int32)
    flat = rgb.reshape(-1, 3)
    best = np.zeros(len(flat), dtype=np.int64)
    best_distance = np.full(len(flat), np.iinfo(np.int64).max, dtype=np.int64)
    for index in range(len(colours) - 1, -1, -1):  # backwards: on a tie the earlier class wins
        distance = ((flat - colours[index]) ** 2).sum(axis=1).astype(np.int64)
        closer = distance <= best_distance
        best[closer], best_distance[closer] = index, distance[closer]
    if max_distance is not None:
        best[best_distance > float(max_distance) ** 2] = UNMATCHED
    return best.reshape(rgb.shape[:-1])
