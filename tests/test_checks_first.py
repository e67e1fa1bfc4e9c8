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


def test_a_parent_given_as_the_output_is_named_as_a_swap_not_offered_force(tmp_path):
    import shutil

    a = shutil.copy(A, tmp_path / "a.safetensors")
    before = (tmp_path / "a.safetensors").read_bytes()
    res = cli("compress", "-o", a, B, "--ratio", "0.5")  # the output and the input swapped
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "is a model otfuse did not write", "swapped")
    assert "--force" not in res.stderr and (tmp_path / "a.safetensors").read_bytes() == before
    out = tmp_path / "fused.safetensors"  # an earlier output of ours: the usual --force advice
    assert cli("fuse", A, B, "-o", out, "--align", "none").exit_code == 0
    res = cli("fuse", A, B, "-o", out, "--align", "none")
    assert_one_line_error(res.stderr, "exists; use --force to overwrite")


def test_reg_without_sinkhorn_is_refused():
    res = cli("fuse", A, B, "-o", "never.safetensors", "--reg", "0.02")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "--reg does not apply", "--solver sinkhorn")


def test_stats_reports_the_samples_it_used_and_compress_says_what_is_missing(tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.randn(40, 784), "y": torch.zeros(40, dtype=torch.long)}, tmp_path / "x.safetensors")
    res = cli("stats", A, "--data", tmp_path / "x.safetensors", "--samples", "256", "--activation", "relu",
              "--kind", "gram", "-o", tmp_path / "s.safetensors", "--json")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)["data"]
    assert data["samples"] == 40 and data["requested"] == 256, data
    res = cli("stats", A, "--data", tmp_path / "x.safetensors", "--samples", "256", "--activation", "relu",
              "--kind", "gram", "-o", tmp_path / "t.safetensors")
    assert "on 40 samples" in res.stdout, res.stdout
    res = cli("compress", A, "-o", tmp_path / "c.safetensors")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "say how much to compress", "--ratio")


def test_a_data_file_given_as_a_model_is_named(tmp_path):
    res = cli("fuse", A, TEST, "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, TEST, "a data file rather than a model", "order of the arguments")


def test_json_records_a_failed_gate():
    import json

    res = cli("evaluate", A, "--data", TEST, "--activation", "relu", "--json", "--fail-under", "accuracy=0.999")
    assert res.exit_code == 3
    gates = json.loads(res.stdout)["gates"]
    assert gates["passed"] is False and "accuracy" in gates["failed"][0]
    res = cli("evaluate", A, "--data", TEST, "--activation", "relu", "--json", "--fail-under", "accuracy=0.1")
    assert res.exit_code == 0 and json.loads(res.stdout)["gates"] == {"failed": [], "passed": True}


def test_a_model_fused_with_itself_gets_a_note(tmp_path):
    res = cli("fuse", A, A, "-o", tmp_path / "o.safetensors", "--align", "none")
    assert res.exit_code == 0
    assert "model 1 and model 0 are the same checkpoint" in res.stderr


@pytest.mark.parametrize("args", [["fuse", "nope_a", B, "-o", "x.safetensors"], ["inspect", "nope_a"],
                                  ["evaluate", "nope_a", "--data", TEST], ["compress", "nope_a", "-o", "x",
                                                                            "--ratio", "0.5"]])
def test_a_missing_model_is_said_before_torch_is_imported(args):
    """Measured by what the process imported, not by time: no torch for a path that does not exist."""
    import subprocess

    code = ("import sys\nfrom otfuse_cli.cli import main\nsys.argv = ['otfuse', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.stdout.split() == ["2", "False"], (out.stdout, out.stderr)
    assert_one_line_error(out.stderr, "no such file or folder: nope_a")
