"""Learn a segmentation palette from an example mask and the label map of the photo it belongs to.

The official M3Face palette could not be read, but the official sample masks (``data/masks/*.png``)
and every M3CelebA mask show it. Given such a mask and a parse of the same photo:

1. **Dominant colours** of the mask: exact colours used by at least ``min_pixels`` pixels seed
   clusters (most frequent first; a seed within ``radius`` of an earlier one joins it); every pixel
   then goes to the nearest seed, or stays unmatched when farther than ``radius`` (edge blends, JPEG
   ringing). A cluster's colour is its most frequent exact colour, which for a flat region is the
   colour itself, also after JPEG (the interior of a flat 8x8 block decodes to one value).
2. **Snapping**: JPEG's RGB -> YCbCr -> RGB rounding moves some colours by 1-2 levels (e.g. (204, 0, 0)
   decodes as (204, 0, 1)), which no amount of voting can undo. A cluster colour within ``snap``
   levels per channel of a colour of a known palette (the base palette and the shipped ones) takes that
   colour; the report says so.
3. **Voting**: every class of the parse, eroded by ``erode`` pixels so boundary pixels and small parse
   misalignments do not vote, takes the cluster most of its pixels fall in.

Classes the parse does not contain keep the base palette's colour; clusters no class took (e.g. hair
when the parser cannot see hair) and clusters two classes took are reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...errors import InvalidInputError
from .classes import m3face_classes
from .palette import Palette, as_uint8_rgb

MIN_CLASS_PIXELS = 12


@dataclass
class ColourCluster:
    colour: tuple[int, int, int]
    pixels: int          # pixels assigned to the cluster
    share: float         # of all pixels of the mask


@dataclass
class DominantColours:
    clusters: list[ColourCluster]
    assignment: np.ndarray   # int64 [H,W]: cluster index or -1 (unmatched)


def dominant_colours(image, radius: float = 24.0, min_pixels: int | None = None) -> DominantColours:
    """The flat colours of a mask image (see the module doc). ``min_pixels`` defaults to 0.02 % of the pixels."""
    rgb = as_uint8_rgb(image, "mask image")
    if rgb.ndim != 3:
        raise InvalidInputError(f"the mask image must be one [H, W, 3] image, got shape {list(rgb.shape)}.")
    flat = rgb.reshape(-1, 3).astype(np.int64)
    floor = max(4, int(round(0.0002 * len(flat)))) if min_pixels is None else int(min_pixels)
    packed = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    unique, inverse, counts = np.unique(packed, return_inverse=True, return_counts=True)
    colours = np.stack([(unique >> 16) & 255, (unique >> 8) & 255, unique & 255], axis=1)
    seeds: list[int] = []
    for index in np.argsort(-counts, kind="stable"):
        if counts[index] < floor:
            break
        if not seeds or np.min(np.linalg.norm(colours[seeds] - colours[index], axis=1)) > radius:
            seeds.append(int(index))
    if not seeds:
        return DominantColours([], np.full(rgb.shape[:2], -1, dtype=np.int64))
    centres = colours[seeds].astype(np.float64)
    distances = np.linalg.norm(colours[:, None, :].astype(np.float64) - centres[None], axis=2)
    nearest = np.argmin(distances, axis=1)
    nearest[distances[np.arange(len(colours)), nearest] > radius] = -1
    assignment = nearest[inverse.reshape(-1)]
    pixel_counts = np.bincount(assignment[assignment >= 0], minlength=len(seeds))
    clusters = [ColourCluster(tuple(int(v) for v in colours[s]), int(pixel_counts[i]), pixel_counts[i] / len(flat))
                for i, s in enumerate(seeds)]
    return DominantColours(clusters, assignment.reshape(rgb.shape[:2]))


def mode_colour(pixels: np.ndarray) -> tuple[int, int, int] | None:
    """The most frequent exact colour of uint8 ``[N,3]`` pixels (None when there are none)."""
    if len(pixels) == 0:
        return None
    packed = (pixels[:, 0].astype(np.int64) << 16) | (pixels[:, 1].astype(np.int64) << 8) | pixels[:, 2]
    unique, counts = np.unique(packed, return_counts=True)
    best = int(unique[np.argmax(counts)])
    return (best >> 16) & 255, (best >> 8) & 255, best & 255


def snap_colour(colour: tuple[int, int, int], known: list[tuple[int, int, int]], snap: int) -> tuple[int, int, int]:
    """The known colour nearest to ``colour`` when it is within ``snap`` levels on every channel, else ``colour``."""
    if snap <= 0 or not known:
        return colour
    candidates = np.array(known, dtype=np.int64)
    difference = np.abs(candidates - np.array(colour, dtype=np.int64))
    close = np.nonzero(difference.max(axis=1) <= snap)[0]
    if len(close) == 0:
        return colour
    best = close[np.argmin(difference[close].sum(axis=1))]
    return tuple(int(v) for v in candidates[best])


def erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Binary erosion by ``pixels`` (3x3 square steps); the image border counts as outside."""
    if pixels <= 0:
        return mask
    from scipy import ndimage

    return ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=int(pixels), border_value=0)


