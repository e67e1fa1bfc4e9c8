"""One signal discipline for the command line, from the first line of the process to its exit.

SIGINT and SIGTERM mean "stop, leave nothing behind, exit 130". The handler records the signal and raises
KeyboardInterrupt (which unwinds through every writer's cleanup) only where raising is safe:

- not while anything is being imported: an import runs C and C++ extension code (torch.distributed's pybind11
  initialisation) that calls back into Python, and an exception raised there can abort the whole process
  ("terminate called after throwing an instance of 'pybind11::error_already_set'");
- not inside a finaliser (`__del__`), where Python would print the exception and drop it;
- only once: a second signal must not cut short the cleanup the first one started.

Otherwise the interrupt is pending and `check()` raises it at the next unit of work (between tensors, chunks,
spaces and batches, and before an output takes its final name); the command line also checks when a command
returns. The entry point installs the handler before anything heavy is imported (`otfuse_cli.entry`).
"""

import sys

try:  # the C module: `signal` would import enum first, a third of what runs before the handler is in place
    import _signal as signal
except ImportError:  # pragma: no cover - an interpreter without it
    import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODE = 130

_arrived = False  # a signal came (and the command must end with exit 130)
_raised = False  # the handler has raised its one KeyboardInterrupt


def _unsafe(frame) -> bool:
    """The interrupted code is an import or a finaliser (or runs inside one)."""
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith("<frozen importlib") or code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _on_signal(signum, frame) -> None:
    global _arrived, _raised
    _arrived = True
    if _raised or _unsafe(frame):
        return  # pending: check() raises it at the next unit of work
    _raised = True
    raise KeyboardInterrupt


def installed() -> bool:
    return signal.getsignal(signal.SIGINT) is _on_signal


def install() -> dict:
    """Handle SIGINT and SIGTERM; returns the handlers replaced (empty when already installed, or when this is
    not the main thread, where Python cannot install handlers: signals then stay as they are)."""
    global _arrived, _raised
    if installed():
        return {}
    try:
        previous = {s: signal.signal(s, _on_signal) for s in SIGNALS}
    except ValueError:  # not the main thread (e.g. a test runner's worker)
        return {}
    _arrived = _raised = False
    return previous


def restore(previous: dict) -> None:
    """Put back what install() replaced; the outermost restore also forgets the signal (its command is over)."""
    global _arrived, _raised
    for s, handler in previous.items():
        signal.signal(s, handler)
    if previous:
        _arrived = _raised = False


def ignore() -> None:
    """Once a command's outcome is known, a late signal must not turn exit 0 or 130 into death by signal."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def arrived() -> bool:
    return _arrived


def check() -> None:
    """Raise the pending interrupt, if a signal came: called between units of work."""
    global _raised
    if _arrived:
        _raised = True
        raise KeyboardInterrupt


def forget_unhandled_interrupt() -> None:
    """Keep exit 130 under `python -m otfuse_cli`.

    CPython marks "KeyboardInterrupt left the program" whenever one escapes an embedded PyRun_* call (C
    extensions run module code that way while being imported, e.g. inside scipy). The mark is never cleared when
    the exception is caught later, so `-m` ends the process by re-raising SIGINT (exit -2) even though we handled
    the interrupt. Every PyRun_* call clears the mark first, so running an empty statement through one resets it.
    """
    import ctypes

    try:
        ctypes.pythonapi.PyRun_SimpleString(b"pass")
    except (AttributeError, OSError):  # pragma: no cover - an interpreter without the C API (PyPy)
        pass


def report() -> None:
    """The one line an interrupted command prints (no rich: it may not be imported yet)."""
    try:
        sys.stderr.write("error: interrupted\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: the exit code still says it
        pass
