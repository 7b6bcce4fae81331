"""Photo -> M3Face landmark condition: 68 iBUG points drawn in a documented, configurable style.

The landmark drawing of M3Face (``utils/plot_landmark.py``) could not be read, so the drawing is
data: a style JSON (the shipped ``data/landmark_styles/default.json`` is the pack's own landmark map
look at a fixed thickness)::

    {"format": "likeness.m3face.landmark_style", "version": 1, "name": "...", "source": "...",
     "canvas": [0, 0, 0],            # background colour
     "draw": "lines",                # lines | points | lines+points (default for every group)
     "thickness": 2,                 # line width in pixels of the 512 canvas (scaled with the canvas size)
     "point_radius": 2,              # dot radius, same scaling
     "antialias": false,             # cv2 LINE_AA instead of LINE_8
     "groups": [{"name": "jaw", "points": [0, 1, ..., 16], "closed": false, "colour": [255, 255, 255]}, ...]}

A group may override ``draw``, ``thickness`` and ``point_radius``. Points are 68-point iBUG indices:
dlib's landmarks as they are, insightface's 106 through the documented 106 -> 68 index map
(:data:`likeness.face_analysis.pose.LANDMARKS_106_TO_68`).

:func:`calibrate_style` learns the canvas colour, each group's colour and the line width from a sample
drawing (an M3CelebA ``landmark_image`` or the repo's ``data/landmarks/*.jpg``) and the landmarks of the
photo it was drawn from.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace

import numpy as np
import torch

from ...deps import require
from ...errors import InvalidInputError
from ...face_analysis.pose import to_68_points
from ...face_analysis.types import FaceAnalysis
from .calibrate import MIN_CLASS_PIXELS, dominant_colours, mode_colour, snap_colour, vote_colour
from .classes import DATA_DIR
from .palette import _colour, as_uint8_rgb
from .segmentation import DEFAULT_SIZE, ConditionMaps, framed_crops

STYLE_FORMAT = "likeness.m3face.landmark_style"
DEFAULT_STYLE = "default"
DRAW_MODES = ("lines", "points", "lines+points")
REFERENCE_SIZE = 512       # thickness and radius are given for a 512 canvas


@dataclass(frozen=True)
class LandmarkGroup:
    name: str
    points: tuple[int, ...]
    closed: bool
    colour: tuple[int, int, int]
    draw: str | None = None
    thickness: int | None = None
    point_radius: int | None = None


@dataclass(frozen=True)
class LandmarkStyle:
    name: str
    groups: tuple[LandmarkGroup, ...]
    canvas: tuple[int, int, int] = (0, 0, 0)
    draw: str = "lines"
    thickness: int = 2
    point_radius: int = 2
    antialias: bool = False
    source: str = ""


def _choice(value, allowed, what: str):
    if value not in allowed:
        raise InvalidInputError(f"{what} must be one of {', '.join(map(str, allowed))}, got {value!r}.")
    return value


def _size(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 64:
        raise InvalidInputError(f"{what} must be a whole number of pixels 1..64, got {value!r}.")
    return value


def _group(spec, index: int, what: str) -> LandmarkGroup:
    where = f"{what}: group {index}"
    if not isinstance(spec, dict) or "points" not in spec or "colour" not in spec:
        raise InvalidInputError(f"{where} must be an object with 'points' (68-point indices) and 'colour' [R, G, B].")
    points = spec["points"]
    if (not isinstance(points, list) or not points
            or not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < 68 for p in points)):
        raise InvalidInputError(f"{where}: 'points' must be a non-empty list of 68-point indices 0..67.")
    optional = {key: _size(spec[key], f"{where}: {key}") for key in ("thickness", "point_radius") if key in spec}
    return LandmarkGroup(str(spec.get("name", f"group{index}")), tuple(points), bool(spec.get("closed", False)),
                         _colour(spec["colour"], f"{where}: colour"),
                         _choice(spec["draw"], DRAW_MODES, f"{where}: draw") if "draw" in spec else None, **optional)


def style_from_dict(data, what: str = "style_json") -> LandmarkStyle:
    if not isinstance(data, dict) or not isinstance(data.get("groups"), list) or not data["groups"]:
        raise InvalidInputError(f"{what} must be a JSON object with a non-empty 'groups' list (see the README's "
                                "landmark style format).")
    if data.get("format", STYLE_FORMAT) != STYLE_FORMAT:
        raise InvalidInputError(f"{what} has format {data.get('format')!r}, expected '{STYLE_FORMAT}'.")
    groups = tuple(_group(spec, i, what) for i, spec in enumerate(data["groups"]))
    return LandmarkStyle(
        name=str(data.get("name", "custom")), groups=groups, source=str(data.get("source", "")),
        canvas=_colour(data.get("canvas", [0, 0, 0]), f"{what}: canvas"),
        draw=_choice(data.get("draw", "lines"), DRAW_MODES, f"{what}: draw"),
        thickness=_size(data.get("thickness", 2), f"{what}: thickness"),
        point_radius=_size(data.get("point_radius", 2), f"{what}: point_radius"),
        antialias=bool(data.get("antialias", False)))


def parse_style_json(text: str, what: str = "style_json") -> LandmarkStyle:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}). "
                                "Paste the style_json output of 'M3Face Landmark Style from Sample', or leave it "
                                "empty to use the chosen style.") from exc
    return style_from_dict(data, what)


def style_to_json(style: LandmarkStyle) -> str:
    head = {"format": STYLE_FORMAT, "version": 1, "name": style.name, "source": style.source,
            "canvas": list(style.canvas), "draw": style.draw, "thickness": style.thickness,
            "point_radius": style.point_radius, "antialias": style.antialias}
    groups = []
    for group in style.groups:
        spec = {"name": group.name, "points": list(group.points), "closed": group.closed, "colour": list(group.colour)}
        spec.update({k: getattr(group, k) for k in ("draw", "thickness", "point_radius") if getattr(group, k)})
        groups.append("  " + json.dumps(spec))
    return json.dumps(head, ensure_ascii=False)[:-1] + ',\n "groups": [\n' + ",\n".join(groups) + "\n ]\n}\n"


@functools.lru_cache(maxsize=1)
def _shipped() -> dict[str, LandmarkStyle]:
    folder = os.path.join(DATA_DIR, "landmark_styles")
    styles = {}
    for file_name in sorted(f for f in os.listdir(folder) if f.endswith(".json")):
        with open(os.path.join(folder, file_name), encoding="utf-8") as handle:
            styles[os.path.splitext(file_name)[0]] = style_from_dict(json.load(handle), file_name)
    return styles


def shipped_style_names() -> list[str]:
    return [DEFAULT_STYLE] + [n for n in _shipped() if n != DEFAULT_STYLE]


def shipped_style(name: str = DEFAULT_STYLE) -> LandmarkStyle:
    if name not in _shipped():
        raise InvalidInputError(f"unknown landmark style '{name}'; the pack ships {', '.join(_shipped())}.")
    return _shipped()[name]


# ------------------------------------------------------------------------------------------ drawing

def _scaled(pixels: int, height: int, width: int) -> int:
    return max(1, int(round(pixels * min(height, width) / REFERENCE_SIZE)))


def draw_landmarks(point_sets, height: int, width: int, style: LandmarkStyle) -> np.ndarray:
    """uint8 ``[H,W,3]``: every face's 68 points (``[68,2]`` each; 106 are converted) drawn in ``style``."""
    cv2 = require("cv2", "The M3Face landmark map")
    canvas = np.empty((int(height), int(width), 3), dtype=np.uint8)
    canvas[:] = style.canvas
    line_type = cv2.LINE_AA if style.antialias else cv2.LINE_8
    shift = 4   # draw at 1/16 pixel so the lines do not snap to whole pixels
    for points in point_sets:
        ibug = np.rint(to_68_points(points) * (1 << shift)).astype(np.int32)
        for group in style.groups:
            mode = group.draw or style.draw
            colour = tuple(int(v) for v in group.colour)
            path = ibug[list(group.points)]
            if "lines" in mode and len(path) > 1:
                thickness = _scaled(group.thickness or style.thickness, height, width)
                cv2.polylines(canvas, [path], group.closed, colour, thickness, line_type, shift)
            if "points" in mode:
                radius = _scaled(group.point_radius or style.point_radius, height, width) << shift
                for x, y in path:
                    cv2.circle(canvas, (int(x), int(y)), int(radius), colour, -1, line_type, shift)
    return canvas


