"""The `otfuse` command line: a thin face over the library. Parses options, calls the library, renders.

Adding a command is one decorated function:

    @app.command()
    def align(model: list[str] = typer.Argument(...), json_out: bool = JSON_OPTION) -> None:
        ...  # raise OtfuseError for bad input; render with otfuse_cli.report

OtfuseError anywhere in a command becomes `error: <message>` on stderr and exit code 2 (see _Group).
"""

from __future__ import annotations

import enum
import sys
from contextlib import contextmanager
from dataclasses import replace
from typing import Optional

import typer
from typer.core import TyperGroup

from otfuse_cli import __version__, distributed, interrupts, report
from otfuse_cli import threads as threads_policy
from otfuse_cli.cli_options import explicit_flags, refuse_unused, with_options
from otfuse_cli.errors import OtfuseError
from otfuse_cli.options import ACTIVATIONS, AlignOptions, DataOptions, MergeOptions, OutputOptions

EXIT_INTERRUPTED = interrupts.EXIT_CODE
EXIT_GATE = 3  # a CI gate failed (inspect --check, evaluate --fail-under): the inputs were fine

# Usage errors: typer >= 0.24 vendors click (typer.TyperException); older typer raises click's own.
_USAGE_ERRORS: tuple[type[BaseException], ...] = (typer.TyperException,) if hasattr(typer, "TyperException") else ()
try:
    import click

    _USAGE_ERRORS += (click.ClickException,)
except ImportError:  # pragma: no cover
    pass


@contextmanager
def _interrupt_signals():
    """SIGINT and SIGTERM end the command with exit 130 while the CLI runs (otfuse_cli.interrupts); the outermost
    use installs the handler (the entry point already has, before the heavy imports)."""
    previous = interrupts.install()
    try:
        yield
    finally:
        interrupts.restore(previous)


def _interrupted_exit() -> typer.Exit:
    interrupts.report()
    return typer.Exit(EXIT_INTERRUPTED)


@contextmanager
def _one_line_errors(agree: bool = False):
    """OtfuseError / usage errors / Ctrl-C / SIGTERM -> one `error: ...` line on stderr and an exit code.
    agree (a command's run): the ranks of a torchrun launch agree on the outcome at the end, so a rank that
    failed makes every rank fail (otfuse_cli.distributed; nothing for one process)."""
    with _interrupt_signals():
        try:
            yield
            if agree:
                distributed.agree()
        except KeyboardInterrupt:
            raise _interrupted_exit() from None
        except OtfuseError as e:
            if interrupts.arrived():
                raise _interrupted_exit() from None
            if agree:
                try:
                    distributed.agree(e)
                except OtfuseError as other:
                    e = other
            report.error_line(str(e))
            raise typer.Exit(e.exit_code) from None
        except _USAGE_ERRORS as e:
            if type(e).__name__ == "NoArgsIsHelpError":
                raise  # the framework prints the help
            sub = getattr(e, "ctx", None)
            hint = f" (see '{sub.command_path} --help')" if sub is not None else ""
            report.error_line(e.format_message() + hint)
            raise typer.Exit(getattr(e, "exit_code", 2)) from None
        except Exception as e:
            if interrupts.arrived():  # whatever a library made of the KeyboardInterrupt
                raise _interrupted_exit() from None
            if agree:
                distributed.agree(e)
            raise
        if interrupts.arrived():  # the interrupt was swallowed and the command ran on: still say so
            raise _interrupted_exit()


class _Group(TyperGroup):
    """Applies _one_line_errors to parsing and to every command.

    Done in the group (not only in main()) so that `python -m otfuse_cli`, the console script and typer's
    CliRunner all behave the same.
    """

    def parse_args(self, ctx, args):
        with _one_line_errors():
            return super().parse_args(ctx, args)

    def invoke(self, ctx):
        with _one_line_errors(agree=True):
            return super().invoke(ctx)

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            _name_values(command, ctx)
        return command


# typer labels values by Python type (`<int range>`, `<list[str]>`, `<str>`); help names them as click does.
_VALUE_NAMES = {"int": "N", "int range": "N", "float": "X", "float range": "X", "str": "TEXT"}


def _click_style(label: str | None) -> str | None:
    inner = (label or "").strip("<>")
    return _VALUE_NAMES.get(inner, f"[{inner}]") if inner else None


def _name_values(command, ctx) -> None:
    """Set once per parameter (the group hands out the same command object each time it is asked)."""
    for param in command.params:
        if param.param_type_name == "argument":
            param.display_type_rich = lambda ctx: None  # the metavar (MODEL...) says it all
        elif param.metavar is None and not param.is_flag:
            param.metavar = _click_style(param.display_type(ctx))


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: choices as [a|b], flags without a type, readable at 80 columns
    help="Fuse neural-network checkpoints with optimal transport.",
)

