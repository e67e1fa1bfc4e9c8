"""Rendering for people (rich tables on stdout, progress on stderr) and for scripts (--json on stdout)."""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import time

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table



def _reserve_standard_fds() -> None:
    """Started with stdin, stdout or stderr closed (`otfuse fuse ... >&-`), the process would hand that
    descriptor to the next file it opens (an output being written), and whatever a library prints to fd 1 or
    2 would land inside it. Each closed one is pointed at /dev/null first."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                null = os.open(os.devnull, os.O_RDWR)
            except OSError:  # pragma: no cover - no /dev/null
                return
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


_reserve_standard_fds()

# Results on a stdout that is closed (`>&-`) or whose reader has gone (`| head -1`) cannot be shown. The work
# they describe is done (an output written, a gate judged), so such a run ends as it would have with the
# results shown: exit 0 (or the gate's 3), nothing more on stderr, the way `ls | head -1` ends quietly.
# Before, fuse wrote its output and then died with rich's SystemExit(1) (a broken pipe) or a traceback
# (`--json` with stdout closed). Other write errors (a full disk behind `> file`) are one error line.
_stdout = {"gone": False}


def _stdout_gone() -> None:
    """Nobody reads stdout: drop every later result, and point fd 1 at /dev/null so that the interpreter's
    final flush of what is still buffered succeeds instead of printing "Exception ignored"."""
    _stdout["gone"] = True
    try:
        fd = sys.stdout.fileno() if sys.stdout is not None else None
    except (AttributeError, ValueError, OSError):  # an in-memory stdout (tests): nothing to redirect
        fd = None
    if fd is not None:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
        except OSError:  # pragma: no cover
            pass


def write_stdout(text: str) -> None:
    """Write results to stdout (see _stdout_gone for a stdout nobody reads)."""
    out = sys.stdout
    if out is None or _stdout["gone"] or _muted():  # started with stdout closed: Python gives no sys.stdout at all
        return
    try:
        out.write(text)
        out.flush()
    except OSError as e:
        if isinstance(e, BrokenPipeError) or e.errno in (errno.EPIPE, errno.EBADF):
            _stdout_gone()
            return
        from otfuse_cli.errors import OtfuseError

        raise OtfuseError(f"cannot write the results to stdout: {e.strerror or e}") from None


def _muted() -> bool:
    """A rank other than 0 of a torchrun launch prints nothing (otfuse_cli.distributed): rank 0 speaks for all."""
    from otfuse_cli.distributed import is_writer

    return not is_writer()


def _write_stderr(text: str) -> None:
    """Error, note and timing lines; a stderr that is closed or gone cannot take them, and the exit code
    still says what happened."""
    if _muted():
        return
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):
        pass


class ResultConsole(Console):
    """stdout for results. When stdout is not a terminal (a pipe, a CI log) tables are printed at their
    natural width rather than squeezed to COLUMNS (80 by default), so no name or number is folded or
    elided with an ellipsis, and text lines are never wrapped; log viewers scroll instead."""

    def _print(self, *objects, **kwargs) -> None:
        if not self.is_terminal and not any(isinstance(o, Table) for o in objects):
            kwargs.setdefault("soft_wrap", True)  # a summary line stays one line for grep and tail -1
        natural = max((Measurement.get(self, self.options.update_width(10_000), o).maximum
                       for o in objects if isinstance(o, Table)), default=0)
        if self.is_terminal or natural <= self.width:
            return super().print(*objects, **kwargs)
        saved, self._width = self._width, natural  # print() never renders wider than the console
        try:
            super().print(*objects, **kwargs)
        finally:
            self._width = saved

    def print(self, *objects, **kwargs) -> None:  # noqa: F811 - the wrapper below around the one above
        if _stdout["gone"] or _muted():
            return
        try:
            return self._print(*objects, **kwargs)
        except OSError as e:  # rich reports only a broken pipe to on_broken_pipe; EBADF comes here
            if e.errno in (errno.EPIPE, errno.EBADF):
                return _stdout_gone()
            from otfuse_cli.errors import OtfuseError

            raise OtfuseError(f"cannot write the results to stdout: {e.strerror or e}") from None

    def on_broken_pipe(self) -> None:
        """rich's default ends the process with exit 1; the results are simply not shown (see _stdout)."""
        self.quiet = True
        _stdout_gone()


