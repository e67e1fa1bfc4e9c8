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
                progress=None) -> dict:
    """Metrics at alpha in linspace(0, 1, steps); `like` is the checkpoint whose architecture both share.
    progress: a report.Progress (steps x batches), or None."""
    from otfuse_cli.report import start

    if steps < 2:
        raise OtfuseError(f"steps must be at least 2, got {steps}")
    require_same_layout(model_a_sd, model_b_sd)
    dev = resolve_device(device)
    data = tasks.load_eval_data(data_path, max_samples=max_samples, seed=seed)
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
        with counting_forwards([(label, runnable)], bar):
            (row,), notes = tasks.score(task, [(label, runnable)], data, batch_size=batch_size,
                                        max_length=max_length, num_beams=num_beams, seed=seed, ensemble=False)
        rows.append({"alpha": alpha, **row})
    return {
        "task": task,
        "name": name,
        "data": {"path": str(data.path), "samples": data.samples},
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


def plot_curve(result: dict | list[dict], path: str | Path, metric: str | None = None, *,
               force: bool = False) -> Path:
    """PNG of metric vs alpha, one line per interpolation result (e.g. naive and aligned). Written through the
    one atomic writer: an existing file is replaced only with force, a folder never."""
    results = [result] if isinstance(result, dict) else list(result)
    if not results:
        raise OtfuseError("nothing to plot")
    metric = metric or results[0]["metrics"][0]
    if any(metric not in r["metrics"] for r in results):
        raise OtfuseError(f"metric {metric!r} is not in every curve (have: {', '.join(results[0]['metrics'])})")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise OtfuseError("plotting needs matplotlib: pip install 'otfuse-cli[plot]'") from None
    fig = Figure(figsize=(6, 4), dpi=100)  # no pyplot: no global state, no display backend
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in results:
        ax.plot([row["alpha"] for row in r["rows"]], [row[metric] for row in r["rows"]], marker="o",
                label=r.get("name", "curve"))
    ax.set_xlabel("alpha (0 = model A, 1 = model B)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} along the interpolation path")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    # no version stamp: reproducible bytes
    return write_file(path, lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": None}), force=force)
