"""`otfuse evaluate` from the shell: a stable JSON document scripts can gate on, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import assert_one_line_error, cli, cli_subprocess
from tiny_transformers import tiny_model

DIGITS = Path(__file__).resolve().parents[1] / "fixtures" / "digits"
KEYS = ["task", "data", "metrics", "higher_is_better", "rows", "best", "notes"]


def test_json_lets_a_script_gate_fusion_on_its_parents(tmp_path):
    a, b = DIGITS / "mlp_a.safetensors", DIGITS / "mlp_b.safetensors"
    assert cli("fuse", a, b, "-o", tmp_path / "ot.safetensors", "--json").exit_code == 0
    assert cli("fuse", a, b, "-o", tmp_path / "avg.safetensors", "--align", "none").exit_code == 0
    run = cli_subprocess("evaluate", a, b, tmp_path / "avg.safetensors", tmp_path / "ot.safetensors",
                         "--data", DIGITS / "test.safetensors", "--ensemble-of", "0,1", "--json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert list(doc) == KEYS
    assert doc["metrics"] == ["accuracy", "f1_weighted", "f1_macro", "ece", "nll"]
    acc = {row["model"]: row["accuracy"] for row in doc["rows"]}  # jq: .rows[] | {(.model): .accuracy}
    assert set(acc) == {"mlp_a", "mlp_b", "avg", "ot", "ensemble"}
    assert acc["ot"] > acc["avg"] + 0.2
    assert acc["ot"] >= min(acc["mlp_a"], acc["mlp_b"]) - 0.015
    assert doc["best"]["accuracy"] in acc and doc["higher_is_better"]["ece"] is False
    assert doc["data"]["samples"] == 1000 and doc["notes"]["ece_bins"] == 15


def test_label_outside_the_label_set_is_one_line(tmp_path):
    bad = tmp_path / "bad.npz"
    import numpy as np

    np.savez(bad, x=np.zeros((3, 1, 28, 28), dtype="float32"), y=np.array([1, 2, 12]))
    result = cli("evaluate", DIGITS / "mlp_a.safetensors", "--data", bad)
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "12")


def test_model_without_a_head_for_the_task_is_one_line(tmp_path):
    import transformers as T

    model = T.BertModel(tiny_model("bert_cls").config)
    model.save_pretrained(tmp_path / "bare")
    from tiny_transformers import save_tokenizer

    save_tokenizer(tmp_path / "bare")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the film was good", "label": 1}\n')
    result = cli("evaluate", tmp_path / "bare", "--data", data)
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "head")


def test_data_with_no_usable_field_is_one_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"review": "fine"}\n')
    result = cli("evaluate", DIGITS / "mlp_a.safetensors", "--data", data)
    assert result.exit_code == 2
    assert_one_line_error(result.stderr)
