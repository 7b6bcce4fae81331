"""Identity metrics: FaceSim per recogniser, the copy-paste check, the identity-mixing balance.

Each function returns one dict per generated image: column -> value, or column -> the reason it is missing
(a string), as :func:`~.runner.run_metrics` expects.

FaceSim takes the generated image's best-matching face (the similarity node's rule: a crowd in the picture
does not hide the person) against the reference's largest face.

Copy-paste similarity is in the judge's own units: ArcFace's cosine; for dlib ``1 - L2`` of the raw vectors,
because dlib's cosine is compressed (about 0.86 between different people, 0.95-0.99 for the same one) while its
L2 has a documented scale (same person below 0.6).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..face_analysis.types import Face
from .inputs import MetricContext, largest_face, unit
from .metrics import COPY_PASTE_MARGIN


def _best_match(faces: list[Face], reference: Face) -> tuple[float, float] | None:
    """(highest cosine, smallest raw L2) of ``faces`` to ``reference``; None without embeddings."""
    if reference.embedding is None:
        return None
    ref = np.asarray(reference.embedding, dtype=np.float64)
    pairs = [(float(unit(f.embedding) @ unit(ref)), float(np.linalg.norm(np.asarray(f.embedding, np.float64) - ref)))
             for f in faces if f.embedding is not None]
    if not pairs:
        return None
    return max(p[0] for p in pairs), min(p[1] for p in pairs)


def _pair(ctx: MetricContext, analyzer, index: int, name: str = "references") -> tuple[float, float] | str:
    """(cosine, L2) of generated image ``index`` to the paired ``name`` photo, or the reason there is none."""
    reference, why = ctx.reference_face(analyzer, index, name)
    if reference is None:
        return why
    faces, why = ctx.generated_faces(analyzer, index)
    if not faces:
        return why
    match = _best_match(faces, reference)
    return match if match is not None else f"no identity embedding ({analyzer.backend} has no recogniser)"


def facesim(ctx: MetricContext, analyzer, column: str, l2_column: str | None = None) -> list[dict]:
    rows = []
    for index in range(ctx.inputs.count):
        pair = _pair(ctx, analyzer, index)
        if isinstance(pair, str):
            rows.append({column: pair, **({l2_column: pair} if l2_column else {})})
        else:
            rows.append({column: pair[0], **({l2_column: pair[1]} if l2_column else {})})
    return rows


def facesim_arcface(ctx: MetricContext) -> list[dict]:
    return facesim(ctx, ctx.models.arcface, "facesim_arcface")


def facesim_dlib(ctx: MetricContext) -> list[dict]:
    return facesim(ctx, ctx.models.dlib, "facesim_dlib", "dlib_l2")


def facesim_second(ctx: MetricContext) -> list[dict]:
    return facesim(ctx, ctx.models.second, "facesim_second")


def copy_paste_similarity(backend: str, cosine: float, l2: float) -> float:
    """The judge's similarity: cosine (ArcFace and other centred embeddings), ``1 - L2`` for dlib."""
    return 1.0 - l2 if backend == "dlib" else cosine


def _photos_ceiling(ctx: MetricContext, analyzer, index: int) -> float | str:
    reference, why = ctx.reference_face(analyzer, index)
    if reference is None:
        return why
    second, why = ctx.reference_face(analyzer, index, "second_photos")
    if second is None:
        return why
    match = _best_match([second], reference)
    if match is None:
        return f"no identity embedding ({analyzer.backend} has no recogniser)"
    return copy_paste_similarity(analyzer.backend, *match)


def copy_paste(ctx: MetricContext) -> list[dict]:
    """Similarity to the reference vs to a second real photo; flagged above the photos' own similarity + margin."""
    judge = ctx.models.judge()
    columns = ("copy_sim_ref", "copy_sim_second", "copy_ceiling", "copy_excess", "copy_flag")
    rows = []
    for index in range(ctx.inputs.count):
        to_ref = _pair(ctx, judge, index)
        to_second = _pair(ctx, judge, index, "second_photos")
        ceiling = _photos_ceiling(ctx, judge, index)
        problem = next((v for v in (to_ref, to_second, ceiling) if isinstance(v, str)), None)
        if problem is not None:
            rows.append(dict.fromkeys(columns, problem))
            continue
        sim_ref = copy_paste_similarity(judge.backend, *to_ref)
        excess = sim_ref - ceiling
        rows.append({"copy_sim_ref": sim_ref, "copy_sim_second": copy_paste_similarity(judge.backend, *to_second),
                     "copy_ceiling": ceiling, "copy_excess": excess,
                     "copy_flag": 1.0 if excess > COPY_PASTE_MARGIN else 0.0})
    return rows


def mixing(ctx: MetricContext) -> list[dict]:
    """The identity-mixing readout (techniques.faceid.mixing_readout) of every image against each source."""
    from ..techniques.faceid.mixing_readout import mixing_readout

    judge = ctx.models.judge()
    sources = ctx.faces(judge, "mix_sources")
    largest_only = [[largest_face(faces)] if faces else [] for faces in sources.faces]
    if not any(largest_only):
        reason = f"no face in any mix_sources image ({judge.backend})"
        return [{f"mix_{kind}_{k}": reason for k in range(len(largest_only)) for kind in ("cos", "share")}
                for _ in range(ctx.inputs.count)]
    readout = mixing_readout(replace(sources, faces=largest_only), ctx.faces(judge, "images"))
    rows = []
    for cosines, shares in zip(readout.cosines, readout.shares(), strict=True):
        row: dict = {}
        for source in range(len(sources.faces)):
            if source not in readout.source_images:
                reason = f"no face in mix_sources image {source}"
                row[f"mix_cos_{source}"] = row[f"mix_share_{source}"] = reason
                continue
            slot = readout.source_images.index(source)
            missing = np.isnan(cosines[slot])
            row[f"mix_cos_{source}"] = f"no face in the image ({judge.backend})" if missing else cosines[slot]
            row[f"mix_share_{source}"] = f"no face in the image ({judge.backend})" if missing else shares[slot]
        rows.append(row)
    return rows