def _landmark_sets(analysis: FaceAnalysis) -> list[list[np.ndarray]]:
    sets = []
    for image_index, faces in enumerate(analysis.faces):
        missing = [i for i, f in enumerate(faces) if f.landmarks is None or len(f.landmarks) not in (68, 106)]
        if missing:
            raise InvalidInputError(
                f"image {image_index}: face {missing[0]} has no 68/106-point landmarks. Load the analyzer with a "
                "landmark model (dlib 68-point, or insightface with landmark_2d_106) and analyse again.")
        sets.append([np.asarray(f.landmarks, np.float64) for f in faces])
    return sets


def landmark_maps(images, analysis: FaceAnalysis, style: LandmarkStyle, size: int = DEFAULT_SIZE,
                  framing: str = "face", crop_scale: float = 2.2, face_index: int = -1) -> ConditionMaps:
    """One ``size`` x ``size`` landmark drawing per face (``framing="face"``) or per image, and the crops."""
    _landmark_sets(analysis)  # refuse faces without dense landmarks before any work
    crops, crop_faces, sources, notes = framed_crops(images, analysis, size, framing, crop_scale, face_index)
    drawings = [draw_landmarks(sets, size, size, style) for sets in _landmark_sets(crop_faces)]
    notes += [f"image {sources[i]}: no face, its landmark map is empty." for i, f in enumerate(crop_faces.faces) if not f]
    maps = torch.from_numpy(np.stack(drawings).astype(np.float32) / 255.0)
    return ConditionMaps(maps, crops, None, sources, notes)


