"""The library API (`import otfuse_cli as otf`) and the typed options behind the command line: choices are
checked while parsing, before any model is read or any heavy module imported."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, assert_one_line_error, cli_subprocess

DIGITS = REPO / "fixtures" / "digits"


def digit_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    """The digit MLP's forward pass written out by hand (784-128-128-10, ReLU): the oracle for evaluate."""
    sd = load_file(path)
    names = sorted({k.rsplit(".", 1)[0] for k in sd}, key=lambda p: int(p.split(".")[-1]) if p[-1].isdigit() else p)
    h = x.reshape(len(x), -1).float()
    for i, p in enumerate(names):
        h = h @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]
        if i < len(names) - 1:
            h = torch.relu(h)
    return h


def test_notebook_sized_example(tmp_path):
    """The README's library example: fuse, evaluate, and check the score by hand."""
    import otfuse_cli as otf

    a, b = str(DIGITS / "mlp_a.safetensors"), str(DIGITS / "mlp_b.safetensors")
    result = otf.fuse([a, b], str(tmp_path / "fused.safetensors"), options=otf.AlignOptions(refine=2))
    assert result["family"] == "mlp" and {r["space"] for r in result["spaces"]}
    doc = otf.evaluate({"a": a, "fused": str(tmp_path / "fused.safetensors")}, str(DIGITS / "test.safetensors"))
    test = load_file(DIGITS / "test.safetensors")
    for row in doc["rows"]:
        path = a if row["model"] == "a" else tmp_path / "fused.safetensors"
        predicted = digit_logits(Path(path), test["x"]).argmax(1).numpy()
        assert row["accuracy"] == pytest.approx(float(np.mean(predicted == test["y"].numpy())))
    plans_path = tmp_path / "plans.safetensors"
    otf.align([a, b], str(plans_path))
    plans, meta = otf.load_plans(plans_path)
    assert isinstance(plans[1]["0"], otf.Plan) and meta["options"]["solver"] == "exact"
    spec = otf.build_spec(otf.open_checkpoint(a))
    assert [s.size for s in spec.spaces] == [128, 128]


def test_api_names_are_functions_not_modules():
    import otfuse_cli as otf

    for name in ("align", "fuse", "compress", "evaluate", "open_checkpoint"):
        assert callable(getattr(otf, name)), name
    assert set(otf.__all__) <= set(dir(otf)) | {"__version__"}
    with pytest.raises(AttributeError):
        otf.no_such_name


def test_options_are_frozen_and_checked_when_built():
    from otfuse_cli import AlignOptions, DataOptions, OtfuseError, OutputOptions

    with pytest.raises(dataclasses.FrozenInstanceError):
        AlignOptions().solver = "sinkhorn"
    for bad, words in [(lambda: AlignOptions(solver="foo"), "exact, sinkhorn"),
                       (lambda: AlignOptions(metric="l7"), "sqeuclidean, cosine"),
                       (lambda: AlignOptions(refine=-1), "--refine must be at least 0"),
                       (lambda: AlignOptions(reg=float("nan")), "--reg"),
                       (lambda: DataOptions(standardize="whiten"), "none, center, zscore"),
                       (lambda: DataOptions(samples=0), "--samples must be at least 1"),
                       (lambda: OutputOptions(dtype="int8"), "keep, float32, float16, bfloat16")]:
        with pytest.raises(OtfuseError, match=words.replace(".", r"\.")):
            bad()


def test_declared_choices_match_the_tables_they_name():
    from otfuse_cli import options, pipeline, runnable

    assert options.ALIGN_BY == (*pipeline.PROVIDERS, "none")
    assert set(options.DTYPES) == {"keep", *pipeline.TORCH_DTYPES}
    assert options.ACTIVATIONS == tuple(runnable.ACTIVATIONS)


@pytest.mark.parametrize("command,flag,choices", [
    ("fuse", "--solver", "'exact', 'sinkhorn'"), ("fuse", "--metric", "'sqeuclidean', 'cosine'"),
    ("fuse", "--align", "'weights', 'activations'"), ("fuse", "--marginals", "'uniform', 'l1', 'l2'"),
    ("fuse", "--cost-norm", "'mean', 'max', 'none'"), ("fuse", "--standardize", "'none', 'center', 'zscore'"),
    ("fuse", "--dtype", "'keep', 'float32'"), ("stats", "--kind", "'gram', 'fisher'"),
    ("fuse", "--merge", "'average', 'regmean', 'fisher'"), ("align", "--solver", "'exact', 'sinkhorn'"),
    ("compress", "--metric", "'sqeuclidean', 'cosine'"), ("compress", "--method", "'ot', 'magnitude', 'importance', 'random'"),
    ("evaluate", "--activation", "'relu', 'gelu', 'tanh'"),
])
def test_bad_choices_fail_while_parsing(tmp_path, command, flag, choices):
    """Models that do not exist are never opened: the option is refused first, with its choices listed."""
    models = ["missing_a", "missing_b"] if command in ("fuse", "align") else ["missing_a"]
    extra = ["--data", "x.npz"] if command == "evaluate" else ["-o", str(tmp_path / "out")]
    extra += ["--data", "x.npz"] if command == "stats" else []
    res = cli_subprocess(command, *models, *extra, flag, "foo")
    assert res.returncode == 2
    assert_one_line_error(res.stderr, flag, choices)
    assert not (tmp_path / "out").exists()


def test_option_checks_do_not_load_torch():
    """Parse-time refusal is instant: nothing heavy is imported before the options are checked."""
    code = ("import sys\nfrom otfuse_cli.cli import app\n"
            "try:\n    app(['fuse', 'a', 'b', '-o', 'x', '--solver', 'foo'], prog_name='otfuse')\n"
            "except SystemExit as e:\n    assert e.code == 2, e.code\n"
            "heavy = [m for m in ('torch', 'ot', 'scipy', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
