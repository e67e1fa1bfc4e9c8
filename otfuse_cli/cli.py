"""The `otfuse` command line: a thin face over the library. Parses options, calls the library, renders.

Adding a command is one decorated function:

    @app.command()
    def align(model: list[str] = typer.Argument(...), json_out: bool = JSON_OPTION) -> None:
        ...  # raise OtfuseError for bad input; render with otfuse_cli.report

OtfuseError anywhere in a command becomes `error: <message>` on stderr and exit code 2 (see _Group).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Optional

import typer
from typer.core import TyperGroup

from otfuse_cli import __version__, report
from otfuse_cli.errors import OtfuseError

EXIT_INTERRUPTED = 130

# Usage errors: typer >= 0.24 vendors click (typer.TyperException); older typer raises click's own.
_USAGE_ERRORS: tuple[type[BaseException], ...] = (typer.TyperException,) if hasattr(typer, "TyperException") else ()
try:
    import click

    _USAGE_ERRORS += (click.ClickException,)
except ImportError:  # pragma: no cover
    pass


@contextmanager
def _one_line_errors():
    """OtfuseError / usage errors / Ctrl-C -> one `error: ...` line on stderr and an exit code."""
    try:
        yield
    except OtfuseError as e:
        report.error_line(str(e))
        raise typer.Exit(e.exit_code) from None
    except _USAGE_ERRORS as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            raise  # the framework prints the help
        sub = getattr(e, "ctx", None)
        hint = f" (see '{sub.command_path} --help')" if sub is not None else ""
        report.error_line(e.format_message() + hint)
        raise typer.Exit(getattr(e, "exit_code", 2)) from None
    except KeyboardInterrupt:
        report.error_line("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None


class _Group(TyperGroup):
    """Applies _one_line_errors to parsing and to every command.

    Done in the group (not only in main()) so that `python -m otfuse_cli`, the console script and typer's
    CliRunner all behave the same.
    """

    def parse_args(self, ctx, args):
        with _one_line_errors():
            return super().parse_args(ctx, args)

    def invoke(self, ctx):
        with _one_line_errors():
            return super().invoke(ctx)


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fuse neural-network checkpoints with optimal transport.",
)

# Shared option declarations, reused by every command.
JSON_OPTION = typer.Option(False, "--json", help="Print one JSON document on stdout instead of tables.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"otfuse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Show the version and exit."),
) -> None:
    """Fuse neural-network checkpoints with optimal transport."""


@app.command()
def inspect(
    models: list[str] = typer.Argument(..., metavar="MODEL...",
                                       help="Checkpoints: .safetensors, sharded index, HF folder, .bin/.pt."),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor with its shape and dtype."),
    spaces: bool = typer.Option(False, "--spaces", help="Show the neuron spaces (Spec) that alignment moves."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Summarise checkpoints; with two or more, say whether their layouts can be fused."""
    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli.inspect import compare, summarize
    from otfuse_cli.arch import build_spec

    ckpts = [open_checkpoint(m) for m in models]
    summaries = [summarize(c) for c in ckpts]
    comparison = compare(ckpts) if len(ckpts) >= 2 else None
    specs = [build_spec(c) for c in ckpts] if spaces else []
    if json_out:
        if not tensors:
            for s in summaries:
                del s["tensors"]
        for s, spec in zip(summaries, specs):
            s["spaces"] = spec.to_json()
        doc: dict = {"models": summaries}
        if comparison is not None:
            doc["comparison"] = comparison
        report.print_json(doc)
    else:
        report.inspect_tables(summaries, comparison, tensors=tensors)
        for spec in specs:
            report.console.print(report.spaces_table(spec.to_json(), spec.family, spec.fixed_note))