@dataclass
class ClassVote:
    name: str
    colour: tuple[int, int, int]
    agreement: float     # share of the class's voting pixels that fell in the winning cluster
    pixels: int          # voting pixels
    cluster: int


@dataclass
class Calibration:
    palette: Palette
    votes: list[ClassVote]
    missing: list[str]                   # classes absent from the parse (base colour kept)
    unmatched: list[ColourCluster]       # mask colours no class took
    shared: dict[int, list[str]]         # cluster index -> classes that all took it (more than one)
    snapped: dict[tuple[int, int, int], tuple[int, int, int]]
    estimated: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # class -> its blended median colour


def vote_colour(rgb: np.ndarray, assignment: np.ndarray, region: np.ndarray, erode_pixels: int,
                majority: float = 0.5) -> tuple[int, tuple[int, int, int] | None, float, int] | None:
    """(cluster or -1, own colour when -1, agreement, voters) of one class region; None when it is too small.

    The cluster most voters fall in wins when it holds at least ``majority`` of them; otherwise (a small
    part whose colour JPEG scattered too much to form a cluster of its own) the per-channel median of
    the voters is the class's colour (robust to the few pixels of other colours).
    """
    voters = erode(region, erode_pixels)
    if voters.sum() < MIN_CLASS_PIXELS:
        voters = region       # a thin part (an eye, the inner mouth) vanishes under erosion: vote un-eroded
    if voters.sum() < MIN_CLASS_PIXELS:
        return None
    clusters = assignment[voters]
    matched = clusters[clusters >= 0]
    if len(matched):
        counts = np.bincount(matched)
        winner = int(np.argmax(counts))
        if counts[winner] >= majority * len(clusters):
            return winner, None, float(counts[winner]) / len(clusters), int(len(clusters))
    colour = np.rint(np.median(rgb[voters].astype(np.float64), axis=0)).astype(np.int64)
    agreement = float((np.abs(rgb[voters].astype(np.int64) - colour).max(axis=1) <= 8).mean())
    return -1, tuple(int(v) for v in colour), agreement, int(len(clusters))


