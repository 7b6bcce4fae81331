"""The ``eval`` command's tables in the papers' layout: one row per method, one column per metric, each
cell ``mean ± std`` over the images, the best value of each column in bold; as Markdown and as HTML.

Why: a ConsistentID or PhotoMaker comparison table is what a user wants to paste next to a paper's; the
same numbers in Markdown (for a README or an issue) and HTML (to open in a browser) come from one model
of the table (:class:`Table`), so the two never disagree.

Best is the highest mean, or the lowest where the metric registry says smaller is better (distances, copy-paste
excess and flag, change outside the mask) and for a cell's cost (time, memory); ties are all bold. Columns the
registry marks as descriptive (the copy-paste check's raw similarities, the mixing readout) are never bold.
A column with fewer than two ranked rows has no best.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Sequence

from .metrics import column_direction
from .report import summarize

COST_COLUMNS = ("seconds", "peak_memory_mb")  # a cell's cost (time per image, peak memory): lower is better
MISSING = "–"


def direction(column: str) -> int:
    """+1 higher is better, -1 lower is better, 0 not ranked."""
    return -1 if column in COST_COLUMNS else column_direction(column)


def ranked(column: str) -> bool:
    return direction(column) != 0


def format_mean_std(mean: float | None, std: float | None, digits: int = 3) -> str:
    """``0.512 ± 0.034``; ``inf`` when the mean is infinite (PSNR of identical crops); ``–`` when missing."""
    if mean is None:
        return MISSING
    if math.isinf(mean):
        return "inf"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


@dataclass
class Table:
    """Row labels, column names, the cells as text and which cells are the column's best."""

    title: str
    row_header: str
    rows: list[str]
    columns: list[str]
    cells: list[list[str]]
    bold: list[list[bool]]

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join([self.row_header, *self.columns]) + " |",
                 "|" + "---|" * (len(self.columns) + 1)]
        for label, cells, bold in zip(self.rows, self.cells, self.bold, strict=True):
            shown = [f"**{c}**" if b else c for c, b in zip(cells, bold, strict=True)]
            lines.append("| " + " | ".join([_markdown_text(label), *shown]) + " |")
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in [self.row_header, *self.columns])
        body = []
        for label, cells, bold in zip(self.rows, self.cells, self.bold, strict=True):
            shown = "".join(f"<td><b>{html.escape(c)}</b></td>" if b else f"<td>{html.escape(c)}</td>"
                            for c, b in zip(cells, bold, strict=True))
            body.append(f"<tr><th>{html.escape(label)}</th>{shown}</tr>")
        return (f"<h3>{html.escape(self.title)}</h3>\n<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
                + "\n".join(body) + "\n</tbody>\n</table>\n")


def _markdown_text(text: str) -> str:
    return text.replace("|", "\\|")


def best_rows(means: Sequence[float | None], lower_is_better: bool) -> set[int]:
    """Indices of the best mean (all of them on a tie, to float rounding); none when fewer than two rows have
    a value."""
    present = [(i, m) for i, m in enumerate(means) if m is not None and not math.isnan(m)]
    if len(present) < 2:
        return set()
    target = min(m for _, m in present) if lower_is_better else max(m for _, m in present)
    return {i for i, m in present if m == target or math.isclose(m, target, rel_tol=1e-9, abs_tol=1e-12)}


def summary_table(title: str, row_header: str, groups: dict[str, list[dict]], columns: Sequence[str],
                  digits: int = 3) -> Table:
    """``groups`` (row label -> its per-image rows) as a table of ``mean ± std`` per column, best in bold."""
    labels = list(groups)
    stats = {label: summarize([{c: row.get(c) for c in columns} for row in rows]) for label, rows in groups.items()}
    cells = [[format_mean_std(stats[label][c]["mean"], stats[label][c]["std"], digits) for c in columns]
             for label in labels]
    bold = [[False] * len(columns) for _ in labels]
    for j, column in enumerate(columns):
        if not ranked(column):
            continue
        for i in best_rows([stats[label][column]["mean"] for label in labels], direction(column) < 0):
            bold[i][j] = True
    return Table(title, row_header, labels, list(columns), cells, bold)


HTML_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:2em}}
th,td{{border:1px solid #aaa;padding:4px 8px;text-align:right}} tbody th{{text-align:left}}
img{{max-width:100%}}</style></head>
<body>
{body}
</body></html>
"""


def html_page(title: str, body: str) -> str:
    return HTML_PAGE.format(title=html.escape(title), body=body)