# Options shared by `align` and `fuse` (and `compress`): how plans are computed.
MODELS_ARG = typer.Argument(..., metavar="MODEL...", help="Two or more checkpoints (files or HF folders).")
ALIGN_OPT = typer.Option("weights", "--align", help="weights (no data) or activations (needs --data).")
SOLVER_OPT = typer.Option("exact", "--solver", help="exact (assignment / network simplex) or sinkhorn (soft).")
REG_OPT = typer.Option(0.01, "--reg", help="Sinkhorn regularisation, relative to the mean cost.")
METRIC_OPT = typer.Option("sqeuclidean", "--metric", help="Ground metric: sqeuclidean or cosine.")
MARGINALS_OPT = typer.Option("uniform", "--marginals", help="Support masses: uniform, l1 or l2 (neuron norm).")
COST_NORM_OPT = typer.Option("mean", "--cost-norm", help="Scale costs by their mean or max (or none) before solving.")
REFINE_OPT = typer.Option(5, "--refine", help="Extra passes over all spaces until plans stop changing.")
ANCHOR_OPT = typer.Option(0, "--anchor", help="Index of the model whose basis and widths the result takes.")
DEVICE_OPT = typer.Option("auto", "--device", help="auto, cpu or cuda (forward passes and costs).")
DATA_OPT = typer.Option(None, "--data", help="Sample inputs for --align activations (jsonl/csv/tsv/txt/npz/safetensors).")
SAMPLES_OPT = typer.Option(256, "--samples", help="Number of sample inputs for activations.")
SEED_OPT = typer.Option(0, "--seed", help="Seed for sampling inputs and tokens.")
MAX_TOKENS_OPT = typer.Option(4096, "--max-tokens", help="Cap on activation rows (tokens/positions) kept per space.")
STANDARDIZE_OPT = typer.Option("zscore", "--standardize", help="Activation standardisation: none, center or zscore.")
ACTIVATION_OPT = typer.Option(None, "--activation", help="relu, gelu or tanh for bare MLP/CNN/ResNet state dicts.")
POST_ACT_OPT = typer.Option(False, "--post-activation", help="Match MLP/CNN units after the nonlinearity.")
MAX_LENGTH_OPT = typer.Option(128, "--max-length", help="Token limit per text sample.")
FORCE_OPT = typer.Option(False, "--force", help="Overwrite an existing output.")


def _align_options(align, solver, reg, metric, marginals, refine, cost_norm="mean"):
    from otfuse_cli.align.engine import AlignOptions

    return AlignOptions(align=align, solver=solver, reg=reg, metric=metric, marginals=marginals, refine=refine,
                        cost_norm=cost_norm)


def _data_options(align, data, samples, seed, max_tokens, standardize, activation, post_activation, max_length,
                  device) -> dict:
    if align == "activations" and not data:
        raise OtfuseError("--align activations needs --data FILE with sample inputs")
    if align != "activations":
        return {}
    return {"data": data, "samples": samples, "seed": seed, "max_tokens": max_tokens, "standardize": standardize,
            "activation": activation, "post_activation": post_activation, "max_length": max_length,
            "device": device}


@app.command()
def align(
    models: list[str] = MODELS_ARG,
    output: str = typer.Option(..., "-o", "--output", help="Plan file to write (.safetensors)."),
    align_by: str = ALIGN_OPT, solver: str = SOLVER_OPT, reg: float = REG_OPT, metric: str = METRIC_OPT,
    marginals: str = MARGINALS_OPT, refine: int = REFINE_OPT, cost_norm: str = COST_NORM_OPT,
    anchor: int = ANCHOR_OPT,
    data: Optional[str] = DATA_OPT, samples: int = SAMPLES_OPT, seed: int = SEED_OPT,
    max_tokens: int = MAX_TOKENS_OPT, standardize: str = STANDARDIZE_OPT, activation: Optional[str] = ACTIVATION_OPT,
    post_activation: bool = POST_ACT_OPT, max_length: int = MAX_LENGTH_OPT, device: str = DEVICE_OPT,
    force: bool = FORCE_OPT, json_out: bool = JSON_OPTION,
) -> None:
    """Compute transport plans that map every model onto the anchor and write them to a plan file."""
    from otfuse_cli.fuse import align_checkpoints

    options = _align_options(align_by, solver, reg, metric, marginals, refine, cost_norm)
    extra = _data_options(align_by, data, samples, seed, max_tokens, standardize, activation, post_activation,
                          max_length, device)
    with report.SpaceProgress(None, enabled=not json_out) as progress:
        result = align_checkpoints(models, output, anchor=anchor, options=options, force=force,
                                   on_space=progress, **extra)
    if json_out:
        report.print_json(result)
    else:
        report.console.print(report.alignment_table(result["spaces"], f"plans → {result['output']}"))


