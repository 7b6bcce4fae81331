"""FGIS (ConsistentID's fine-grained identity similarity): DINO cosines of matching facial regions.

ConsistentID defines FGIS as "the average cosine similarity between DINO embeddings of the generated facial
regions in reference and generated images". Here, per image pair:

1. the largest face of each image is parsed (the pack's face parser: BiSeNet, or the landmark parser without
   weights) into the regions eyes, nose, mouth (mouth and lips), brows and skin;
2. each region becomes a square crop around its pixels (the region's box, long side grown by
   ``REGION_CONTEXT``) with every pixel outside the region black, as ConsistentID feeds its facial regions to
   its image encoder, resized to DINO's input size;
3. FGIS is the mean over the regions present in both images (at least ``MIN_REGION_PIXELS`` pixels) of the
   cosine between the two crops' DINO embeddings. Regions missing in one image are left out and named in the
   row's notes; with none in common the cell is missing.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..face_analysis.parsing.regions import region_mask
from .inputs import MetricContext, largest_face

FGIS_REGIONS = {"eyes": "eyes", "nose": "nose", "mouth": "mouth_and_lips", "brows": "brows", "skin": "skin"}
MIN_REGION_PIXELS = 16
REGION_CONTEXT = 1.2


def region_crop(image: torch.Tensor, mask: torch.Tensor, side: int) -> torch.Tensor | None:
    """``[side,side,3]``: the square around ``mask``'s pixels of ``image`` ``[H,W,3]``, black outside the mask."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() < MIN_REGION_PIXELS:
        return None
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    half = max(y1 - y0, x1 - x0) * REGION_CONTEXT / 2
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    top, left = int(round(cy - half)), int(round(cx - half))
    size = max(1, int(round(2 * half)))
    masked = (image * mask[..., None].to(image.dtype)).permute(2, 0, 1)          # [3,H,W]
    height, width = mask.shape
    pad = (max(0, -left), max(0, left + size - width), max(0, -top), max(0, top + size - height))
    padded = F.pad(masked, pad)
    crop = padded[:, top + pad[2]:top + pad[2] + size, left + pad[0]:left + pad[0] + size]
    crop = F.interpolate(crop[None], size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return crop[0].permute(1, 2, 0).clamp(0, 1)


def _labels(ctx: MetricContext, name: str) -> tuple[torch.Tensor, list[str]]:
    """Parse labels ``[N,H,W]`` of the largest face of every image of ``name``, and per image why it has none."""
    from ..face_analysis.parsing.parser import landmark_parser, parse_faces

    judge = ctx.models.judge()
    analysis = ctx.faces(judge, name)
    largest = [[largest_face(faces)] if faces else [] for faces in analysis.faces]
    parser = ctx.models.parser if ctx.models.parser is not None else landmark_parser()
    result = parse_faces(parser, ctx.inputs.batch(name), replace(analysis, faces=largest))
    problems = ["" if faces else f"no face in {'the image' if name == 'images' else f'{name} image {i}'} "
                f"({judge.backend})" for i, faces in enumerate(largest)]
    return result.labels, problems


def _region_embeddings(ctx: MetricContext, name: str) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
    """Per image of ``name``: region -> unit DINO embedding of its crop; and why an image has no face."""
    dino = ctx.models.dino
    labels, problems = _labels(ctx, name)
    images = ctx.inputs.batch(name)
    keys, crops = [], []
    for index in range(images.shape[0]):
        for region, parsed_name in FGIS_REGIONS.items():
            crop = region_crop(images[index], region_mask(labels[index:index + 1], parsed_name)[0] > 0.5,
                               dino.image_size)
            if crop is not None:
                keys.append((index, region))
                crops.append(crop)
    found: list[dict[str, torch.Tensor]] = [{} for _ in range(images.shape[0])]
    if crops:
        vectors = dino.embed_images(torch.stack(crops), ctx.models.batch_size, crop=False)
        for (index, region), vector in zip(keys, vectors, strict=True):
            found[index][region] = vector
    return found, problems


def fgis(ctx: MetricContext) -> list[dict]:
    generated, generated_problems = _region_embeddings(ctx, "images")
    references, reference_problems = _region_embeddings(ctx, "references")
    rows = []
    for index in range(ctx.inputs.count):
        paired = ctx.inputs.paired_index("references", index)
        problem = generated_problems[index] or reference_problems[paired]
        if problem:
            rows.append({"fgis": problem})
            continue
        ours, theirs = generated[index], references[paired]
        common = [r for r in FGIS_REGIONS if r in ours and r in theirs]
        if not common:
            rows.append({"fgis": "no facial region found in both images"})
            continue
        row = {"fgis": float(torch.stack([ours[r] @ theirs[r] for r in common]).mean())}
        left_out = [r for r in FGIS_REGIONS if r not in common]
        if left_out:
            row["notes"] = f"fgis: regions not in both images: {', '.join(left_out)}"
        rows.append(row)
    return rows