# Shared option declarations, reused by every command.
JSON_OPTION = typer.Option(False, "--json", help="Print one JSON document on stdout instead of tables.")
DRY_RUN_OPT = typer.Option(False, "--dry-run", help="Print the plan of work (spaces, widths, cost FLOPs, an "
                           "estimate of peak memory) from the checkpoints' headers and stop: reads no weight, "
                           "writes nothing.")
ALLOW_MISMATCH_OPT = typer.Option(
    False, "--allow-config-mismatch", help="Fuse parents whose config.json differs in fields that change the "
    "function (activation, norm epsilon, positions, special tokens) or whose tokenizer differs; the result runs "
    "with the anchor's config.")


def require_models(*paths) -> None:
    """A model path that does not exist is said before anything heavy is imported (torch takes seconds),
    in the words the reader would use. A Hugging Face id (org/name[@revision]) that is not a local path is
    resolved here, through huggingface_hub's cache (otfuse_cli.hub): a missing one is said here too."""
    from otfuse_cli.hub import local_path
    from otfuse_cli.inputs import check_input

    for p in paths:  # also refuses FIFOs, devices and names too long for the file system, in one line
        if p is not None:
            check_input(local_path(p), "model", folder=True, missing=f"no such file or folder: {p}")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"otfuse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Show the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no tables: only errors (and the "
                                                            "JSON document with --json)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also a timed line per step on stderr "
                                                                "(e.g. each space's solve)."),
    threads: Optional[str] = typer.Option(None, "--threads", metavar="N",
                                          help=f"Compute threads (default: ${threads_policy.ENV}, else the cores "
                                               "this process may use: affinity and cgroup quota). On a machine "
                                               "busy with other work, 1 is cheaper."),
) -> None:
    """Fuse neural-network checkpoints with optimal transport."""
    if quiet and verbose:
        raise OtfuseError("--quiet and --verbose exclude each other; give one")
    report.set_verbosity(quiet=quiet, verbose=verbose)  # every invocation resets it (tests reuse the app)
    try:
        count, why = threads_policy.configure(threads_policy.parse(threads, "--threads"))
    except ValueError as e:
        raise OtfuseError(str(e)) from None
    report.timing_line(f"threads: {count if count is not None else 'as OpenMP chooses'} ({why})")


@app.command()
def inspect(
    models: list[str] = typer.Argument(..., metavar="MODEL",
                                       help="Checkpoints: .safetensors, sharded index, HF folder, .bin/.pt."),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor with its shape and dtype."),
    spaces: bool = typer.Option(False, "--spaces", help="Show the neuron spaces (Spec) that alignment moves."),
    check: bool = typer.Option(False, "--check", help="Exit 3 when the models cannot be fused (for CI)."),
    allow_config_mismatch: bool = ALLOW_MISMATCH_OPT, json_out: bool = JSON_OPTION,
) -> None:
    """Summarise checkpoints; with two or more, say whether their layouts can be fused.

    Examples:

    \b
      otfuse inspect fused/ --spaces
      otfuse inspect a/ b/ --check --json
    """
    require_models(*models)
    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli.inspect import compare, summarize
    from otfuse_cli.arch import build_spec

    ckpts = [open_checkpoint(m) for m in models]
    summaries = [summarize(c) for c in ckpts]
    comparison = compare(ckpts, allow_config_mismatch) if len(ckpts) >= 2 else None
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
    if check and comparison is not None and not comparison["compatible"]:
        report.error_line(f"cannot be fused: {comparison['reason']}")
        raise typer.Exit(EXIT_GATE)


# Options shared by `align`, `fuse` and `compress` come from the typed groups in options.py.
ALIGN_FLAGS = ("--align", "--solver", "--reg", "--metric", "--marginals", "--cost-norm", "--refine", "--sketch",
               "--max-iter", "--rounds")
SAMPLE_FLAGS = ("--samples", "--max-tokens", "--standardize", "--post-activation", "--max-length", "--device",
                "--device-map", "--activation", "--seed", "--split")
ACTIVATION_FLAGS = ("--max-tokens", "--standardize", "--post-activation", "--device-map")  # activation features


def refuse_sketch_unless_weights(given: set[str], options: AlignOptions) -> None:
    if options.align != "weights":
        refuse_unused(given, ("--sketch",), "it sketches weight features (--align weights)")
    if options.solver != "sinkhorn":
        refuse_unused(given, ("--reg", "--max-iter"), "they shape the Sinkhorn solver (--solver sinkhorn)")