console = ResultConsole(highlight=False)          # stdout: results
err_console = Console(stderr=True, highlight=False)  # stderr: progress, warnings


def print_json(obj) -> None:
    """One strict JSON document on stdout (plain write: rich would wrap and colour it). NaN and Infinity are
    not JSON: non-finite numbers become null."""
    write_stdout(json.dumps(finite_or_null(obj), indent=2, default=str, allow_nan=False) + "\n")


def finite_or_null(obj):
    """obj with every non-finite float (also numpy's) replaced by None, in dicts, lists and tuples."""
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    if hasattr(obj, "dtype") and getattr(obj, "shape", None) == ():  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def error_line(message: str) -> None:
    """The single `error: ...` line on stderr (plain write: rich would wrap long paths)."""
    _write_stderr("error: " + " ".join(str(message).split()) + "\n")


def warning_line(message: str) -> None:
    """A `warning: ...` line on stderr: the command succeeded but its result may not be what was wanted. Shown
    with --quiet too (a CI log should carry it)."""
    _write_stderr("warning: " + " ".join(str(message).split()) + "\n")


def note_line(message: str) -> None:
    """A `note: ...` line on stderr for something the user should know but that is not an error (silent with
    --quiet)."""
    if not Verbosity.quiet:
        _write_stderr("note: " + " ".join(str(message).split()) + "\n")


def timing_line(message: str) -> None:
    """With --verbose: where the time of a step went, one line on stderr."""
    if Verbosity.verbose and not Verbosity.quiet:
        _write_stderr("  " + message + "\n")


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def human_count(n: int) -> str:
    for unit, div in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def summary_table(summaries: list[dict]) -> Table:
    """One row per property, one column per model: reads well for the usual 1-3 models at 80 columns."""
    table = Table(title="checkpoints", title_justify="left")
    table.add_column("", style="bold")
    for i in range(len(summaries)):
        table.add_column(f"model {i}" if len(summaries) > 1 else "model", overflow="fold")
    rows = {
        "path": lambda s: escape(s["path"]),
        "format": lambda s: s["format"],
        "model type": lambda s: escape(s["model_type"]),
        "architectures": lambda s: escape(", ".join(s["architectures"] or [])) or "-",
        "parameters": lambda s: f"{s['num_parameters']:,} ({human_count(s['num_parameters'])})",
        "dtypes": lambda s: ", ".join(f"{k} ×{v}" for k, v in s["dtypes"].items()),
        "size on disk": lambda s: human_bytes(s["size_bytes"]),
        "tensors": lambda s: str(s["num_tensors"]),
    }
    if any("revision" in s for s in summaries):  # a Hugging Face model id: the snapshot's commit
        rows = {"path": rows["path"], "revision": lambda s: s.get("revision", "-"), **rows}
    for label, cell in rows.items():
        table.add_row(label, *(cell(s) for s in summaries))
    return table


def tensor_table(summary: dict) -> Table:
    table = Table(title=f"tensors of {escape(summary['path'])}", title_justify="left")
    table.add_column("name", overflow="fold")
    table.add_column("shape")
    table.add_column("dtype")
    for t in summary["tensors"]:
        table.add_row(escape(t["name"]), "×".join(map(str, t["shape"])) or "scalar", t["dtype"])
    return table


