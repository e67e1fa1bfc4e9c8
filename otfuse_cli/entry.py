"""The process entry point (the `otfuse` script and `python -m otfuse_cli`): the signal handler goes in before
anything heavy is imported, so a Ctrl-C or SIGTERM in the first half second (typer, rich, torch loading) ends
with `error: interrupted` and exit 130 like one at any later moment, not a traceback or death by signal."""

from otfuse_cli import interrupts


def main() -> None:
    interrupts.install()
    try:
        from otfuse_cli.cli import main as run  # the imports: a signal here is pending, raised by run()
    except KeyboardInterrupt:  # pragma: no cover - the handler defers during imports; kept for safety
        interrupts.ignore()
        interrupts.report()
        interrupts.forget_unhandled_interrupt()
        raise SystemExit(interrupts.EXIT_CODE) from None
    run()