def calibrate_palette(mask_image, labels: np.ndarray, base: Palette, known: list[tuple[int, int, int]] | None = None,
                      erode_pixels: int = 2, radius: float = 24.0, snap: int = 3) -> Calibration:
    """Learn each class's colour (see the module doc). ``labels``: M3Face-order ids, same ``[H,W]`` as the mask.

    A class without a cluster of its own (a small part whose JPEG pixels scatter over many exact colours)
    takes the median of its pixels, snapped like the clusters; it is listed as *estimated*. A part thinner
    than about 8 pixels cannot be recovered from a 4:2:0 JPEG (colour is stored at half resolution and
    bleeds into the neighbours): its agreement is low and the warnings say so.
    """
    rgb = as_uint8_rgb(mask_image, "mask image")
    labels = np.asarray(labels)
    if labels.shape != rgb.shape[:2]:
        raise InvalidInputError(f"the label map is {list(labels.shape)} but the mask image is {list(rgb.shape[:2])}.")
    found = dominant_colours(rgb, radius)
    known = list(known or []) + list(base.colours.values())
    cluster_colours = [snap_colour(c.colour, known, snap) for c in found.clusters]
    results = {name: vote_colour(rgb, found.assignment, labels == index, erode_pixels)
               for index, name in enumerate(m3face_classes())}
    votes = [ClassVote(n, cluster_colours[r[0]], r[2], r[3], r[0]) for n, r in results.items() if r and r[0] >= 0]
    taken = {v.colour for v in votes}
    estimated = {}
    for name, result in results.items():
        if result is None or result[0] >= 0:
            continue
        colour = snap_colour(result[1], known + cluster_colours, snap)
        estimated[name] = result[1]
        votes.append(ClassVote(name, colour, result[2], result[3], -1))
        taken.add(colour)
    order = {n: i for i, n in enumerate(m3face_classes())}
    votes.sort(key=lambda v: order[v.name])
    sharing: dict[int, list[str]] = {}
    for vote in votes:
        if vote.cluster >= 0:
            sharing.setdefault(vote.cluster, []).append(vote.name)
    unmatched = [ColourCluster(cluster_colours[i], c.pixels, c.share)
                 for i, c in enumerate(found.clusters) if cluster_colours[i] not in taken]
    palette = base.with_colours({v.name: v.colour for v in votes}, "calibrated",
                                f"learnt from a mask by 'M3Face Palette from Mask' (base: {base.name})")
    snapped = {c.colour: s for c, s in zip(found.clusters, cluster_colours, strict=True) if c.colour != s}
    missing = [n for n, r in results.items() if r is None]
    return Calibration(palette, votes, missing, unmatched, {k: v for k, v in sharing.items() if len(v) > 1},
                       snapped, estimated)


def warning_lines(calibration: Calibration, weak: float = 0.6) -> list[str]:
    """What the user should look at: weak votes, colours no class took, colours several classes took."""
    colour_of = {v.cluster: v.colour for v in calibration.votes}
    lines = [f"{v.name} got {list(v.colour)} from only {v.agreement:.0%} of its pixels; check that the photo matches "
             "the mask (same image, same crop)." for v in calibration.votes if v.agreement < weak]
    lines += [f"unmatched mask colour {list(c.colour)} ({c.share:.1%} of the mask): no parsed class lies on it (a "
              "class the parser does not see, e.g. hair with the landmark parser, or a mask that does not fit the "
              "photo)." for c in calibration.unmatched]
    lines += [f"colour {list(colour_of[k])} was taken by {', '.join(names)} (the mask merges them, or the parse "
              "disagrees with it)." for k, names in calibration.shared.items()]
    return lines


def report_lines(calibration: Calibration) -> list[str]:
    """Human-readable report: learnt colours, snapped colours, missing classes, then the warnings."""
    lines = [f"{v.name}: {list(v.colour)} ({v.agreement:.0%} of {v.pixels} px agree)" for v in calibration.votes]
    lines += [f"snapped {list(a)} -> {list(b)} (a known palette colour)" for a, b in calibration.snapped.items()]
    lines += [f"{name}: no flat colour region of its own; median of its pixels {list(median)}"
              for name, median in calibration.estimated.items()]
    if calibration.missing:
        lines.append(f"not in the photo's parse, kept from the base palette: {', '.join(calibration.missing)}")
    return lines + [f"WARNING: {line}" for line in warning_lines(calibration)]