def comparison_tables(comparison: dict, limit: int = 20) -> list:
    """A one-line verdict, then what differs (first `limit` rows of each kind)."""
    colour = {"identical layout": "green", "heterogeneous widths": "yellow", "incompatible": "red"}[comparison["verdict"]]
    out: list = [f"compatibility: [bold {colour}]{comparison['verdict']}[/]"]
    if comparison.get("reason"):
        out.append(f"  why: {escape(comparison['reason'])}")
    for kind in ("missing", "extra"):
        for i, names in comparison[kind].items():
            shown = ", ".join(escape(n) for n in names[:5]) + (f", … ({len(names)} in all)" if len(names) > 5 else "")
            what = "lacks" if kind == "missing" else "has extra"
            out.append(f"  model {i} {what} {len(names)} tensor(s): {shown}")
    if comparison["shape_mismatch"]:
        table = Table(title="shape differences", title_justify="left")
        table.add_column("tensor", overflow="fold")
        n = len(comparison["shape_mismatch"][0]["shapes"])
        for i in range(n):
            table.add_column(f"model {i}")
        for e in comparison["shape_mismatch"][:limit]:
            table.add_row(escape(e["name"]), *("×".join(map(str, s)) or "scalar" for s in e["shapes"]))
        if len(comparison["shape_mismatch"]) > limit:
            table.caption = f"{len(comparison['shape_mismatch']) - limit} more not shown (use --json)"
        out.append(table)
    return out


def inspect_tables(summaries: list[dict], comparison: dict | None = None, tensors: bool = False) -> None:
    """Print the `otfuse inspect` report for people."""
    console.print(summary_table(summaries))
    if tensors:
        for s in summaries:
            console.print(tensor_table(s))
    if comparison is not None:
        for item in comparison_tables(comparison):
            console.print(item)


def spaces_table(spec_json: list[dict], family: str, fixed_note: str) -> Table:
    """`inspect --spaces`: the neuron spaces of a checkpoint and what they move."""
    table = Table(title=f"neuron spaces ({family}); never moved: {fixed_note}", title_justify="left")
    for col in ("space", "kind", "width", "tensors", "axes moved"):
        table.add_column(col, justify="right" if col in ("width", "tensors") else "left")
    for s in spec_json:
        entries = s["entries"]
        sample = ", ".join(f"{e['tensor']}[{e['axis']}]" for e in entries[:2])
        more = f" +{len(entries) - 2}" if len(entries) > 2 else ""
        table.add_row(escape(s["name"]), s["kind"], str(s["size"]), str(len({e["tensor"] for e in entries})),
                      escape(sample + more))
    return table


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def alignment_table(rows: list[dict], title: str) -> Table:
    """Per-space alignment result: model (#), width, cost before/after, neurons kept in place, plan entropy,
    solver (with Sinkhorn's marginal error, or a linear map's mean canonical correlation ρ)."""
    # Nine columns must stay whole at 80: light rules instead of boxes, two-line headers, numbers that
    # never wrap, and text columns at least as wide as their longest word (rich elides, "sinkh…", any cell
    # narrower than a word), so only long space names fold and a solver's error goes to a second line.
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                  padding=(0, 1), collapse_padding=True)
    longest = {key: max((len(w) for r in rows for w in str(r.get(key, "")).split()), default=0)
               for key in ("kind", "solver")}
    for col in ("#", "space", "kind", "width", "cost\nbefore", "cost\nafter", "stay", "entropy", "solver"):
        text = col in ("space", "kind", "solver")
        table.add_column(col, justify="left" if text else "right", overflow="fold", no_wrap=not text,
                         min_width=longest.get(col) or (8 if col == "space" else None))
    for r in rows:
        width = r.get("width", ["?", "?"])
        table.add_row(str(r["model"]), escape(r["space"]), r.get("kind", ""),
                      f"{width[0]}→{width[1]}" if width[0] != width[1] else str(width[0]),
                      _fmt(r.get("cost_before"), 3), _fmt(r.get("cost_after"), 3),  # full precision: --json
                      f"{100 * r['stay']:.0f}%" if "stay" in r else "-", _fmt(r.get("entropy"), 3),
                      r.get("solver", "") + (f" ±{r['marginal_error']:.0e}" if "marginal_error" in r else "")
                      + (f" ρ {r['correlation']:.2f}" if "correlation" in r else ""))
    return table


