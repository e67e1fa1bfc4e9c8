"""Linear-interpolation baseline: metrics along θ(α) = (1-α)·θ_A + α·θ_B, and a plot of the curve.

The "aligned" curve is the same call with B already mapped into A's basis by the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from otfuse_cli.checkpoint.writer import write_file
from otfuse_cli.errors import OtfuseError
from otfuse_cli.evaluation import tasks
from otfuse_cli.evaluation.document import best_of, counting_forwards, forward_passes, non_finite_note
from otfuse_cli.evaluation.metrics import HIGHER_IS_BETTER
from otfuse_cli.runnable import resolve_device, runnable_from_state_dict


# Points on an interpolation line: steps of 0.001 in alpha are finer than any curve needs, and each point is a
# full evaluation; 10**17 was an overflow traceback inside torch.linspace.
MAX_STEPS = 1001

def require_same_layout(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """The arithmetic's own precondition, for state dicts whose configs are gone. Whether two checkpoints
    may be interpolated at all (family, fixed axes, widths) is otfuse_cli.arch.compat.check_interpolatable's
    call; callers holding checkpoints ask it first, so this only fires for direct library use."""
    if set(a) != set(b):
        raise OtfuseError(f"cannot interpolate: the two models hold different tensors "
                          f"(e.g. {sorted(set(a) ^ set(b))[0]!r})")
    for k in a:
        if a[k].shape != b[k].shape:
            raise OtfuseError(f"cannot interpolate: tensor {k!r} has shape {tuple(a[k].shape)} in A but "
                              f"{tuple(b[k].shape)} in B")


def interpolate_state_dicts(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                            alpha: float) -> dict[str, torch.Tensor]:
    """(1-α)·A + α·B on floating tensors (math in float32+, cast back to A's dtype); other tensors from A."""
    out = {}
    for k, ta in a.items():
        if ta.is_floating_point():
            work = torch.promote_types(ta.dtype, torch.float32)
            out[k] = ((1 - alpha) * ta.to(work) + alpha * b[k].to(work)).to(ta.dtype)
        else:  # integer buffers (num_batches_tracked, position ids) are not parameters
            out[k] = ta
    return out


def interpolate(model_a_sd: Mapping[str, torch.Tensor], model_b_sd: Mapping[str, torch.Tensor], like,
                data_path: str | Path, steps: int = 11, *, name: str = "naive", task: str = "auto",
                batch_size: int = 32, max_samples: int | None = None, device: str = "cpu",
                activation: str | None = None, seed: int = 0, num_beams: int = 1, max_length: int = 256,
                columns: dict[str, str] | None = None, split: str | None = None, progress=None) -> dict:
    """Metrics at alpha in linspace(0, 1, steps); `like` is the checkpoint whose architecture both share.
    progress: a report.Progress (steps x batches), or None."""
    from otfuse_cli.report import start

    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= MAX_STEPS:
        raise OtfuseError(f"--steps must be a whole number from 2 to {MAX_STEPS}, got {steps!r}")
    require_same_layout(model_a_sd, model_b_sd)
    dev = resolve_device(device)
    data = tasks.load_eval_data(data_path, max_samples=max_samples, seed=seed, columns=columns, split=split)
    # Build once, then swap weights per alpha: rebuilding an HF model from its config is the slow part.
    runnable = runnable_from_state_dict(model_a_sd, like, activation=activation, device=dev)
    task = tasks.resolve_task(task, data, [("A", runnable)])
    metrics = tasks.TASK_METRICS[task]
    rows = []
    alphas = [round(float(a), 6) for a in torch.linspace(0, 1, steps, dtype=torch.float64)]
    bar = start(progress, f"{name} line", forward_passes(task, data, batch_size, steps))
    for alpha in alphas:
        runnable.load_weights(interpolate_state_dicts(model_a_sd, model_b_sd, alpha))
        label = f"alpha={alpha:.2f}"
        with counting_forwards(task, [(label, runnable)], bar):
            (row,), notes = tasks.score(task, [(label, runnable)], data, batch_size=batch_size,
                                        max_length=max_length, num_beams=num_beams, seed=seed, ensemble=False,
                                        progress=bar)
        rows.append({"alpha": alpha, **row})
    return {
        "task": task,
        "name": name,
        "data": {"path": str(data.path), "samples": data.samples, **data.source},
        "metrics": list(metrics),
        "higher_is_better": {m: HIGHER_IS_BETTER[m] for m in metrics},
        "rows": rows,
        "best": best_of(rows, metrics, key="alpha"),
        "barrier": barrier(rows, metrics),
        "notes": {**notes, "device": str(dev), "steps": steps,
                  "method": "theta(alpha) = (1-alpha)*theta_A + alpha*theta_B on float tensors; integer buffers from A",
                  **non_finite_note(rows, metrics, key="alpha")},
    }


def barrier(rows: list[dict], metrics: list[str]) -> dict[str, float]:
    """Largest worsening over the straight line between the endpoint values (0 when the path is convex-good)."""
    out = {}
    for m in metrics:
        hib = HIGHER_IS_BETTER.get(m)
        if hib is None:
            continue
        m0, m1 = rows[0][m], rows[-1][m]
        gaps = [(r[m] - ((1 - r["alpha"]) * m0 + r["alpha"] * m1)) * (-1 if hib else 1) for r in rows]
        out[m] = float(max(gaps))
    return out


def curve_figure(results: list[dict], metrics: list[str], names: tuple[str, str] = ("model A", "model B")):
    """A matplotlib Figure with one panel per metric (small multiples), one line per curve."""
    import math

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), dpi=100)  # no pyplot: no global state, no display backend
    FigureCanvasAgg(fig)
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, k + 1)
        for r in results:
            ax.plot([row["alpha"] for row in r["rows"]], [row[metric] for row in r["rows"]], marker="o",
                    label=r.get("name", "curve"))
        ax.set_title(metric)
        ax.set_xlabel(f"alpha (0 = {names[0]}, 1 = {names[1]})", fontsize="small")
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize="small")
    fig.suptitle(f"interpolation from {names[0]} to {names[1]}")
    fig.tight_layout()
    return fig


def plot_curve(result: dict | list[dict], path: str | Path, metric: str | None = None, *,
               names: tuple[str, str] = ("model A", "model B"), force: bool = False) -> Path:
    """PNG of every metric (or only `metric`) vs alpha, one panel per metric and one line per interpolation
    result (e.g. naive and aligned), the ends labelled with the models' names. Written through the one atomic
    writer (the user's umask; an existing file replaced only with force, a folder never)."""
    results = [result] if isinstance(result, dict) else list(result)
    if not results:
        raise OtfuseError("nothing to plot")
    metrics = [metric] if metric else [m for m in results[0]["metrics"] if all(m in r["metrics"] for r in results)]
    if any(m not in r["metrics"] for r in results for m in metrics) or not metrics:
        raise OtfuseError(f"metric {metric!r} is not in every curve (have: {', '.join(results[0]['metrics'])})")
    try:
        fig = curve_figure(results, metrics, names)
    except ImportError:
        raise OtfuseError("plotting needs matplotlib: pip install 'otfuse-cli[plot]'") from None
    # no version stamp: reproducible bytes
    return write_file(path, lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": None}), force=force)
