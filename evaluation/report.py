"""Metric rows as a text table, a summary (mean / std / count per column), CSV and JSON files, a contact sheet.

Rows are what :func:`~.metrics.compute_metrics` returns: ``"image"``, one cell per column (float, ``None`` when
missing, ``inf`` for the PSNR of identical crops) and ``"notes"``. Files: CSV leaves missing cells empty and
writes ``inf``; JSON writes missing cells as ``null`` and infinities as the string ``"inf"`` (JSON has no
infinity).
"""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import torch

from .metrics import is_missing

FIXED_COLUMNS = ("image", "notes")


def value_columns(rows: list[dict]) -> list[str]:
    """The metric columns of ``rows``, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in FIXED_COLUMNS and k not in columns]
    return columns


def summarize(rows: list[dict]) -> dict[str, dict[str, float | int | None]]:
    """Per column: ``mean``, ``std`` (population) and ``count`` of the measured cells (``None`` when none).

    Infinite cells (PSNR of identical crops) count; their mean is infinite.
    """
    summary = {}
    for column in value_columns(rows):
        values = [float(row[column]) for row in rows if not is_missing(row.get(column))]
        if not values:
            summary[column] = {"mean": None, "std": None, "count": 0}
            continue
        finite = all(math.isfinite(v) for v in values)
        mean = float(np.mean(values)) if finite else math.inf
        std = float(np.std(values)) if finite else math.nan
        summary[column] = {"mean": mean, "std": std, "count": len(values)}
    return summary


def format_cell(value) -> str:
    if is_missing(value):
        return "-"
    value = float(value)
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}"


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table: one line per image, a mean line, then the notes of missing cells."""
    columns = value_columns(rows)
    header = ["image", *columns]
    body = [[str(row["image"]), *(format_cell(row.get(c)) for c in columns)] for row in rows]
    summary = summarize(rows)
    body.append(["mean", *(format_cell(summary[c]["mean"]) for c in columns)])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in [header, *body]]
    lines += [f"image {row['image']}: {row['notes']}" for row in rows if row.get("notes")]
    return "\n".join(lines)


def _csv_cell(value):
    if value is None:
        return ""
    return value


def write_csv(rows: list[dict], path: str) -> str:
    """Write ``rows`` as CSV (columns: image, the metric columns, notes); returns the path."""
    columns = ["image", *value_columns(rows), "notes"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _csv_cell(row.get(c, "" if c == "notes" else None)) for c in columns})
    return path


def _json_value(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_json(rows: list[dict], path: str, extra: dict | None = None) -> str:
    """Write ``{"rows": [...], "summary": {...}, **extra}`` as JSON; returns the path."""
    summary = {c: {k: _json_value(v) for k, v in s.items()} for c, s in summarize(rows).items()}
    payload = {"rows": [{k: _json_value(v) for k, v in row.items()} for row in rows], "summary": summary,
               **(extra or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, allow_nan=False)
    return path


def contact_sheet(images: torch.Tensor, rows: list[dict], columns: list[str] | None = None,
                  tile: int = 256, per_row: int = 4) -> torch.Tensor:
    """IMAGE ``[1,H,W,3]``: the images as tiles (long side ``tile``), each with its scores written under it."""
    from .sheet import draw_sheet

    return draw_sheet(images, rows, columns or value_columns(rows), tile, per_row)
