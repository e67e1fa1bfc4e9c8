"""Options that the chosen mode would ignore are refused with one line (exit 2), before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import assert_one_line_error, cli

DIGITS = Path(__file__).resolve().parents[1] / "fixtures" / "digits"
A, B = DIGITS / "mlp_a.safetensors", DIGITS / "mlp_b.safetensors"


@pytest.mark.parametrize("command,args,words", [
    ("align", ["--device", "cpu", "--align", "none"], "--device does not apply"),
    ("fuse", ["--data", DIGITS / "calib.safetensors", "--no-check"], "--data is read by"),
    ("fuse", ["--samples", "10"], "--samples does not apply"),
    ("fuse", ["--plan", "p.safetensors", "--solver", "sinkhorn"], "--solver does not apply: the plan file"),
    ("fuse", ["--plan", "p.safetensors", "--align", "activations"], "--align does not apply: the plan file"),
    ("fuse", ["--regmean-alpha", "0.5"], "--regmean-alpha does not apply"),
    ("fuse", ["--merge", "regmean", "--data", DIGITS / "calib.safetensors", "--standardize", "center"],
     "--standardize does not apply"),
    ("fuse", ["--max-shard-size", "1MB"], "--max-shard-size applies to folder outputs"),
    ("align", ["--max-tokens", "10"], "--max-tokens does not apply"),
    ("align", ["--data", DIGITS / "calib.safetensors"], "--data is read by --align activations"),
    ("compress", ["--ratio", "0.5", "--samples", "10"], "--samples does not apply"),
    ("compress", ["--ratio", "0.5", "--method", "magnitude", "--data", DIGITS / "calib.safetensors",
                  "--align", "activations"], "--data is read by --align activations"),
])
def test_unused_options_are_refused(tmp_path, command, args, words):
    models = [A] if command == "compress" else [A, B]
    res = cli(command, *models, "-o", tmp_path / "out.safetensors", *args)
    assert res.exit_code == 2, res.output
    assert_one_line_error(res.stderr, words)
    assert not (tmp_path / "out.safetensors").exists()


def test_options_that_apply_are_accepted(tmp_path):
    res = cli("fuse", A, B, "-o", tmp_path / "f.safetensors", "--merge", "regmean", "--regmean-alpha", "0.8",
              "--data", DIGITS / "calib.safetensors", "--samples", "64")
    assert res.exit_code == 0, res.output
    res = cli("compress", A, "-o", tmp_path / "c.safetensors", "--ratio", "0.5", "--seed", "3")
    assert res.exit_code == 0, res.output


def test_config_dtype_follows_the_output_dtype(tmp_path):
    import json

    s = Path(__file__).resolve().parents[1] / "fixtures" / "sentiment"
    res = cli("fuse", s / "bert_a", s / "bert_b", "-o", tmp_path / "f16", "--dtype", "float16")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "f16" / "config.json").read_text())["dtype"] == "float16"
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "f16", dtype="auto")
    assert next(model.parameters()).dtype.is_floating_point and str(next(model.parameters()).dtype) == "torch.float16"
