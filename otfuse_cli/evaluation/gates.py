"""CI gates on an evaluation document: `--fail-under [NAME:]METRIC=VALUE` for higher-is-better metrics,
`--fail-over [NAME:]METRIC=VALUE` for lower-is-better ones (nll, ece, perplexity). A gate names its
direction explicitly, so `--fail-under nll=0.5` (which reads as a lower bound) is refused, not reinterpreted."""

from __future__ import annotations

import math
from dataclasses import dataclass

from otfuse_cli.errors import OtfuseError
from otfuse_cli.evaluation.metrics import HIGHER_IS_BETTER


@dataclass(frozen=True)
class Gate:
    model: str | None  # a row's display name; None: every row
    metric: str
    bound: float
    upper: bool  # True for --fail-over: the metric must stay at or below the bound

    @property
    def flag(self) -> str:
        return "--fail-over" if self.upper else "--fail-under"


def parse_gate(text: str, upper: bool) -> Gate:
    """'accuracy=0.9' or 'fused:accuracy=0.9' -> Gate; the metric's direction must match the flag."""
    flag = "--fail-over" if upper else "--fail-under"
    target, eq, value = text.rpartition("=")
    name, colon, metric = target.rpartition(":")
    try:
        bound = float(value)
    except ValueError:
        bound = math.nan
    if not eq or not metric or (colon and not name) or not math.isfinite(bound):
        raise OtfuseError(f"{flag} takes [MODEL:]METRIC=VALUE, e.g. accuracy=0.9 or fused:accuracy=0.9; "
                          f"got {text!r}")
    direction = HIGHER_IS_BETTER.get(metric)
    if direction is None:
        known = ", ".join(m for m, d in HIGHER_IS_BETTER.items() if d is not None)
        raise OtfuseError(f"{flag}: unknown metric {metric!r}; choose from {known}")
    if direction == upper:  # higher-is-better needs a lower bound, lower-is-better an upper bound
        other = "--fail-under" if upper else "--fail-over"
        raise OtfuseError(f"{flag} {text}: {metric} is {'higher' if direction else 'lower'}-is-better; "
                          f"gate it with {other} {text}")
    return Gate(name if colon else None, metric, bound, upper)


def check_gate_names(gates: list[Gate], rows: list[str], task: str) -> None:
    """Before any model is read: every named row exists, and with an explicit --task every metric is one of
    its metrics (check_applicable repeats both on the document once --task auto is resolved)."""
    from otfuse_cli.evaluation.tasks import TASK_METRICS

    for g in gates:
        if g.model is not None and g.model not in rows:
            raise OtfuseError(f"{g.flag}: no model named {g.model!r}; rows are {', '.join(map(str, rows))}")
        scored = TASK_METRICS.get(task, []) + (TASK_METRICS["mlm"] if task == "lm" else [])  # lm: masked too
        if task in TASK_METRICS and g.metric not in scored:
            raise OtfuseError(f"{g.flag}: {g.metric} is not a {task} metric; it scores {', '.join(scored)}")


def check_applicable(gates: list[Gate], doc: dict) -> None:
    """Every gate's metric is scored by this task and its model is a row (exit 2, not a silent pass)."""
    names = [r["model"] for r in doc.get("rows", [])]
    for g in gates:
        if g.metric not in doc.get("metrics", []):
            raise OtfuseError(f"{g.flag}: {g.metric} is not a {doc.get('task')} metric; this evaluation scores "
                              f"{', '.join(doc.get('metrics', []))}")
        if g.model is not None and g.model not in names:
            raise OtfuseError(f"{g.flag}: no model named {g.model!r}; rows are {', '.join(map(str, names))}")


def missed(gates: list[Gate], doc: dict) -> list[str]:
    """One description per (row, gate) that misses its bound; a non-finite score always misses."""
    out = []
    for g in gates:
        for row in doc.get("rows", []):
            if g.model is not None and row["model"] != g.model:
                continue
            value = row.get(g.metric)
            ok = isinstance(value, (int, float)) and math.isfinite(value) and \
                (value <= g.bound if g.upper else value >= g.bound)
            if not ok:
                word = "above" if g.upper else "below"
                out.append(f"{row['model']}: {g.metric} {value:.6g} is {word} {g.bound:g} ({g.flag})"
                           if isinstance(value, (int, float)) else f"{row['model']}: {g.metric} missing ({g.flag})")
    return out
