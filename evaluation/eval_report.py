"""The files an ``eval`` run writes from its finished cells: per-image rows, the tables, the contact sheets.

- ``results.csv``: one row per generated image: variant, identity, prompt, seed, the image's path, the
  cell's seconds per image and peak memory, every metric column (empty where not measured) and notes;
- ``report.md`` / ``report.html``: the comparison (one row per variant, ``mean ± std`` over every image,
  best in bold: :mod:`.tables`), then per variant its table by identity and its contact sheets;
- ``tables/<variant>.md`` / ``.html``: that variant's table on its own;
- ``sheets/<variant>__<identity>.png``: the identity's images of that variant, a line per prompt and a tile
  per seed, scores under each.

Every file is rewritten whole (atomically) from all finished cells, so a resumed run's tables cover the
cells of earlier runs too.
"""
from __future__ import annotations

import csv
import html
import io
import os
from typing import Sequence

import numpy as np
import torch

from .grid import Cell, slug, variant_slug
from .measure import Measurer, load_image
from .records import CellRecord, atomic_write_text
from .tables import COST_COLUMNS, Table, html_page, ranked, summary_table

ROW_FIELDS = ("variant", "identity", "prompt_index", "prompt", "seed", "image", "seconds", "peak_memory_mb",
              "memory_kind")
SHEET_COLUMNS = 4  # scores written under each image of a contact sheet (the first ranked metric columns)
MAX_SHEET_COLUMNS = 8  # tiles per line of a contact sheet


def cell_rows(cell: Cell, record: CellRecord, metrics: list[dict]) -> list[dict]:
    """One row per image of a finished cell: the cell, its cost (seconds per image) and the image's metrics."""
    per_image = record.seconds / max(len(record.images), 1)
    return [{"variant": cell.variant.name, "identity": cell.identity.name, "prompt_index": cell.prompt_index,
             "prompt": cell.prompt, "seed": cell.seed, "image": image, "seconds": per_image,
             "peak_memory_mb": record.peak_memory_mb, "memory_kind": record.memory_kind, **values}
            for image, values in zip(record.images, metrics, strict=True)]


def metric_columns(rows: Sequence[dict]) -> list[str]:
    """The metric columns of the rows, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in ROW_FIELDS and k != "notes" and k not in columns]
    return columns


def rows_csv(rows: Sequence[dict]) -> str:
    """The rows as CSV text: the cell fields, every metric column, then the notes (missing cells empty)."""
    columns = [*ROW_FIELDS, *metric_columns(rows), "notes"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    return buffer.getvalue()


def _grouped(rows: Sequence[dict], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row[key]), []).append(row)
    return groups


def comparison_table(rows: Sequence[dict]) -> Table:
    """One row per variant: every metric column and the cost columns, ``mean ± std``, best in bold."""
    return summary_table("Comparison (mean ± std over all images)", "variant", _grouped(rows, "variant"),
                         [*metric_columns(rows), *COST_COLUMNS])


def variant_table(variant: str, rows: Sequence[dict]) -> Table:
    """One variant, one row per identity."""
    return summary_table(f"{variant}: by identity", "identity", _grouped(rows, "identity"),
                         [*metric_columns(rows), *COST_COLUMNS])


# --------------------------------------------------------------------------------------------------
# Contact sheets


def _same_size(images: list[torch.Tensor]) -> torch.Tensor:
    """The images as one batch, resized to the first one's size where they differ."""
    from PIL import Image

    height, width = images[0].shape[1:3]
    resized = []
    for image in images:
        if image.shape[1:3] != (height, width):
            pixels = Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).resize((width, height))
            image = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0)[None]
        resized.append(image)
    return torch.cat(resized)


def write_sheet(path: str, out_dir: str, rows: Sequence[dict]) -> str:
    """A contact sheet of the rows' images with their first ranked metric scores; returns ``path``."""
    from PIL import Image

    from .report import contact_sheet

    columns = [c for c in metric_columns(rows) if ranked(c)][:SHEET_COLUMNS]
    images = _same_size([load_image(os.path.join(out_dir, row["image"])) for row in rows])
    scored = [{"image": index, **{c: row.get(c) for c in columns}} for index, row in enumerate(rows)]
    seeds = len({row["seed"] for row in rows})  # one line per prompt, one tile per seed
    sheet = contact_sheet(images, scored, columns, per_row=max(1, min(seeds, MAX_SHEET_COLUMNS)))
    pixels = (sheet[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


# --------------------------------------------------------------------------------------------------
# Writing everything


def _variant_section(variant: str, rows: list[dict], out_dir: str) -> tuple[str, str, Table]:
    """The variant's Markdown and HTML section (table + contact sheets); writes its sheets and table files."""
    table = variant_table(variant, rows)
    markdown, markup = [f"## {variant}", "", table.markdown()], [f"<h2>{html.escape(variant)}</h2>", table.html()]
    for identity, identity_rows in _grouped(rows, "identity").items():
        name = f"{variant_slug(variant)}__{slug(identity, 40)}.png"
        write_sheet(os.path.join(out_dir, "sheets", name), out_dir, identity_rows)
        markdown.append(f"![{identity}](sheets/{name})\n")
        markup.append(f'<p>{html.escape(identity)}<br><img src="sheets/{html.escape(name)}"></p>')
    return "\n".join(markdown), "\n".join(markup), table


def write_reports(out_dir: str, finished: Sequence[tuple[Cell, CellRecord]], measurer: Measurer,
                  header: str) -> list[dict]:
    """Write results.csv, report.md/html, tables/ and sheets/ from the finished cells; returns the rows."""
    rows: list[dict] = []
    for cell, record in finished:
        metrics = measurer.rows(cell, [os.path.join(out_dir, p) for p in record.images])
        rows += cell_rows(cell, record, metrics)
    atomic_write_text(os.path.join(out_dir, "results.csv"), rows_csv(rows))
    if not rows:
        return rows
    comparison = comparison_table(rows)
    markdown, markup = [f"# Likeness evaluation\n\n{header}\n", comparison.markdown()], [
        f"<h1>Likeness evaluation</h1>\n<p>{html.escape(header)}</p>", comparison.html()]
    for variant, variant_rows in _grouped(rows, "variant").items():
        section_md, section_html, table = _variant_section(variant, variant_rows, out_dir)
        markdown.append(section_md)
        markup.append(section_html)
        base = os.path.join(out_dir, "tables", variant_slug(variant))
        atomic_write_text(base + ".md", table.markdown())
        atomic_write_text(base + ".html", html_page(variant, table.html()))
    atomic_write_text(os.path.join(out_dir, "report.md"), "\n".join(markdown))
    atomic_write_text(os.path.join(out_dir, "report.html"), html_page("Likeness evaluation", "\n".join(markup)))
    return rows
