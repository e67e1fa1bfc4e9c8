"""Evaluation library behind `otfuse evaluate`: metrics tables, ensembles and interpolation baselines.

The CLI builds RunnableModels (otfuse_cli.runnable) and calls these functions; no typer here.
"""

from otfuse_cli.evaluation.document import best_of, build_document, evaluate_models
from otfuse_cli.evaluation.interpolate import barrier, interpolate, interpolate_state_dicts, plot_curve
from otfuse_cli.evaluation.metrics import HIGHER_IS_BETTER
from otfuse_cli.evaluation.table import format_metric, render_curve_table, render_table
from otfuse_cli.evaluation.tasks import TASK_CHOICES, TASK_METRICS, load_eval_data, resolve_task

__all__ = [
    "evaluate_models", "interpolate", "interpolate_state_dicts", "plot_curve", "render_table",
    "render_curve_table", "format_metric", "best_of", "build_document", "barrier", "load_eval_data",
    "resolve_task", "TASK_CHOICES", "TASK_METRICS", "HIGHER_IS_BETTER",
]
