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
    json_out: bool = JSON_OPTION,
) -> None:
    """Summarise checkpoints; with two or more, say whether their layouts can be fused."""
    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli.inspect import compare, summarize

    ckpts = [open_checkpoint(m) for m in models]
    summaries = [summarize(c) for c in ckpts]
    comparison = compare(ckpts) if len(ckpts) >= 2 else None
    if json_out:
        if not tensors:
            for s in summaries:
                del s["tensors"]
        doc: dict = {"models": summaries}
        if comparison is not None:
            doc["comparison"] = comparison
        report.print_json(doc)
    else:
        report.inspect_tables(summaries, comparison, tensors=tensors)


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