def workplan_table(doc: dict) -> Table:
    """`--dry-run`: one row per space (widths, feature columns, cost work, solves), totals in the title."""
    title = (f"plan of work: {doc['models']} {doc['family']} models, {human_count(doc['parameters'])} parameters "
             f"each, {human_bytes(doc['read_bytes'])} to read; cost {doc['cost_gflops']:.1f} GFLOP, solver about "
             f"{doc['solve_gflops']:.0f} GFLOP-equivalent; "
             f"working memory about {human_bytes(doc['peak_bytes_estimate'])} beyond the Python runtime")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for col in ("space", "kind", "width", "features", "head features", "GFLOP / solve", "solver", "solves"):
        table.add_column(col, justify="left" if col in ("space", "kind") else "right", overflow="fold")
    for r in doc["spaces"]:
        n, m = r["width"]
        heads = f"{human_count(r['head_features'])} x {r['head_dim']}" if r["head_features"] else "-"
        table.add_row(escape(r["space"]), r["kind"], f"{n}→{m}" if n != m else str(n),
                      human_count(r["plain_features"]), heads, f"{r['cost_gflops']:.2f}",
                      f"{r['solve_gflops']:.2f}", f"≤ {r['solves']}")
    return table


class Verbosity:
    """How much the CLI says, set once per invocation by the root callback (--quiet / --verbose)."""

    quiet = False
    verbose = False


def set_verbosity(quiet: bool = False, verbose: bool = False) -> None:
    """--quiet silences tables and progress (print_json and error_line write past rich, so JSON and errors
    still appear); --verbose adds a timed line per finished step."""
    Verbosity.quiet, Verbosity.verbose = quiet, verbose
    console.quiet = err_console.quiet = quiet
    _stdout["gone"] = False  # judged anew by each invocation (tests run many in one process)


class Task:
    """One progress line: `advance` after each unit of work; `set_total` once the size is known. A task made
    with `work` (the estimated cost of all its steps) moves its bar and ETA by each step's share of that work,
    while the count still shows steps: at scale one residual space can cost as much as the thirty FFN spaces
    after it, and an ETA by step count would be wrong by that much."""

    def __init__(self, owner: "Progress", task_id, name: str, steps: int | None, weighted: bool):
        self.owner, self.id, self.name, self.steps, self.weighted, self.count = \
            owner, task_id, name, steps, weighted, 0

    def advance(self, n: int = 1, detail: str = "", work: float | None = None) -> None:
        self.count += n
        self.owner.bars.update(self.id, advance=work if self.weighted and work is not None else n,
                               description=escape(detail), steps=self._steps())
        now = time.perf_counter()
        if self.owner.verbose and detail:  # timed log lines stay in the scrollback (and in CI logs)
            self.owner.bars.console.print(f"  {escape(self.name)}: {escape(detail)}  {now - self.owner.last:.2f} s")
        self.owner.last = now  # steps run one after another, whichever task they belong to

    def set_total(self, total: int | None) -> None:
        self.steps = total
        bars = self.owner.bars
        bars.update(self.id, steps=self._steps())
        if not self.weighted:
            # Set in place: rich's update(total=) also drops the speed samples, and the ETA restarted from
            # nothing each time a total grew (16 -> 32) mid-run.
            with bars._lock:
                bars.tasks[self.owner.index(self.id)].total = total

    def finish(self, detail: str = "") -> None:
        """Mark the rest done (refinement converged before its last sweep)."""
        task = self.owner.bars.tasks[self.owner.index(self.id)]
        self.count = self.steps or self.count
        self.owner.bars.update(self.id, completed=task.total or task.completed, description=escape(detail),
                               steps=self._steps())

    def _steps(self) -> str:
        return f"{self.count}/{self.steps if self.steps is not None else '?'}"


