"""Rich tables for evaluation documents and interpolation curves; the best value per column in bold green."""

from __future__ import annotations

import math

from rich.table import Table
from rich.text import Text

PERCENT = {"accuracy", "f1_weighted", "f1_macro", "mlm_accuracy"}
BEST_STYLE = "bold green"


def format_metric(name: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if name == "tokens":
        return f"{int(value):,}"
    if name in PERCENT:
        return f"{100 * value + 0.0:.2f}%".replace("-0.00%", "0.00%")  # no negative zero in a table
    if name in ("perplexity", "pseudo_perplexity"):
        return f"{value:.2f}" if abs(value) < 1e5 else f"{value:.3e}"
    if name in ("bleu", "chrf"):
        return f"{value:.2f}"
    return f"{value:.4f}"


def render_table(doc: dict, title: str | None = None) -> Table:
    """One row per model (or per alpha for an interpolation curve), one column per metric."""
    curve = bool(doc["rows"]) and "alpha" in doc["rows"][0]
    key = "alpha" if curve else "model"
    if title is None:
        title = (f"{doc.get('name', 'interpolation')} interpolation: {doc['task']}" if curve
                 else f"{doc['task']} on {doc['data']['path']}"
                 + (f", split {doc['data']['split']}" if doc["data"].get("split") else "")
                 + f" ({doc['data']['samples']} samples)")
    table = Table(title=title)
    table.add_column(key, style="cyan", no_wrap=True)
    for m in doc["metrics"]:
        hib = doc["higher_is_better"].get(m)
        arrow = "" if hib is None else (" ↑" if hib else " ↓")
        table.add_column(m + arrow, justify="right")
    # The best value per column, so that ties (e.g. an ensemble equal to a parent) are all highlighted.
    by_key = {r[key]: r for r in doc["rows"]}
    best = {m: by_key[k][m] for m, k in doc.get("best", {}).items() if k in by_key}
    for row in doc["rows"]:
        # Text objects, not markup strings: a model name like "[a]" must print as is.
        cells = [Text(f"{row['alpha']:.2f}" if curve else str(row["model"]))]
        for m in doc["metrics"]:
            is_best = m in best and row.get(m) == best[m]
            cells.append(Text(format_metric(m, row.get(m)), style=BEST_STYLE if is_best else ""))
        table.add_row(*cells)
    captions = []
    if curve and doc.get("barrier"):
        captions.append("barrier: " + ", ".join(f"{m} {format_metric(m, v)}" for m, v in doc["barrier"].items()))
    if doc.get("notes", {}).get("non_finite"):  # an inf or nan cell is explained, never silent
        captions.append(doc["notes"]["non_finite"])
    table.caption = "\n".join(captions) or None
    return table


def render_curve_table(doc: dict, title: str | None = None) -> Table:
    """Alias for interpolation documents (render_table detects them by the alpha column)."""
    return render_table(doc, title)
