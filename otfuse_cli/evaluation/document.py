"""`evaluate_models`: score several runnable models on one data file and build the stable JSON document."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from otfuse_cli.data import counting_truncation, truncation_note
from otfuse_cli.errors import OtfuseError
from otfuse_cli.evaluation import tasks
from otfuse_cli.evaluation.metrics import HIGHER_IS_BETTER
from otfuse_cli.runnable import resolve_device


def best_of(rows: list[dict], metrics: list[str], key: str = "model") -> dict[str, Any]:
    """metric -> the row's `key` with the best value (first on ties); count metrics are skipped."""
    out = {}
    for name in metrics:
        hib = HIGHER_IS_BETTER.get(name)
        vals = [(r[name], r[key]) for r in rows if isinstance(r.get(name), (int, float)) and r[name] == r[name]]
        if hib is None or not vals:
            continue
        pick = max if hib else min
        target = pick(v for v, _ in vals)
        out[name] = next(k for v, k in vals if v == target)
    return out


def non_finite_note(rows: list[dict], metrics: list[str], key: str = "model") -> dict[str, str]:
    """A note naming every metric that is not a finite number (a perplexity can overflow to inf), so that
    the table's inf and the JSON's null are never silent."""
    bad = [f"{r[key]}: {m}" for r in rows for m in metrics
           if isinstance(r.get(m), float) and not math.isfinite(r[m])]
    return {"non_finite": "not a finite number (null in --json): " + ", ".join(bad)} if bad else {}


def forward_passes(task: str, data: tasks.EvalData, batch_size: int, models: int) -> int | None:
    """How many forward passes scoring makes, where that is known up front: classification runs each model
    once per batch, and translation counts generated batches; the other tasks (masked pseudo-likelihood, causal
    LM) make a data-dependent number of passes."""
    if task in ("classification", "translation"):  # translation: one generate call per batch
        return models * math.ceil(data.samples / batch_size)
    return None


@contextmanager
def counting_forwards(task: str, models, progress_task):
    """Advance progress_task after every forward pass of each model's top module (hooks removed on exit).
    Translation is counted per generated batch by its scorer instead (a pass is one decoding step)."""
    counted = [] if task == "translation" else models
    handles = [m.module.register_forward_hook(lambda *_, name=name: progress_task.advance(detail=name))
               for name, m in counted if hasattr(getattr(m, "module", None), "register_forward_hook")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def build_document(task: str, data: tasks.EvalData, rows: list[dict], notes: dict) -> dict:
    metrics = tasks.TASK_METRICS[task]
    notes = {**notes, **non_finite_note(rows, metrics)}
    return {
        "task": task,
        "data": {"path": str(data.path), "samples": data.samples, **data.source},
        "metrics": list(metrics),
        "higher_is_better": {m: HIGHER_IS_BETTER[m] for m in metrics},
        "rows": rows,
        "best": best_of(rows, metrics),
        "notes": notes,
    }


def evaluate_models(models: list[tuple[str, Any]], data_path: str | Path, *, task: str = "auto",
                    batch_size: int = 32, max_samples: int | None = None, device: str = "cpu",
                    ensemble: bool = False, num_beams: int = 1, seed: int = 0, max_length: int = 256,
                    columns: dict[str, str] | None = None, split: str | None = None, progress=None) -> dict:
    """Score each (name, RunnableModel) on the data; see the module docs of `tasks` for the metrics.
    columns: {"source": "en", "target": "de"} reads the data's own column names as the standard fields.
    split: the split of a DatasetDict folder, a folder of split shards or a cached dataset id.
    progress: a report.Progress (models x batches), or None."""
    from otfuse_cli.report import start

    if not models:
        raise OtfuseError("no models to evaluate")
    names = [n for n, _ in models]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise OtfuseError(f"two models are named {dup!r}; give each a distinct name")
    if ensemble:
        members = range(len(models)) if ensemble is True else list(ensemble)
        if bad := [i for i in members if not 0 <= i < len(models)]:
            raise OtfuseError(f"--ensemble-of: index {bad[0]} is out of range for {len(models)} models "
                              f"(0 to {len(models) - 1})")
        if len(set(members)) < 2:
            raise OtfuseError("--ensemble needs at least two models (of those listed)")
        if tasks.ENSEMBLE in names:
            raise OtfuseError(f"a model may not be named {tasks.ENSEMBLE!r} together with --ensemble")
    for flag, value in (("--batch-size", batch_size), ("--num-beams", num_beams), ("--max-length", max_length)):
        if value < 1:  # the command line refuses these while parsing; library calls land here
            raise OtfuseError(f"{flag} must be at least 1, got {value}")
    dev = resolve_device(device)
    data = tasks.load_eval_data(data_path, max_samples=max_samples, seed=seed, columns=columns, split=split)
    task = tasks.resolve_task(task, data, models)
    for _, m in models:
        m.to(dev)
    runs = len(models) + (task == "translation" and bool(ensemble))  # an ensemble translates once more
    bar = start(progress, "evaluating", forward_passes(task, data, batch_size, runs))
    with counting_forwards(task, models, bar), counting_truncation() as cut:
        rows, notes = tasks.score(task, models, data, batch_size=batch_size, max_length=max_length,
                                  ensemble=ensemble, num_beams=num_beams, seed=seed, progress=bar)
    notes = {**notes, "device": str(dev)}
    if note := truncation_note(cut, "texts" if len(models) == 1 else "texts (counted once per model)"):
        notes["truncated"] = note + " (the model's position limit or --max-length)"
    if max_samples is not None:
        notes["subsample_seed"] = int(seed)
    return build_document(task, data, rows, notes)


def evaluate(models: list[str] | dict[str, str], data: str | Path, *, task: str = "auto",
             ensemble: bool | list[int] = False, activation: str | None = None, batch_size: int = 32,
             max_samples: int | None = None, device: str = "cpu", num_beams: int = 1, seed: int = 0,
             max_length: int = 256, columns: dict[str, str] | None = None, split: str | None = None) -> dict:
    """Score checkpoints (paths, or {row name: path}) on a data file (or a parquet/Arrow dataset, `split` of a
    DatasetDict or cached dataset id): the document `otfuse evaluate --json` prints (task, metrics, rows, best,
    notes)."""
    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli.runnable import load_runnable

    named = models.items() if isinstance(models, dict) else ((Path(str(p).rstrip("/")).stem or str(p), p)
                                                              for p in models)
    runnables = [(name, load_runnable(open_checkpoint(path), activation=activation)) for name, path in named]
    return evaluate_models(runnables, data, task=task, ensemble=ensemble, batch_size=batch_size,
                           max_samples=max_samples, device=device, num_beams=num_beams, seed=seed,
                           max_length=max_length, columns=columns, split=split)
