"""Likeness measurement: the papers' metrics on IMAGE batches, host-independent (face-analysis level).

Public API (the Likeness Metrics node and the ``eval`` command both call it):

- :class:`MetricModels` — the models the metrics use, each loaded from a local folder, never downloaded
  (:meth:`MetricModels.from_folders`);
- :func:`compute_metrics` — one row (``dict``) per generated image: ``"image"`` (its index), one float per
  column of every chosen metric (``None`` where it could not be measured) and ``"notes"`` (why a cell is
  missing, ``"column, column: reason; ..."``);
- :data:`METRICS` — the registry: every metric's name, columns, what it needs and its definition;
- :func:`summarize`, :func:`format_table`, :func:`write_csv`, :func:`write_json`, :func:`contact_sheet`.
"""
from .metrics import (  # noqa: F401
    COPY_PASTE_MARGIN,
    METRICS,
    MetricDefinition,
    MetricModels,
    compute_metrics,
    metric_columns,
    metric_names,
    parse_metric_names,
)
from .report import contact_sheet, format_table, summarize, write_csv, write_json  # noqa: F401
