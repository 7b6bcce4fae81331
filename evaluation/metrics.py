"""The metric registry, the models the metrics use, and :func:`compute_metrics` (one row per generated image).

Every metric compares each generated image ``i`` with its reference (``references[i]``, or the one reference
shared by the batch); the definitions below are what the Likeness Metrics node, the ``eval`` command and the
README report. A cell that cannot be measured (no face in that image, a region the parser did not find,
sizes that differ) is ``None`` in its row and the reason is in the row's ``"notes"``; nothing is repaired
and nothing raises for one bad image. A metric asked for without its model or input raises
:class:`~..errors.InvalidInputError` naming what is missing.

Similarities are cosines in -1..1 (the papers print them x100). Models come from local folders only
(:meth:`MetricModels.from_folders`); nothing is downloaded.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch

from ..errors import InvalidInputError

logger = logging.getLogger("likeness")

# The copy-paste flag: sim(generated, reference) must exceed the two real photos' own similarity (the
# ceiling) by more than this margin, in the judge's similarity units (see identity.copy_paste_similarity).
# Two real photos of one person scatter by about this much around their mean similarity, so a generation
# above ceiling + margin is closer to the reference than another real photo would be: it copies the photo.
COPY_PASTE_MARGIN = 0.10


@dataclass(frozen=True)
class MetricDefinition:
    """One metric: its name, the row columns it fills, what it needs, and what it measures."""

    name: str
    columns: tuple[str, ...]          # "mix_cos_<k>" style names stand for one column per source identity
    models: tuple[str, ...]           # MetricModels fields it needs (any one of a tuple written "a|b")
    inputs: tuple[str, ...]           # compute_metrics arguments it needs besides images and references
    definition: str
    lower_is_better: tuple[str, ...] = ()  # columns where smaller is better (distances, change, a copy flag)
    unranked: tuple[str, ...] = ()         # columns that describe rather than rank (raw similarities, shares)


METRICS: dict[str, MetricDefinition] = {d.name: d for d in (
    MetricDefinition(
        "facesim_arcface", ("facesim_arcface",), ("arcface",), (),
        "FaceSim: cosine between the ArcFace embedding (the pack's insightface analyzer) of the generated image's "
        "best-matching face and of the reference's largest face."),
    MetricDefinition(
        "facesim_dlib", ("facesim_dlib", "dlib_l2"), ("dlib",), (),
        "FaceSim by an independent judge: dlib's 128-D ResNet (not used by any generator). Cosine of the raw "
        "vectors, and their L2 distance (dlib's same-person rule: L2 < 0.6).", lower_is_better=("dlib_l2",)),
    MetricDefinition(
        "facesim_second", ("facesim_second",), ("second",), (),
        "FaceSim with a second ONNX recogniser (another insightface pack), cosine as facesim_arcface."),
    MetricDefinition(
        "copy_paste", ("copy_sim_ref", "copy_sim_second", "copy_ceiling", "copy_excess", "copy_flag"),
        ("arcface|dlib",), ("second_photos",),
        "Copy-paste check with the judge (ArcFace, else dlib): similarity of the generation to the reference "
        "(copy_sim_ref) and to a second real photo of the same person (copy_sim_second); the two photos' own "
        "similarity is the ceiling (copy_ceiling); copy_excess = copy_sim_ref - copy_ceiling; copy_flag = 1 when "
        f"copy_excess > {COPY_PASTE_MARGIN} (the generation is closer to the reference than a real photo is).",
        lower_is_better=("copy_excess", "copy_flag"), unranked=("copy_sim_ref", "copy_sim_second", "copy_ceiling")),
    MetricDefinition(
        "clip_t", ("clip_t",), ("clip",), ("prompts",),
        "CLIP-T: cosine between CLIP's projected image embedding of the generated image and the projected text "
        "embedding of its prompt (transformers CLIPModel)."),
    MetricDefinition(
        "clip_i", ("clip_i",), ("clip",), (),
        "CLIP-I: cosine between CLIP's projected image embeddings of the generated image and of the reference."),
    MetricDefinition(
        "dino", ("dino",), ("dino",), (),
        "DINO: cosine between the DINO ViT-S/16 class-token embeddings of the generated image and the reference."),
    MetricDefinition(
        "fgis", ("fgis",), ("dino", "arcface|dlib"), (),
        "FGIS (ConsistentID): mean over the facial regions eyes, nose, mouth, brows and skin found in both images "
        "of the cosine between DINO embeddings of the region crops (region pixels only, the rest black) of the "
        "reference and the generation; regions come from the face parser (BiSeNet, or the landmark parser)."),
    MetricDefinition(
        "psnr_ssim", ("psnr", "ssim"), ("arcface|dlib",), (),
        "PSNR (dB, infinite for identical crops) and SSIM (Gaussian window 11, sigma 1.5, mean over RGB) between "
        "the 256 px ArcFace-aligned crops of the generated image's largest face and the reference's."),
    MetricDefinition(
        "outside_mask", ("outside_mad", "outside_psnr"), (), ("masks",),
        "Change outside the inpainting mask (FaceA-Net's promise that only the face changes): mean absolute "
        "difference (0..1) and PSNR between the generated image and its source where mask < 0.5.",
        lower_is_better=("outside_mad",)),
    MetricDefinition(
        "mixing", ("mix_cos_<k>", "mix_share_<k>"), ("arcface|dlib",), ("mix_sources",),
        "Identity-mixing balance (techniques.faceid.mixing_readout): the judge's cosine of the generation to each "
        "source identity and each source's share of the positive similarity.",
        unranked=("mix_cos_<k>", "mix_share_<k>")),
)}


def metric_names() -> list[str]:
    """Every metric name, in the registry's (and the tables') order."""
    return list(METRICS)


def metric_columns(names: list[str] | None = None, mix_count: int = 0) -> list[str]:
    """The row columns the metrics ``names`` fill, ``<k>`` columns expanded for ``mix_count`` source identities."""
    columns: list[str] = []
    for name in names or metric_names():
        for column in METRICS[name].columns:
            if "<k>" in column:
                columns += [column.replace("<k>", str(k)) for k in range(mix_count)]
            else:
                columns.append(column)
    return columns


def column_direction(column: str) -> int:
    """+1 when a larger value of ``column`` is better, -1 when a smaller one is, 0 when the column is not ranked
    (``mix_cos_2`` matches the registry's ``mix_cos_<k>``); columns no metric fills are 0."""
    for definition in METRICS.values():
        for pattern in definition.columns:
            if column == pattern or ("<k>" in pattern and re.fullmatch(pattern.replace("<k>", r"\d+"), column)):
                if pattern in definition.unranked:
                    return 0
                return -1 if pattern in definition.lower_is_better else 1
    return 0


def parse_metric_names(text: str | list[str]) -> list[str]:
    """Metric names from a comma-separated string or a list; ``"all"`` or empty means every metric."""
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names or names == ["all"]:
        return metric_names()
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise InvalidInputError(f"unknown metric {unknown[0]!r}; known metrics: {', '.join(METRICS)}.")
    return [n for n in METRICS if n in names]


@dataclass
class MetricModels:
    """The models the metrics use; a metric whose model is ``None`` is unavailable.

    ``arcface`` / ``dlib`` / ``second`` are FACE_ANALYZERs (face_analysis.analyzers), ``clip`` and ``dino``
    :class:`~.encoders.ClipEncoder` / :class:`~.encoders.DinoEncoder`, ``parser`` a FACE_PARSER (the landmark
    parser when ``None``). ``batch_size`` images go through CLIP and DINO at once.
    """

    arcface: object | None = None
    dlib: object | None = None
    second: object | None = None
    clip: object | None = None
    dino: object | None = None
    parser: object | None = None
    batch_size: int = 16

    @classmethod
    def from_folders(cls, *, insightface_pack: str | None = None, dlib: bool = False, second_pack: str | None = None,
                     clip: str | None = None, dino: str | None = None, parser: str | None = None,
                     device: str = "auto", batch_size: int = 16) -> MetricModels:
        """Load what is named: insightface packs from ``models/insightface/models/<pack>``, dlib from the
        face-recognition-models package, CLIP and DINO from transformers folders (a name under
        ``models/likeness/evaluation/`` or a path), the parser as the Face Parser Loader's choice."""
        from .encoders import load_clip, load_dino

        arcface = second = dlib_analyzer = face_parser = None
        if insightface_pack:
            from ..face_analysis.analyzers.insightface_backend import load_insightface
            arcface = load_insightface(insightface_pack)
        if second_pack:
            from ..face_analysis.analyzers.insightface_backend import load_insightface
            second = load_insightface(second_pack)
        if dlib:
            from ..face_analysis.analyzers.dlib_backend import load_dlib
            dlib_analyzer = load_dlib()
        if parser:
            from ..face_analysis.parsing.loader import load_face_parser
            face_parser = load_face_parser(parser, device)
        return cls(arcface=arcface, dlib=dlib_analyzer, second=second,
                   clip=load_clip(clip, device) if clip else None, dino=load_dino(dino, device) if dino else None,
                   parser=face_parser, batch_size=batch_size)

    def judge(self):
        """The analyzer that finds, aligns and judges faces: ArcFace when loaded, else dlib (None without both)."""
        return self.arcface if self.arcface is not None else self.dlib

    def has(self, requirement: str) -> bool:
        return any(getattr(self, name) is not None for name in requirement.split("|"))


def available_metrics(models: MetricModels, **inputs) -> list[str]:
    """The metrics whose models are loaded and whose inputs (keyword: value or None) are given."""
    return [d.name for d in METRICS.values()
            if all(models.has(r) for r in d.models) and all(inputs.get(i) is not None for i in d.inputs)]


def compute_metrics(images, *, references, second_photos=None, prompts=None, masks=None, sources=None,
                    mix_sources=None, metrics: list[str] | str | None = None,
                    models: MetricModels) -> list[dict]:
    """Measure every generated image; one row per image (see the module doc and :data:`METRICS`).

    - ``images``: IMAGE ``[B,H,W,3]``, the generations;
    - ``references``: IMAGE ``[1 or B,...]``, the reference photo(s) (one shared, or one per image);
    - ``second_photos``: IMAGE ``[1 or B,...]``, another real photo of the same person (copy-paste check);
    - ``prompts``: a string or ``B`` strings (CLIP-T);
    - ``masks``: MASK ``[1 or B,H,W]``, the inpainting masks (outside_mask);
    - ``sources``: IMAGE ``[1 or B,H,W,3]``, the images that were inpainted (default: ``references``);
    - ``mix_sources``: IMAGE, one photo per blended source identity (mixing);
    - ``metrics``: names (list or comma-separated); ``None``: every metric whose models and inputs are given.
    """
    from .runner import MetricInputs, run_metrics

    given = {"second_photos": second_photos, "prompts": prompts, "masks": masks, "mix_sources": mix_sources}
    names = available_metrics(models, **given) if metrics is None else parse_metric_names(metrics)
    for name in names:
        _check_requirements(METRICS[name], models, given)
    inputs = MetricInputs.build(images, references, second_photos, prompts, masks, sources, mix_sources)
    return run_metrics(inputs, names, models)


def _check_requirements(definition: MetricDefinition, models: MetricModels, given: dict) -> None:
    for requirement in definition.models:
        if not models.has(requirement):
            wanted = " or ".join(f"the {n} model" for n in requirement.split("|"))
            raise InvalidInputError(f"metric '{definition.name}' needs {wanted}; load it (a model folder) or leave "
                                    f"the metric out.")
    for name in definition.inputs:
        if given.get(name) is None:
            raise InvalidInputError(f"metric '{definition.name}' needs the '{name}' input; connect it or leave the "
                                    f"metric out.")


def is_missing(value) -> bool:
    """True for a cell that could not be measured (``None``, or NaN from an upstream score)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def as_float(value) -> float | None:
    """A cell value: a Python float, ``None`` for NaN / missing (infinite PSNR stays ``inf``)."""
    if value is None:
        return None
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    return None if math.isnan(value) else value