MODELS_ARG = typer.Argument(..., metavar="MODEL", help="Two or more checkpoints (files or HF folders).")
ANCHOR_OPT = typer.Option(0, "--anchor", min=0, help="Index of the model whose basis and widths the result takes.")
ACTIVATION_OPT = typer.Option(None, "--activation", help="Nonlinearity of bare MLP/CNN/ResNet state dicts.")
SEED_OPT = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Seed for sampling inputs.")
DEVICE_OPT = typer.Option("auto", "--device", metavar="[auto|cpu|cuda]", help="auto, cpu or cuda: where forward passes run.")
FORCE_OPT = typer.Option(False, "--force", help="Overwrite an existing output.")
CompressMethod = enum.Enum("CompressMethod", {m: m for m in ("ot", "magnitude", "importance", "random")}, type=str)
RepairRule = enum.Enum("RepairRule", {m: m for m in ("weights", "statistics", "refit")}, type=str)
Activation = enum.Enum("Activation", {a: a for a in ACTIVATIONS}, type=str)
StatKind = enum.Enum("StatKind", {k: k for k in ("gram", "fisher")}, type=str)


@app.command()
@with_options(options=AlignOptions, data=DataOptions)
def align(
    models: list[str] = MODELS_ARG,
    output: str = typer.Option(..., "-o", "--output", metavar="PATH", help="Plan file to write (.safetensors)."),
    anchor: int = ANCHOR_OPT, force: bool = FORCE_OPT, json_out: bool = JSON_OPTION,
    allow_config_mismatch: bool = ALLOW_MISMATCH_OPT, dry_run: bool = DRY_RUN_OPT, options: AlignOptions = None,
    data: DataOptions = None,
) -> None:
    """Compute transport plans that map every model onto the anchor and write them to a plan file.

    Examples:

    \b
      otfuse align a/ b/ -o plans.safetensors
      otfuse fuse a/ b/ -o fused/ --plan plans.safetensors
    """
    require_models(*models)
    from otfuse_cli.pipeline import align as align_models

    given = explicit_flags()
    check_device(data)
    if not options.reads_data:  # the weights route computes its features and costs on --device
        refuse_unused(given, tuple(f for f in SAMPLE_FLAGS if f != "--device" or options.align != "weights"),
                      "they shape activation alignment (--align activations or cca)")
    refuse_sketch_unless_weights(given, options)
    if dry_run:
        return print_plan_of_work(models, anchor, allow_config_mismatch, options, False, json_out)

    with report.Progress(enabled=not json_out) as progress:
        result = align_models(models, output, options=options, data=data, anchor=anchor, force=force,
                              on_space=progress, allow_config_mismatch=allow_config_mismatch)
    if json_out:
        report.print_json(result)
    else:
        report.console.print(report.alignment_table(result["spaces"], f"plans → {result['output']}"))


