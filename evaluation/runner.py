"""Run the chosen metrics on one :class:`~.inputs.MetricInputs` and assemble one row per generated image.

A metric function takes the shared :class:`~.inputs.MetricContext` and returns one dict per image: column ->
float, or column -> a string saying why that cell is missing, plus an optional ``"notes"`` string. Here the
strings become ``None`` cells and the reasons go into the row's ``"notes"`` (``"column, column: reason; ..."``).
"""
from __future__ import annotations

import logging
import time

from . import fgis, identity, pixels, semantic
from .inputs import MetricContext, MetricInputs
from .metrics import MetricModels, as_float

__all__ = ["MetricInputs", "run_metrics", "METRIC_FUNCTIONS"]

logger = logging.getLogger("likeness")

METRIC_FUNCTIONS = {
    "facesim_arcface": identity.facesim_arcface,
    "facesim_dlib": identity.facesim_dlib,
    "facesim_second": identity.facesim_second,
    "copy_paste": identity.copy_paste,
    "clip_t": semantic.clip_t,
    "clip_i": semantic.clip_i,
    "dino": semantic.dino,
    "fgis": fgis.fgis,
    "psnr_ssim": pixels.psnr_ssim,
    "outside_mask": pixels.outside_mask,
    "mixing": identity.mixing,
}


def _merge(row: dict, notes: list[str], cells: dict) -> None:
    """Cells into ``row``; reasons into ``notes`` once per reason, after the columns it empties."""
    missing: dict[str, list[str]] = {}
    for column, value in cells.items():
        if column == "notes":
            notes.append(value)
        elif isinstance(value, str):
            row[column] = None
            missing.setdefault(value, []).append(column)
        else:
            row[column] = as_float(value)
    notes += [f"{', '.join(columns)}: {reason}" for reason, columns in missing.items()]


def run_metrics(inputs: MetricInputs, names: list[str], models: MetricModels) -> list[dict]:
    """Rows ``{"image": i, <column>: float | None, ..., "notes": str}`` for the metrics ``names``."""
    context = MetricContext(inputs, models)
    rows = [{"image": index} for index in range(inputs.count)]
    notes: list[list[str]] = [[] for _ in rows]
    for name in names:
        started = time.perf_counter()
        for row, row_notes, cells in zip(rows, notes, METRIC_FUNCTIONS[name](context), strict=True):
            _merge(row, row_notes, cells)
        logger.debug("Likeness metrics: %s on %d image(s) in %.2f s", name, inputs.count, time.perf_counter() - started)
    for row, row_notes in zip(rows, notes, strict=True):
        row["notes"] = "; ".join(row_notes)
    return rows