# ------------------------------------------------------------------------------------- calibration

def _group_distances(point_sets, height: int, width: int, style: LandmarkStyle) -> np.ndarray:
    """float32 ``[groups, H, W]``: every pixel's distance to each group's drawn centre line (and points)."""
    cv2 = require("cv2", "The M3Face landmark style calibration")
    distances = []
    for group in style.groups:
        solo = LandmarkStyle("centre", (replace(group, colour=(255, 255, 255), draw="lines+points", thickness=1,
                                                point_radius=1),))
        centre = _centre_line(point_sets, height, width, solo)
        distances.append(cv2.distanceTransform(np.where(centre, 0, 255).astype(np.uint8), cv2.DIST_L2, 5))
    return np.stack(distances)


def _centre_line(point_sets, height: int, width: int, solo: LandmarkStyle) -> np.ndarray:
    """1-pixel drawing of one group (thickness and radius fixed at 1 whatever the canvas size)."""
    cv2 = require("cv2", "The M3Face landmark style calibration")
    canvas = np.zeros((height, width), dtype=np.uint8)
    (group,) = solo.groups
    for points in point_sets:
        path = np.rint(to_68_points(points)[list(group.points)] * 16).astype(np.int32)
        cv2.polylines(canvas, [path], group.closed, 255, 1, cv2.LINE_8, 4)
        for x, y in path:
            cv2.circle(canvas, (int(x), int(y)), 16, 255, -1, cv2.LINE_8, 4)
    return canvas > 0


