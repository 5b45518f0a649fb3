"""Plain-text summaries of metric dicts for the CLI and logs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):  # counts such as num_queries are not fractions
        return str(value)
    if math.isnan(value):
        return "nan"
    return f"{100.0 * value:.1f}"


def format_metrics_table(
    rows: Mapping[str, Mapping[str, float]], metrics: Sequence[str] | None = None
) -> str:
    """Render ``{run_name: {metric: value}}`` as an aligned plain-text table.

    Rows are runs, columns are ``metrics`` (default: every metric key, in first-seen
    order). Float values are fractions shown as percentages with one decimal; integers
    (counts such as ``num_queries``) are shown as-is; a missing value is ``-``.
    """
    if not rows:
        raise ValueError("rows is empty; pass {run_name: {metric: value}}")
    if metrics is None:
        metrics = list(dict.fromkeys(m for r in rows.values() for m in r))
    metrics = list(metrics)
    if not metrics:
        raise ValueError("no metrics to show: the rows have no keys and metrics is empty")
    header = ["run", *metrics]
    body = [[str(name), *(_cell(r.get(m)) for m in metrics)] for name, r in rows.items()]
    widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(cells[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in body)])