@app.command()
def fuse(
    models: list[str] = MODELS_ARG,
    output: str = typer.Option(..., "-o", "--output", help="Fused checkpoint (file or folder, like the anchor)."),
    method: str = typer.Option("ot", "--method", help="ot (align, then average) or average (vanilla baseline)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Per-model weights, e.g. 0.5,0.5."),
    plan: Optional[str] = typer.Option(None, "--plan", help="Reuse a plan file written by `otfuse align`."),
    dtype: str = typer.Option("keep", "--dtype", help="keep, float32, float16 or bfloat16."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Shard folder outputs above this size."),
    repair_bn: bool = typer.Option(False, "--repair-bn", help="Re-estimate BatchNorm statistics of the fused "
                                                              "model on --data (CNNs, ResNets)."),
    align_by: str = ALIGN_OPT, solver: str = SOLVER_OPT, reg: float = REG_OPT, metric: str = METRIC_OPT,
    marginals: str = MARGINALS_OPT, refine: int = REFINE_OPT, cost_norm: str = COST_NORM_OPT,
    anchor: int = ANCHOR_OPT,
    data: Optional[str] = DATA_OPT, samples: int = SAMPLES_OPT, seed: int = SEED_OPT,
    max_tokens: int = MAX_TOKENS_OPT, standardize: str = STANDARDIZE_OPT, activation: Optional[str] = ACTIVATION_OPT,
    post_activation: bool = POST_ACT_OPT, max_length: int = MAX_LENGTH_OPT, device: str = DEVICE_OPT,
    force: bool = FORCE_OPT, json_out: bool = JSON_OPTION,
) -> None:
    """Fuse two or more models: align them onto the anchor with OT, then average with weights."""
    from otfuse_cli.fuse import fuse_checkpoints

    options = _align_options(align_by, solver, reg, metric, marginals, refine, cost_norm)
    extra = _data_options(align_by, data, samples, seed, max_tokens, standardize, activation, post_activation,
                          max_length, device) if method == "ot" and not plan else {}
    command_options = {"models": models, "seed": seed, "device": device,
                       "max_shard_size": max_shard_size, "activation": activation}
    with report.SpaceProgress(None, enabled=not json_out) as progress:
        result = fuse_checkpoints(models, output, anchor=anchor, weights=weights, method=method, options=options,
                                  plan_file=plan, dtype=dtype, max_shard_size=max_shard_size, force=force,
                                  command_options=command_options, on_space=progress, repair_bn=repair_bn,
                                  repair_data=data, **extra)
    if json_out:
        report.print_json(result)
    else:
        if result["spaces"]:
            report.console.print(report.alignment_table(result["spaces"], "alignment"))
        report.console.print(f"[bold green]fused[/] {len(models)} {result['family']} models "
                             f"({result['method']}) → {escape_path(result['output'])}")


def _display_names(paths: list[str]) -> list[str]:
    """Short row names (folder or file stem); full paths when those collide."""
    from pathlib import Path

    names = [Path(p.rstrip("/")).stem or p for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


@app.command()
def evaluate(
    models: list[str] = typer.Argument(None, metavar="MODEL...", help="Checkpoints to score, one row each."),
    data: str = typer.Option(..., "--data", help="Evaluation data: jsonl/csv/tsv (text[, text_pair], label | "
                                                 "source, target | text) or npz/safetensors (x, y)."),
    task: str = typer.Option("auto", "--task", help="auto, classification, lm or translation."),
    batch_size: int = typer.Option(32, "--batch-size"),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Seeded subsample of the data."),
    ensemble: bool = typer.Option(False, "--ensemble", help="Add the prediction ensemble (averaged probabilities)."),
    ensemble_of: Optional[str] = typer.Option(None, "--ensemble-of", metavar="I,J",
                                              help="Ensemble only these models (indices), e.g. the parents 0,1."),
    interpolate: Optional[tuple[str, str]] = typer.Option(None, "--interpolate", metavar="A B",
                                                          help="Score the straight line between two parents."),
    steps: int = typer.Option(11, "--steps", help="Points on the interpolation line."),
    aligned: bool = typer.Option(False, "--aligned", help="Also the line after aligning B onto A (weights)."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Draw the interpolation curves to a PNG."),
    num_beams: int = typer.Option(1, "--num-beams", help="Beam size for translation (1 = greedy)."),
    max_length: int = typer.Option(256, "--max-length", help="Token limit per text."),
    activation: Optional[str] = ACTIVATION_OPT, seed: int = SEED_OPT, device: str = DEVICE_OPT,
    json_out: bool = JSON_OPTION,
) -> None:
    """Metrics per model (classification: accuracy, weighted/macro F1, ECE with 15 equal-width confidence
    bins, NLL; lm: perplexity, or MLM accuracy and pseudo-perplexity; translation: BLEU and chrF)."""
    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli.evaluate import (evaluate_models, interpolate as interpolate_line, plot_curve,
                                     render_curve_table, render_table)
    from otfuse_cli.runnable import load_runnable

    models = list(models or [])
    if not models and not interpolate:
        raise OtfuseError("give at least one MODEL, or --interpolate A B")
    opts = dict(batch_size=batch_size, max_samples=max_samples, device=device, seed=seed, num_beams=num_beams,
                max_length=max_length)
    doc: dict = {}
    if models:
        runnables = [(n, load_runnable(open_checkpoint(p), activation=activation))
                     for n, p in zip(_display_names(models), models)]
        members: bool | list[int] = ensemble
        if ensemble_of:
            try:
                members = [int(i) for i in ensemble_of.split(",")]
            except ValueError:
                raise OtfuseError(f"--ensemble-of takes model indices like 0,1, got {ensemble_of!r}") from None
        doc = evaluate_models(runnables, data, task=task, ensemble=members, **opts)
    curves = []
    if interpolate:
        from otfuse_cli.fuse import aligned_parent

        a = open_checkpoint(interpolate[0])
        b = open_checkpoint(interpolate[1])
        curves.append(interpolate_line(a.state_dict(), b.state_dict(), a, data, steps, name="naive", task=task,
                                       activation=activation, **opts))
        if aligned:
            sa, sb, like = aligned_parent(list(interpolate))
            curves.append(interpolate_line(sa, sb, like, data, steps, name="aligned", task=task,
                                           activation=activation, **opts))
        if plot:
            plot_curve(curves, plot)
    if json_out:
        report.print_json({**doc, **({"interpolation": curves} if curves else {})} if doc else
                          {"interpolation": curves})
        return
    if doc:
        report.console.print(render_table(doc))
        for key, note in doc.get("notes", {}).items():
            if "signature" in key:
                report.console.print(f"[dim]{key}: {escape_path(str(note))}[/]")
    for curve in curves:
        report.console.print(render_curve_table(curve))
    if plot and curves:
        report.console.print(f"plot → {escape_path(plot)}")


@app.command()
def compress(
    model: str = typer.Argument(..., metavar="MODEL", help="Checkpoint to shrink (file or HF folder)."),
    output: str = typer.Option(..., "-o", "--output", help="Compressed checkpoint (file or folder, like MODEL)."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Keep this fraction (0<R<1) of every compressible "
                                                                "space."),
    width: Optional[list[str]] = typer.Option(None, "--width", metavar="KIND=N",
                                              help="Target width by space kind (hidden, channel, ffn, heads = KV "
                                                   "groups) or space name (0.ffn); repeatable."),
    method: str = typer.Option("ot", "--method", help="ot (merge clusters of neurons), magnitude or random (prune)."),
    dtype: str = typer.Option("keep", "--dtype", help="keep, float32, float16 or bfloat16."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Shard folder outputs above this size."),
    align_by: str = ALIGN_OPT, metric: str = METRIC_OPT, data: Optional[str] = DATA_OPT,
    samples: int = SAMPLES_OPT, seed: int = typer.Option(0, "--seed", help="Seed for clustering, --method random "
                                                                          "and sampling inputs."),
    max_tokens: int = MAX_TOKENS_OPT,
    standardize: str = typer.Option("none", "--standardize", help="Activation standardisation: none (merging "
                                                                  "averages raw pre-activations), center or zscore."),
    activation: Optional[str] = ACTIVATION_OPT, post_activation: bool = POST_ACT_OPT,
    max_length: int = MAX_LENGTH_OPT, device: str = DEVICE_OPT, force: bool = FORCE_OPT,
    json_out: bool = JSON_OPTION,
) -> None:
    """Shrink a model's hidden/channel/FFN/head widths by merging neurons with OT clustering (or pruning)."""
    from otfuse_cli.compress import compress_checkpoint

    options = _align_options(align_by, "exact", 0.01, metric, "uniform", 0)
    extra = _data_options(align_by, data, samples, seed, max_tokens, standardize, activation, post_activation,
                          max_length, device) if method == "ot" else {}
    command_options = {"model": model, "seed": seed, "device": device, "max_shard_size": max_shard_size,
                       "activation": activation}
    with report.SpaceProgress(None, enabled=not json_out) as progress:
        result = compress_checkpoint(model, output, ratio=ratio, widths=width, method=method, options=options,
                                     seed=seed, dtype=dtype, max_shard_size=max_shard_size, force=force,
                                     command_options=command_options, on_space=progress,
                                     **{k: v for k, v in extra.items() if k != "seed"})
    if json_out:
        report.print_json(result)
    else:
        report.console.print(report.compress_table(result))


def escape_path(path: str) -> str:
    from rich.markup import escape

    return escape(path)


def main() -> None:
    """Console-script entry point (`otfuse`) and `python -m otfuse_cli`."""
    try:
        app(prog_name="otfuse")
    except OtfuseError as e:  # raised outside a command (e.g. while parsing): same contract
        report.error_line(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        report.error_line("interrupted")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