def _path_length(point_sets, groups) -> float:
    total = 0.0
    for points in point_sets:
        ibug = to_68_points(points)
        for group in groups:
            path = ibug[list(group.points)]
            if group.closed:
                path = np.vstack([path, path[:1]])
            total += float(np.linalg.norm(np.diff(path, axis=0), axis=1).sum())
    return total


@dataclass
class StyleCalibration:
    style: LandmarkStyle
    report: list[str]
    warnings: list[str]


def _ink_votes(rgb, distances, ink, base: LandmarkStyle, band: float, snap: int):
    """Per group: (learnt colour or None, agreement, voters) from the ink nearest to it (centre pixels first)."""
    nearest, closest = np.argmin(distances, axis=0), np.min(distances, axis=0)
    found = dominant_colours(rgb, radius=24.0)
    known = [c.colour for c in found.clusters] + [g.colour for g in base.groups]
    results = []
    for index in range(len(base.groups)):
        mine = (nearest == index) & ink & (closest <= band)
        core = mine & (closest <= 1.0)      # line centres: the least blended pixels (JPEG, antialiasing)
        vote = vote_colour(rgb, found.assignment, core if core.sum() >= MIN_CLASS_PIXELS else mine, 0)
        if vote is None:
            results.append((None, 0.0, 0, mine))
            continue
        cluster, own, agreement, pixels = vote
        results.append((snap_colour(found.clusters[cluster].colour if cluster >= 0 else own, known, snap),
                        agreement, pixels, mine))
    return results


def calibrate_style(sample, point_sets, base: LandmarkStyle, ink_distance: float = 48.0,
                    snap: int = 3) -> StyleCalibration:
    """Learn the canvas colour, each group's colour and the line width from a sample drawing.

    ``point_sets``: the landmarks (68 or 106 points per face) of the photo the sample was drawn from, in
    the sample's pixels. Every pixel belongs to the group whose centre line is nearest (so groups that
    run close together, like the lips, split the ink between them). Groups without ink keep the base
    colour (reported). The line width is the ink area over the line length of the groups with ink.
    """
    from scipy import ndimage

    rgb = as_uint8_rgb(sample, "sample landmark image")
    if rgb.ndim != 3:
        raise InvalidInputError(f"the sample landmark image must be one image, got shape {list(rgb.shape)}.")
    height, width = rgb.shape[:2]
    band = max(3.0, 0.014 * min(height, width))
    distances = _group_distances(point_sets, height, width, base)
    far = ~ndimage.binary_dilation(distances.min(axis=0) <= band, iterations=int(2 * band))
    canvas = mode_colour(rgb[far]) or base.canvas   # the canvas is flat: its exact colour is the most frequent
    ink = np.linalg.norm(rgb.astype(np.float64) - np.array(canvas, np.float64), axis=-1) > ink_distance
    groups, report, warnings, inked, drawn = [], [f"canvas: {list(canvas)}"], [], 0, []
    for group, (colour, agreement, pixels, mine) in zip(base.groups, _ink_votes(rgb, distances, ink, base, band,
                                                                                 snap), strict=True):
        if colour is None:
            warnings.append(f"no ink near the '{group.name}' landmarks; kept its colour {list(group.colour)}.")
            groups.append(group)
            continue
        report.append(f"{group.name}: {list(colour)} ({agreement:.0%} of {pixels} px agree)")
        groups.append(replace(group, colour=colour))
        inked, drawn = inked + int(mine.sum()), drawn + [group]
    length = _path_length(point_sets, drawn)
    thickness = base.thickness
    if length > 0:
        thickness = max(1, min(64, int(round(inked / length * REFERENCE_SIZE / min(height, width)))))
    report.append(f"line width: about {thickness} px on a 512 canvas (ink area / line length; dots make it larger)")
    style = replace(base, name="calibrated", groups=tuple(groups), canvas=canvas, thickness=thickness,
                    source=f"learnt from a sample drawing by 'M3Face Landmark Style from Sample' (base: {base.name})")
    return StyleCalibration(style, report + [f"WARNING: {w}" for w in warnings], warnings)
