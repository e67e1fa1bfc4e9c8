"""Issue 15, items 2 and 4: progress with real totals on a terminal (silent otherwise, --quiet, --verbose)
and alignment tables that stay whole at 80 columns and in piped output.

Oracles are independent of the code under test: totals are counted from the fixture (its spaces, its data
lines, the batch size), and piped output is read as a user would, by searching for the full words."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from safetensors.torch import load_file

from otfuse_cli import report
from otfuse_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
BERT_A, BERT_B = ROOT / "fixtures/sentiment/bert_a", ROOT / "fixtures/sentiment/bert_b"
CALIB = ROOT / "fixtures/sentiment/calib.jsonl"


@pytest.fixture
def tty_stderr(monkeypatch):
    """report.err_console replaced by a forced-terminal console writing into a buffer (a TTY-like run)."""
    buf = io.StringIO()
    monkeypatch.setattr(report, "err_console", Console(file=buf, force_terminal=True, width=120,
                                                       color_system=None, highlight=False))
    yield buf
    report.set_verbosity()


def _bert_spaces() -> int:
    from otfuse_cli.arch import build_spec
    from otfuse_cli.checkpoint import open_checkpoint

    return len(build_spec(open_checkpoint(BERT_A)).spaces)


def _final_counts(text: str, name: str) -> set[str]:
    """Every 'done/total' shown on lines of the progress task `name`."""
    return {w for line in text.splitlines() if line.strip().startswith(name) for w in line.split()
            if "/" in w and w.replace("/", "").isdigit()}


def test_fuse_progress_has_totals_on_a_terminal(tty_stderr, tmp_path):
    from otfuse_cli.fusion import fuse

    spaces = _bert_spaces()
    with report.Progress() as progress:
        progress.bars.refresh_per_second = 1000
        fuse([str(BERT_A), str(BERT_B)], str(tmp_path / "f"), on_space=progress)
        tasks = {t.fields["name"]: t for t in progress.bars.tasks}
    # first pass: every space of the one parent; refinement: spaces x default sweeps (5 for exact plans)
    # the counts are steps; the bars move by each space's estimated work, so they end full, not at a count
    for name, steps in (("aligning", spaces), ("refining", spaces * 5)):
        assert tasks[name].fields["steps"] == f"{steps}/{steps}"
        assert tasks[name].completed == pytest.approx(tasks[name].total)
    tensors = len(load_file(BERT_A / "model.safetensors"))  # merging and writing: one count per tensor
    assert tasks["merging"].total == tensors and tasks["merging"].completed == tensors
    out = tty_stderr.getvalue()
    assert f"{spaces}/{spaces}" in out or f"0/{spaces}" in out  # rendered with its total, never "0/?"
    assert "/?" not in out


def test_activation_progress_counts_every_forward_pass(tty_stderr, tmp_path):
    from otfuse_cli.fusion import fuse
    from otfuse_cli.options import AlignOptions, DataOptions

    samples = 40  # 2 batches of 32; each of 2 models runs them twice (moments, then cross terms)
    with report.Progress() as progress:
        fuse([str(BERT_A), str(BERT_B)], str(tmp_path / "f"), options=AlignOptions(align="activations"),
             data=DataOptions(data=str(CALIB), samples=samples), on_space=progress)
        tasks = {t.fields["name"]: t for t in progress.bars.tasks}
    assert tasks["activations"].total == math.ceil(samples / 32) * 2 * 2 == tasks["activations"].completed
    assert tasks["aligning"].total == _bert_spaces()
    assert "refining" not in tasks  # activations need no refinement


def test_plain_on_space_callers_still_work(tmp_path):
    from otfuse_cli.fusion import fuse

    seen = []
    fuse([str(BERT_A), str(BERT_B)], str(tmp_path / "f"), on_space=seen.append)
    assert len(seen) == _bert_spaces() and seen[0] == "residual"


def test_evaluate_progress_is_models_times_batches(tty_stderr):
    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli.evaluation import evaluate_models
    from otfuse_cli.runnable import load_runnable

    lines = sum(1 for _ in open(ROOT / "fixtures/sentiment/test.jsonl"))
    models = [(n, load_runnable(open_checkpoint(p))) for n, p in (("a", BERT_A), ("b", BERT_B))]
    with report.Progress() as progress:
        doc = evaluate_models(models, ROOT / "fixtures/sentiment/test.jsonl", batch_size=250, progress=progress)
        (task,) = progress.bars.tasks
    assert doc["data"]["samples"] == lines
    assert task.total == 2 * math.ceil(lines / 250) == task.completed


def test_no_progress_when_stderr_is_not_a_terminal(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "otfuse_cli", "fuse", str(BERT_A), str(BERT_B), "-o",
                           str(tmp_path / "f")], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_verbose_logs_each_space_with_a_time(tmp_path):
    result = CliRunner().invoke(app, ["--verbose", "fuse", str(BERT_A), str(BERT_B), "-o", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    timed = [line for line in result.output.splitlines() if line.strip().startswith("aligning:")]
    assert len(timed) == _bert_spaces() and all(line.rstrip().endswith(" s") for line in timed)


def test_quiet_prints_nothing_but_errors_and_json(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["--quiet", "fuse", str(BERT_A), str(BERT_B), "-o", str(tmp_path / "f")])
    assert ok.exit_code == 0 and ok.output == ""
    as_json = runner.invoke(app, ["-q", "fuse", str(BERT_A), str(BERT_B), "-o", str(tmp_path / "g"), "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.output)["output"] == str(tmp_path / "g")
    bad = runner.invoke(app, ["--quiet", "fuse", str(BERT_A), str(BERT_B), "-o", str(tmp_path / "f")])
    assert bad.exit_code == 2 and bad.output.startswith("error: ") and bad.output.count("\n") == 1
    both = runner.invoke(app, ["--quiet", "--verbose", "inspect", str(BERT_A)])
    assert both.exit_code == 2 and both.output.startswith("error: ")
    # the next invocation is loud again (settings do not leak between runs in one process)
    loud = runner.invoke(app, ["inspect", str(BERT_A)])
    assert "checkpoints" in loud.output


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_piped_fuse_table_keeps_full_names(tmp_path, solver):
    proc = subprocess.run([sys.executable, "-m", "otfuse_cli", "fuse", str(BERT_A), str(BERT_B), "-o",
                           str(tmp_path / "f"), "--solver", solver], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=tmp_path, env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "…" not in out
    assert ("assignment" if solver == "exact" else "sinkhorn") in out
    for space in ("residual", "0.heads", "1.ffn", "pooler"):
        assert f" {space} " in out
    assert "sinkh " not in out and "resid " not in out


def test_terminal_table_at_80_columns_keeps_words_whole():
    rows = [{"model": 1, "space": "residual", "kind": "residual", "width": [768, 384], "cost_before": None,
             "cost_after": 123456.7, "entropy": 1.2345, "solver": "assignment"},
            {"model": 1, "space": "encoder.layer.10.attention.heads", "kind": "heads", "width": [12, 12],
             "cost_before": 4.2412345e-05, "cost_after": 0.0871, "stay": 0.5, "entropy": 0.7, "solver": "sinkhorn",
             "marginal_error": 6e-9}]
    con = Console(file=io.StringIO(), force_terminal=True, width=80, color_system=None)
    con.print(report.alignment_table(rows, "alignment"))
    text = con.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    for word in ("assignment", "sinkhorn", "residual", "768→384", "1.23e+05", "4.24e-05", "±6e-09"):
        assert word in text, word


def test_a_weighted_task_counts_steps_but_moves_by_work(tty_stderr):
    """One step carrying 90% of the estimated work fills 90% of the bar (and drives the ETA) while the count
    says 1 of 2 steps."""
    with report.Progress() as progress:
        task = progress.task("aligning", 2, work=10.0)
        task.advance(detail="residual", work=9.0)
        (state,) = progress.bars.tasks
        assert state.completed == 9.0 and state.total == 10.0 and state.fields["steps"] == "1/2"
        task.advance(detail="0.ffn", work=1.0)
        assert state.completed == 10.0 and state.fields["steps"] == "2/2"


def test_a_growing_total_keeps_the_speed_it_measured(tty_stderr):
    """A total that grows mid-run (16 -> 32 when the data turns out longer) keeps the steps' timings: the
    ETA is then the remaining steps at the measured speed, not blank until new samples arrive."""
    clock = iter(range(1000))
    with report.Progress() as progress:
        progress.bars.get_time = lambda: float(next(clock))  # one second per reading: the speed is known
        task = progress.task("activations", 16)
        for _ in range(4):
            task.advance(detail="0.ffn")
        (state,) = progress.bars.tasks
        assert state.speed is not None
        task.set_total(32)
        assert state.total == 32 and state.speed is not None
        assert state.time_remaining is not None and state.time_remaining > 0
        assert state.fields["steps"] == "4/32"


def test_a_narrow_terminal_cuts_only_the_detail(monkeypatch):
    """At 80 columns the name, the count, the elapsed time and the ETA are whole; a long detail gives way."""
    buf = io.StringIO()
    monkeypatch.setattr(report, "err_console", Console(file=buf, force_terminal=True, width=80,
                                                       color_system=None, highlight=False))
    with report.Progress() as progress:
        task = progress.task("activations", 16)
        task.advance(detail="encoder.layer.10.attention.output.dense, a long name of a space")
        out = Console(file=io.StringIO(), width=80, color_system=None)
        out.print(progress.bars.make_tasks_table(progress.bars.tasks))
    line = out.file.getvalue().splitlines()[0]
    assert len(line) <= 80
    words = line.split()
    assert words[0] == "activations" and "1/16" in words and "eta" in words
    times = [w for w in words if w.count(":") == 2]
    assert len(times) == 2 and all(len(t) == 7 and "…" not in t for t in times), line
    assert "encoder.layer" in line and line.rstrip().endswith("…")
