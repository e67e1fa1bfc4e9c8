"""Checks that need no model run before any model is read: a gate naming no row, a gate metric the explicit
task does not score, and --plot without matplotlib each fail in one line without loading or scoring."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO, assert_one_line_error, cli

DIGITS = REPO / "fixtures" / "digits"
A, B, TEST = (str(DIGITS / f) for f in ("mlp_a.safetensors", "mlp_b.safetensors", "test.safetensors"))


@pytest.fixture
def nothing_runs(monkeypatch):
    """Any model load or interpolation fails the test: the error must come first."""
    import otfuse_cli.evaluation as evaluation
    import otfuse_cli.runnable as runnable

    def boom(*a, **k):
        raise AssertionError("a model was read before the check")
    monkeypatch.setattr(runnable, "load_runnable", boom)
    monkeypatch.setattr(evaluation, "interpolate", boom)


@pytest.mark.parametrize("args, fragment", [
    (["--fail-under", "fsued:accuracy=0.5"], "no model named 'fsued'"),
    (["--fail-under", "ensemble:accuracy=0.5"], "no model named 'ensemble'"),
    (["--task", "classification", "--fail-over", "perplexity=3"], "perplexity is not a classification metric"),
])
def test_gates_are_checked_before_any_model_is_read(nothing_runs, args, fragment):
    res = cli("evaluate", A, B, "--data", TEST, "--activation", "relu", *args)
    assert res.exit_code == 2, res.stderr
    assert_one_line_error(res.stderr, fragment)


def test_plot_without_matplotlib_is_refused_before_the_curves(nothing_runs, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    res = cli("evaluate", "--interpolate", A, B, "--data", TEST, "--activation", "relu", "--plot",
              tmp_path / "c.png")
    assert res.exit_code == 2, res.stderr
    assert_one_line_error(res.stderr, "--plot needs matplotlib", "otfuse-cli[plot]")
    assert not (tmp_path / "c.png").exists()


def test_piped_summary_lines_are_never_wrapped(tmp_path):
    from conftest import cli_subprocess

    out = tmp_path / ("a-rather-long-folder-name-" * 3) / "fused.safetensors"
    res = cli_subprocess("fuse", A, B, "-o", out, "--align", "none")
    assert res.returncode == 0, res.stderr
    (line,) = [l for l in res.stdout.splitlines() if l.strip()]
    assert line.startswith("fused 2 mlp models") and line.endswith(str(out)), res.stdout