@app.command()
@with_options(options=AlignOptions, merge=MergeOptions, data=DataOptions, write=OutputOptions)
def fuse(
    models: list[str] = MODELS_ARG,
    output: str = typer.Option(..., "-o", "--output", metavar="PATH",
                               help="Fused checkpoint (file or folder, like the anchor)."),
    weights: Optional[str] = typer.Option(None, "--weights", metavar="W,W", help="Per-model weights, e.g. 0.5,0.5."),
    plan: Optional[str] = typer.Option(None, "--plan", metavar="FILE", help="Reuse a plan file written by `otfuse align`."),
    stats: Optional[list[str]] = typer.Option(None, "--stats", metavar="FILE",
                                              help="Statistics of each model on its own data (`otfuse stats`), "
                                                   "one per model in order: --merge regmean/fisher read only "
                                                   "these, no data."),
    repair: bool = typer.Option(False, "--repair", "--repair-bn",
                                help="REPAIR on --data: reset every fused unit's mean/std to its parents' (MLPs, "
                                     "CNNs); BatchNorm nets get their statistics re-estimated."),
    base: Optional[str] = typer.Option(None, "--base", metavar="MODEL",
                                       help="The parents' common pre-trained model: merge rules then combine "
                                            "task vectors (parent - base) and add the base back."),
    only: Optional[list[str]] = typer.Option(None, "--only", metavar="GLOB",
                                             help="Merge only the tensors whose names match (shell-style, e.g. "
                                                  "'model.encoder.*'; repeatable); every other tensor is the "
                                                  "anchor's own, in the same basis."),
    check: bool = typer.Option(True, "--check/--no-check",
                               help="With --data: run the fused model and each parent on it and warn if the "
                                    "fused model predicts like none of them (a collapse) or a parent like no "
                                    "other (one more forward pass per model)."),
    anchor: int = ANCHOR_OPT, json_out: bool = JSON_OPTION, allow_config_mismatch: bool = ALLOW_MISMATCH_OPT,
    dry_run: bool = DRY_RUN_OPT, options: AlignOptions = None, merge: MergeOptions = None,
    data: DataOptions = None, write: OutputOptions = None,
) -> None:
    """Fuse two or more models: align them onto the anchor with OT, then merge them (weighted average,
    RegMean, Fisher, or on task vectors with --base: task arithmetic, TIES, DARE). Activation alignment runs
    every model on the same --data; the merge statistics can come from each party's own data through --stats
    files instead. Parents with different task heads keep their own: OUT/<name>/ per parent.

    Examples:

    \b
      otfuse fuse a/ b/ -o fused/
      otfuse fuse a/ b/ -o fused/ --solver sinkhorn --reg 0.02
      otfuse fuse a/ b/ -o fused/ --merge regmean \\
          --stats a.stats.safetensors --stats b.stats.safetensors
      otfuse fuse sst2/ mnli/ -o merged/ --base bert-base/ \\
          --merge ties --density 0.2
      otfuse fuse en-de-a/ en-de-b/ -o enc/ --only 'model.encoder.*'
    """
    require_models(*models, base)
    from otfuse_cli.fusion import fuse as fuse_models, reads_data
    from otfuse_cli.merging.rules import MERGES

    given = explicit_flags()
    rule_reads = MERGES[merge.merge].reads
    check_device(data)
    if plan:
        refuse_unused(given, ALIGN_FLAGS, "the plan file fixes the alignment (--plan)")
    else:
        refuse_sketch_unless_weights(given, options)
    if not reads_data(options, merge, plan, stats, repair) and not (check and "--data" in given):
        # --device places the merge of every tensor (and the weights route's features and costs)
        unread = tuple(f for f in SAMPLE_FLAGS if (f != "--seed" or "seed" not in rule_reads) and f != "--device")
        refuse_unused(given, unread, "no step reads --data here (activations, regmean/fisher, --repair, the check)")
    elif not options.reads_data or plan:
        refuse_unused(given, ACTIVATION_FLAGS, "they shape activation alignment (--align activations or cca)")
    for option, flag in (("alpha", "--regmean-alpha"), ("scale", "--scale"), ("density", "--density")):
        if option not in rule_reads:
            readers = ", ".join(name for name, rule in MERGES.items() if option in rule.reads)
            refuse_unused(given, (flag,), f"it is read by --merge {readers}")
    if dry_run:
        return print_plan_of_work(models, anchor, allow_config_mismatch, options if not plan else
                                  replace(options, align="none"), True, json_out)
    command_options = {"models": models, "seed": data.seed, "device": data.device,
                       "max_shard_size": write.max_shard_size, "activation": data.activation}
    with report.Progress(enabled=not json_out) as progress:
        result = fuse_models(models, output, options=options, data=data, merge=merge, write=write, anchor=anchor,
                             weights=weights, plan=plan, stats=stats, repair=repair, base=base, only=only,
                             command_options=command_options, on_space=progress,
                             allow_config_mismatch=allow_config_mismatch, check=check)
    if json_out:
        report.print_json(result)
    else:
        if result["spaces"]:
            report.console.print(report.alignment_table(result["spaces"], "alignment"))
        report.console.print(f"[bold green]fused[/] {len(models)} {result['family']} models "
                             f"(align {result['align']}, merge {result['merge']}) → {escape_path(result['output'])}")
        for name, path in result.get("members", {}).items():
            report.console.print(f"  {escape_path(name)}: merged body + its own task head → {escape_path(path)}")
        if checked := result.get("fit", {}).get("predictions"):
            kappas = checked["fused_kappa"]
            low, high = f"{min(kappas):.2f}", f"{max(kappas):.2f}"
            span = low if low == high else f"{low}–{high}"
            report.console.print(f"checked on {checked['rows']:,} predictions: Cohen's kappa with the parents "
                                 f"{span} (theirs with each other, median best "
                                 f"{checked['reference']:.2f})")


def print_plan_of_work(models: list[str], anchor: int, allow_config_mismatch: bool, options: AlignOptions,
                       merges: bool, json_out: bool) -> None:
    """--dry-run; merges False: no model is written (align)."""
    from otfuse_cli.pipeline import open_parents
    from otfuse_cli.workplan import plan_of_work

    doc = plan_of_work(open_parents(models, anchor, allow_config_mismatch), options, merges)
    if json_out:
        report.print_json(doc)
    else:
        report.console.print(report.workplan_table(doc))