class Progress:
    """Progress bars with totals and ETAs on stderr, one per long step (`task(name, total)`).

    Silent when stderr is not a terminal, for --json and --quiet; --verbose adds a timed line per step.
    Also callable as the library's `on_space(name)` callback, so code that only knows that still works."""

    def __init__(self, enabled: bool = True):
        from rich.progress import BarColumn, Progress as Bars, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.table import Column

        enabled = enabled and not _muted()
        self.verbose = enabled and Verbosity.verbose and not Verbosity.quiet
        shown = enabled and not Verbosity.quiet and err_console.is_terminal
        # On a narrow terminal only the detail gives way (it gets what the other columns, about 64 wide, leave):
        # counts and times are never cut to "0:00…".
        whole = lambda: Column(no_wrap=True)  # noqa: E731
        self.bars = Bars(TextColumn("[bold]{task.fields[name]}[/]", table_column=whole()),
                         BarColumn(bar_width=20, table_column=whole()),
                         TextColumn("{task.fields[steps]}", table_column=whole()),
                         TimeElapsedColumn(table_column=whole()), TextColumn("eta", table_column=whole()),
                         TimeRemainingColumn(table_column=whole()),
                         TextColumn("{task.description}", table_column=Column(
                             no_wrap=True, overflow="ellipsis", max_width=max(8, err_console.width - 64))),
                         console=err_console, disable=not shown, transient=True)
        self.spaces: Task | None = None
        self.last = time.perf_counter()  # when the previous step ended: a step's time is up to its advance

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bars.__exit__(*exc)

    def index(self, task_id) -> int:
        return next(i for i, t in enumerate(self.bars.tasks) if t.id == task_id)

    def task(self, name: str, total: int | None = None, work: float | None = None) -> Task:
        """A task of `total` steps; with `work`, its bar and ETA follow each step's estimated work instead."""
        self.last = time.perf_counter()  # a new task's first step starts now: what came before was another job
        steps = f"0/{total if total is not None else '?'}"
        task_id = self.bars.add_task("", total=work if work else total, name=escape(name), steps=steps)
        return Task(self, task_id, name, total, bool(work))

    def __call__(self, space: str) -> None:
        """Plain on_space callers (no totals known): one count per space."""
        if self.spaces is None:
            self.spaces = self.task("aligning")
        self.spaces.advance(detail=space)


class NoTask:
    """What library code advances when its caller passed no progress: does nothing."""

    def advance(self, n: int = 1, detail: str = "", work: float | None = None) -> None:
        pass

    def set_total(self, total: int | None) -> None:
        pass

    def finish(self, detail: str = "") -> None:
        pass


def counted(items, progress, name: str, total: int):
    """Pass (name, tensor) items through, advancing a `name` bar once per item (merging and writing are one
    stream: the writer pulls each tensor as it is merged)."""
    bar = start(progress, name, total)
    for key, value in items:
        yield key, value
        del value  # the writer has it; not held while the next one is made
        bar.advance(detail=key)


def start(progress, name: str, total: int | None = None, work: float | None = None) -> Task | NoTask:
    """progress.task(name, total, work), or a no-op task for library callers that passed none (or a plain
    on_space function)."""
    if not hasattr(progress, "task"):
        return NoTask()
    # a caller's own progress object may predate `work`: it is passed only when there is some
    return progress.task(name, total) if work is None else progress.task(name, total, work)


def compress_table(result: dict):
    """Per-space widths and why a space kept its width."""
    table = Table(title=f"compress ({result['method']}) → {escape(result['output'])}", title_justify="left")
    for col in ("space", "kind", "width", "note"):
        table.add_column(col, justify="right" if col == "width" else "left", overflow="fold")
    for r in result["spaces"]:
        n, k = r["width"]
        if r["compressed"]:
            note = f"distortion {r['distortion']:.3g}" if "distortion" in r else result["method"]
        else:
            note = f"[dim]{escape(r['reason'] or '')}[/]"
        table.add_row(escape(r["space"]), r["kind"], f"{n}→{k}" if r["compressed"] else str(n), note)
    before, after = result["parameters"]
    table.caption = f"parameters {before:,} → {after:,} ({after / before:.1%})"
    return table