def _display_names(paths: list[str]) -> list[str]:
    """Short row names (folder or file stem); full paths when those collide."""
    from pathlib import Path

    names = [Path(p.rstrip("/")).stem or p for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


@app.command()
@with_options(options=AlignOptions)
def evaluate(
    models: list[str] = typer.Argument(None, metavar="MODEL", help="Checkpoints to score, one row each."),
    data: str = typer.Option(..., "--data", metavar="FILE", help="Evaluation data: jsonl/csv/tsv (text[, text_pair], label | "
                                                 "source, target | text) or npz/safetensors (x, y); parquet (a "
                                                 "file or a folder of shards), a datasets save_to_disk folder or a "
                                                 "cached dataset id with the same columns."),
    split: Optional[str] = typer.Option(None, "--split", metavar="SPLIT",
                                        help="Split of --data (DatasetDict folder, split shards, dataset id; "
                                             "default: its only split)."),
    task: str = typer.Option("auto", "--task", metavar="[auto|classification|lm|translation]", help="auto, classification, lm or translation."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Inputs per forward pass."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1, help="Seeded subsample of the data."),
    ensemble: bool = typer.Option(False, "--ensemble", help="Add the prediction ensemble (averaged probabilities)."),
    ensemble_of: Optional[str] = typer.Option(None, "--ensemble-of", metavar="I,J",
                                              help="Ensemble only these models (indices), e.g. the parents 0,1."),
    interpolate: Optional[tuple[str, str]] = typer.Option(None, "--interpolate", metavar="A B",
                                                          help="Score the straight line between two parents."),
    steps: int = typer.Option(11, "--steps", min=2, max=1001, help="Points on the interpolation line."),
    aligned: bool = typer.Option(False, "--aligned", help="Also the line after aligning B onto A (by --align, "
                                                          "--solver, ... as in fuse)."),
    align_data: Optional[str] = typer.Option(None, "--align-data", metavar="FILE",
                                             help="Sample inputs for --aligned --align activations."),
    align_split: Optional[str] = typer.Option(None, "--align-split", metavar="SPLIT",
                                              help="Split of --align-data (as --split for --data)."),
    plot: Optional[str] = typer.Option(None, "--plot", metavar="PNG", help="Draw the interpolation curves to a PNG."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --plot file."),
    num_beams: int = typer.Option(1, "--num-beams", min=1, help="Beam size for translation (1 = greedy)."),
    max_length: int = typer.Option(256, "--max-length", min=1, help="Token limit per text (translation: also "
                                                                       "of each generated sentence)."),
    source_field: Optional[str] = typer.Option(None, "--source-field", metavar="COLUMN",
                                               help="Translation: the column holding the sources (default source)."),
    target_field: Optional[str] = typer.Option(None, "--target-field", metavar="COLUMN",
                                               help="Translation: the column holding the references (default "
                                                    "target)."),
    activation: Optional[Activation] = ACTIVATION_OPT, seed: int = SEED_OPT, device: str = DEVICE_OPT,
    fail_under: Optional[list[str]] = typer.Option(
        None, "--fail-under", metavar="[MODEL:]METRIC=V",
        help="CI gate for a higher-is-better metric (accuracy, f1_*, mlm_accuracy, bleu, chrf): exit 3 when any "
             "row (or the row named MODEL) scores below V; repeatable."),
    fail_over: Optional[list[str]] = typer.Option(
        None, "--fail-over", metavar="[MODEL:]METRIC=V",
        help="CI gate for a lower-is-better metric (nll, ece, perplexity, pseudo_perplexity): exit 3 when any "
             "row (or MODEL) scores above V; repeatable."),
    allow_config_mismatch: bool = ALLOW_MISMATCH_OPT, json_out: bool = JSON_OPTION, options: AlignOptions = None,
) -> None:
    """Metrics per model (classification: accuracy, weighted/macro F1, ECE with 15 equal-width confidence
    bins, NLL; lm: perplexity, or MLM accuracy and pseudo-perplexity; translation: BLEU and chrF).

    Gates exit 3 after printing the results: `--fail-under accuracy=0.9` (every row),
    `--fail-under fused:accuracy=0.9` (the row named fused), `--fail-over nll=0.5` (lower-is-better metrics).

    Examples:

    \b
      otfuse evaluate a/ b/ fused/ --data test.jsonl --ensemble-of 0,1
      otfuse evaluate fused/ --data test.jsonl --fail-under accuracy=0.9
      otfuse evaluate a/ b/ --data test.tsv --source-field en --target-field de \\
          --num-beams 4 --ensemble
    """
    require_models(*(models or []), *(interpolate or ()))
    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli.evaluation import (evaluate_models, interpolate as interpolate_line, plot_curve,
                                     render_curve_table, render_table)
    from otfuse_cli.runnable import load_runnable

    models = list(models or [])
    activation = activation.value if activation else None
    if not models and not interpolate:
        raise OtfuseError("give at least one MODEL, or --interpolate A B")
    if not interpolate:
        refuse_unused(explicit_flags(), ("--allow-config-mismatch",), "it is read by --interpolate")
    if plot:
        _check_plot(plot, force, interpolate, models, data)
    if not aligned:
        refuse_unused(explicit_flags(), (*ALIGN_FLAGS, "--align-data", "--align-split", "--time-limit"),
                      "they shape the --aligned line")
    elif options.align == "none":
        raise OtfuseError("--aligned --align none is the naive line again; use --align weights or activations")
    elif options.reads_data != bool(align_data):  # activations read samples, weights none
        raise OtfuseError(f"--aligned --align {options.align if options.reads_data else 'activations'} needs "
                          "--align-data FILE (sample inputs to align on); --align-data is read by --align "
                          "activations or cca only")
    elif align_split and not align_data:
        raise OtfuseError("--align-split picks a split of --align-data; give --align-data too")
    from otfuse_cli.evaluation.gates import check_applicable, check_gate_names, missed, parse_gate

    gates = [parse_gate(g, upper=False) for g in fail_under or []] + \
        [parse_gate(g, upper=True) for g in fail_over or []]
    if gates and not models:
        raise OtfuseError("--fail-under/--fail-over gate the MODEL rows; give the models to score")
    check_gate_names(gates, _display_names(models) + (["ensemble"] if ensemble or ensemble_of else []), task)
    opts = dict(batch_size=batch_size, max_samples=max_samples, device=device, seed=seed, num_beams=num_beams,
                max_length=max_length, columns={"source": source_field, "target": target_field}, split=split)
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
        with report.Progress(enabled=not json_out) as progress:
            doc = evaluate_models(runnables, data, task=task, ensemble=members, progress=progress, **opts)
        check_applicable(gates, doc)
    curves = []
    if interpolate:
        from otfuse_cli.pipeline import aligned_parent

        from otfuse_cli.arch.compat import check_interpolatable

        a = open_checkpoint(interpolate[0])
        b = open_checkpoint(interpolate[1])
        check_interpolatable(a, b, allow_config_mismatch)
        with report.Progress(enabled=not json_out) as progress:
            curves.append(interpolate_line(a.state_dict(), b.state_dict(), a, data, steps, name="naive", task=task,
                                           activation=activation, progress=progress, **opts))
            if aligned:
                samples = DataOptions(data=align_data, split=align_split, activation=activation, seed=seed,
                                      max_length=max_length, device=device)
                sa, sb, like = aligned_parent(list(interpolate), options, samples, on_space=progress,
                                              allow_config_mismatch=allow_config_mismatch)
                curves.append(interpolate_line(sa, sb, like, data, steps, name="aligned", task=task,
                                               activation=activation, progress=progress, **opts))
        if plot:
            plot_curve(curves, plot, names=tuple(_display_names(list(interpolate))), force=force)
    failures = missed(gates, doc)
    if json_out:
        gate_record = {"gates": {"failed": failures, "passed": not failures}} if gates else {}
        report.print_json({**doc, **({"interpolation": curves} if curves else {}), **gate_record} if doc else
                          {"interpolation": curves})
    else:
        if doc:
            report.console.print(render_table(doc))
            for key, note in doc.get("notes", {}).items():
                if "signature" in key or key == "truncated":
                    report.console.print(f"[dim]{key}: {escape_path(str(note))}[/]")
        for curve in curves:
            report.console.print(render_curve_table(curve))
        if plot and curves:
            report.console.print(f"plot → {escape_path(plot)}")
    if failures:  # after the results: CI logs show the scores behind the failure
        report.error_line("gate failed: " + "; ".join(failures))
        raise typer.Exit(EXIT_GATE)


def _check_plot(plot: str, force: bool, interpolate: tuple[str, str] | None, models: list[str], data: str) -> None:
    """Before any work: --plot draws --interpolate curves into a new file (an existing one only with --force,
    a folder never) that is none of the inputs."""
    from pathlib import Path

    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli.checkpoint.guard import input_paths, refuse_overlap
    from otfuse_cli.pipeline import check_output_name

    if not interpolate:
        raise OtfuseError("--plot draws the --interpolate curves; add --interpolate A B")
    check_output_name(plot, "--plot")
    try:
        import matplotlib  # noqa: F401  (the curves are drawn after every forward pass: say it now)
    except ImportError:
        raise OtfuseError("--plot needs matplotlib: pip install 'otfuse-cli[plot]'") from None
    refuse_overlap(plot, input_paths([open_checkpoint(p) for p in (*interpolate, *models)], [data]), what="--plot")
    if Path(plot).is_dir():
        raise OtfuseError(f"--plot {plot} is a folder; give a file name such as curve.png")
    if Path(plot).exists() and not force:
        raise OtfuseError(f"{plot} exists; use --force to overwrite")


@app.command()
@with_options(options=AlignOptions, data=DataOptions, write=OutputOptions, only={"options": ("align", "metric")},
              defaults={"standardize": "none", "post_activation": False})
def compress(
    model: str = typer.Argument(..., metavar="MODEL", help="Checkpoint to shrink (file or HF folder)."),
    output: str = typer.Option(..., "-o", "--output", metavar="PATH", help="Compressed checkpoint (file or folder, like MODEL)."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Keep this fraction (0<R<1) of every compressible "
                                                                "space."),
    width: Optional[list[str]] = typer.Option(None, "--width", metavar="KIND=N",
                                              help="Target width by space kind (hidden, channel, ffn, heads = KV "
                                                   "groups) or space name (0.ffn); repeatable."),
    method: CompressMethod = typer.Option("ot", "--method", help="ot (merge clusters of neurons); or prune: "
                                                                 "magnitude (weight norm), importance (each "
                                                                 "unit's output norm on --data; for LLM FFNs) or "
                                                                 "random."),
    repair: bool = typer.Option(False, "--repair", help="After compression, on --data: re-estimate BatchNorm "
                                                        "statistics, or without BatchNorm (MLP/CNN) REPAIR each "
                                                        "unit's mean and std to its members' average (bare state "
                                                        "dicts); on a Hugging Face model refit the layers that "
                                                        "read compressed units by least squares. Without --data "
                                                        "(--method ot): scale each merged unit's incoming weights "
                                                        "to its members' mean norm (model folding's data-free "
                                                        "repair; FFN, MLP and CNN units)."),
    repair_by: Optional[RepairRule] = typer.Option(None, "--repair-by", help="Which repair (implies --repair): "
                                                   "weights (no data, as above), statistics (REPAIR on --data: "
                                                   "each unit's mean and std to its members'; on a Hugging "
                                                   "Face model, its FFN units), refit (least squares on "
                                                   "--data; Hugging Face models)."),
    json_out: bool = JSON_OPTION,
    options: AlignOptions = None, data: DataOptions = None, write: OutputOptions = None,
) -> None:
    """Shrink a model's hidden/channel/FFN/head widths by merging neurons with OT clustering (or pruning).

    Examples:

    \b
      otfuse compress model/ -o small/ --ratio 0.5
      otfuse compress cnn.safetensors -o small.safetensors --ratio 0.5 \\
          --repair --data calib.safetensors
    """
    require_models(model)
    from otfuse_cli.compression import compress as compress_model

    check_device(data)
    repair = repair_by.value if repair_by else repair
    if method.value != "ot" or options.align != "activations":
        # --repair on data and --method importance run the model on --data too: only the activation-feature
        # flags stay unused then
        reads = repair and data.data and repair != "weights"
        unused = ACTIVATION_FLAGS if reads or method.value == "importance" else SAMPLE_FLAGS
        refuse_unused(explicit_flags(), tuple(f for f in unused if f != "--seed"),
                      "they shape activation features (--method ot --align activations)")

    command_options = {"model": model, "seed": data.seed, "device": data.device,
                       "max_shard_size": write.max_shard_size, "activation": data.activation}
    with report.Progress(enabled=not json_out) as progress:
        result = compress_model(model, output, ratio=ratio, widths=width, method=method.value, options=options,
                                data=data, write=write, command_options=command_options, on_space=progress,
                                repair=repair)
    if json_out:
        report.print_json(result)
    else:
        report.console.print(report.compress_table(result))


@app.command()
@with_options(data=DataOptions, only={"data": ("data", "split", "samples", "seed", "activation", "max_length",
                                               "device")})
def stats(
    model: str = typer.Argument(..., metavar="MODEL", help="Checkpoint whose statistics to compute."),
    output: str = typer.Option(..., "-o", "--output", metavar="PATH", help="Statistics file to write (.safetensors)."),
    kind: Optional[list[StatKind]] = typer.Option(None, "--kind", metavar="[gram|fisher]",
                                                  help="Which statistics (repeatable; default: all): gram "
                                                       "(RegMean), fisher."),
    force: bool = FORCE_OPT, json_out: bool = JSON_OPTION, data: DataOptions = None,
) -> None:
    """Compute, on this party's own data, the statistics merge rules need (Gram matrices of every linear
    layer's inputs, diagonal Fisher), in the model's own basis, to share instead of the data.

    Examples:

    \b
      otfuse stats party_a/ --data private.jsonl -o a.stats.safetensors
      otfuse stats party_a/ --data private.jsonl -o a.safetensors --kind gram
    """
    require_models(model)
    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli.checkpoint.guard import input_paths, refuse_overlap
    from otfuse_cli.pipeline import check_output
    from otfuse_cli.merging.stats import KINDS, compute_stats, save_stats

    check_output(output, OutputOptions(force=force))
    ckpt = open_checkpoint(model)
    refuse_overlap(output, input_paths([ckpt], [data.data]))
    with report.Progress(enabled=not json_out) as progress:
        result = compute_stats(ckpt, data, tuple(k.value for k in kind) if kind else KINDS, progress=progress)
    # rank 0 writes for a torchrun launch (every rank holds the same summed statistics)
    out = save_stats(output, result, ckpt, force=force) if distributed.is_writer() else output
    summary = {"output": str(out), "model": model, "data": result.info["data"], "linear_layers": len(result.grams),
               "world_size": result.info["world_size"],
               "fisher_tensors": len(result.fisher), "rows": max(result.counts.values(), default=0)}
    if json_out:
        report.print_json(summary)
    else:
        report.console.print(f"[bold green]stats[/] {len(result.grams)} Gram matrices, {len(result.fisher)} Fisher "
                             f"tensors on {result.info['data']['samples']} samples → {escape_path(str(out))}")


@app.command("run")
def run_recipe_command(
    recipe: str = typer.Argument(..., metavar="RECIPE", help="YAML recipe (README, Recipes): command, models, output and option sections; or a mergekit config (merge_method: linear, task_arithmetic, ties, dare_linear, dare_ties)."),
    out_path: Optional[str] = typer.Argument(None, metavar="OUT", help="Output path, as mergekit-yaml takes it (same as -o)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", metavar="PATH", help="Output path (relative to the current directory): a mergekit config's, or in place of the recipe's output."),
    force: bool = FORCE_OPT, json_out: bool = JSON_OPTION,
) -> None:
    """Run an align, fuse or compress job described by a YAML recipe (one file per CI job), or a mergekit
    merge config.

    Examples:

    \b
      otfuse run job.yaml
      otfuse run job.yaml --json
      otfuse run mergekit.yaml -o merged/
      
      job.yaml:
        command: fuse
        models: [a/, b/]
        output: fused/
        options: {solver: sinkhorn, reg: 0.02}
    """
    from otfuse_cli.recipe import run_recipe

    if out_path is not None and output is not None and out_path != output:
        raise OtfuseError(f"two outputs: {out_path} and -o {output}; give one")
    with report.Progress(enabled=not json_out) as progress:
        result = run_recipe(recipe, on_space=progress, output=output or out_path, force=force)
    if json_out:
        report.print_json(result)
    elif "parameters" in result:
        report.console.print(report.compress_table(result))
    else:
        if result["spaces"]:
            report.console.print(report.alignment_table(result["spaces"], "alignment"))
        report.console.print(f"[bold green]done[/] → {escape_path(result['output'])}")


def check_device(data: DataOptions) -> None:
    """A device the machine does not have is refused as such, before asking whether it applies."""
    from otfuse_cli.runnable import resolve_device

    resolve_device(data.device)


def escape_path(path: str) -> str:
    from rich.markup import escape

    return escape(path)


def main() -> None:
    """Console-script entry point (`otfuse`) and `python -m otfuse_cli` (through otfuse_cli.entry, which has
    installed the signal handler before this module's imports)."""
    code: int | str | None = 0
    with _interrupt_signals():  # from here on, also between parsing and the command
        try:
            try:
                interrupts.check()  # a signal during the imports
                distributed.start()  # a torchrun launch: join its process group (nothing for one process)
                app(prog_name="otfuse")
            except SystemExit as e:
                code = e.code
            except KeyboardInterrupt:
                interrupts.report()
                code = EXIT_INTERRUPTED
            except OtfuseError as e:  # raised outside a command (e.g. while parsing): same contract
                if interrupts.arrived():
                    interrupts.report()
                    code = EXIT_INTERRUPTED
                else:
                    report.error_line(str(e))
                    code = e.exit_code
        except KeyboardInterrupt:  # a signal while the outcome was being reported
            code = EXIT_INTERRUPTED
        finally:
            distributed.stop()
        # once the outcome is known, later signals must not turn exit 130 into death by signal at shutdown
        # (set before the handlers are restored, and kept after)
        interrupts.ignore()
        if interrupts.arrived():
            code = EXIT_INTERRUPTED
    interrupts.ignore()
    if code == EXIT_INTERRUPTED:
        interrupts.forget_unhandled_interrupt()
    sys.exit(code)


if __name__ == "__main__":
    main()
