"""`otfuse inspect`: summaries, --json, --tensors, and layout comparison of several models."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli, cli_subprocess, make_tiny_bert
from otfuse_cli import __version__
from otfuse_cli.checkpoint import open_checkpoint, write_checkpoint
from otfuse_cli.inspect import compare, summarize


@pytest.fixture(scope="module")
def widths(tmp_path_factory):
    """Same architecture at two widths (heterogeneous), plus one with an extra layer (incompatible)."""
    root = tmp_path_factory.mktemp("widths")
    make_tiny_bert(root / "narrow", hidden=32, intermediate=64, seed=1)
    make_tiny_bert(root / "wide", hidden=32, intermediate=96, seed=2)
    make_tiny_bert(root / "deep", hidden=32, intermediate=64, layers=3, seed=3)
    return root


def test_json_reports_parameter_count_of_sharded_folder(tiny_bert):
    r = cli("inspect", tiny_bert["sharded"], "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    (s,) = doc["models"]
    assert s["num_parameters"] == tiny_bert["model"].num_parameters()
    assert s["format"] == "sharded" and s["model_type"] == "bert" and s["architectures"] == ["BertModel"]
    assert s["num_tensors"] == len(tiny_bert["model"].state_dict())
    assert s["dtypes"] == {"float32": s["num_tensors"]}
    assert s["size_bytes"] == sum(p.stat().st_size for p in tiny_bert["sharded"].glob("*.safetensors"))
    assert "tensors" not in s and "comparison" not in doc
    r = cli("inspect", tiny_bert["sharded"], "--json", "--tensors")
    tensors = json.loads(r.stdout)["models"][0]["tensors"]
    first = {t["name"]: t for t in tensors}["embeddings.word_embeddings.weight"]
    assert first == {"name": "embeddings.word_embeddings.weight", "shape": [100, 32], "dtype": "float32"}


def test_human_output_has_tables(tiny_bert):
    r = cli("inspect", tiny_bert["single"], "--tensors")
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    assert "checkpoints" in out and "parameters" in out and "size on disk" in out
    assert f"{tiny_bert['model'].num_parameters():,}" in out
    assert "bert" in out and "folder" in out
    assert "embeddings.word_embeddings.weight" in out and "100×32" in out  # the --tensors table
    assert "compatibility" not in out  # only with two or more models


def test_two_identical_layouts(tiny_bert):
    r = cli("inspect", tiny_bert["single"], tiny_bert["sharded"])
    assert r.exit_code == 0 and "identical layout" in r.stdout


def test_different_widths_are_heterogeneous(widths):
    r = cli("inspect", widths / "narrow", widths / "wide", "--json")
    assert r.exit_code == 0, r.stderr
    c = json.loads(r.stdout)["comparison"]
    assert c["compatible"] and c["heterogeneous"] and c["verdict"] == "heterogeneous widths"
    assert not c["missing"] and not c["extra"]
    mismatched = {e["name"]: e["shapes"] for e in c["shape_mismatch"]}
    assert mismatched["encoder.layer.0.intermediate.dense.weight"] == [[64, 32], [96, 32]]
    assert "embeddings.word_embeddings.weight" not in mismatched
    human = cli("inspect", widths / "narrow", widths / "wide")
    assert "heterogeneous widths" in human.stdout and "shape differences" in human.stdout


def test_different_names_are_incompatible(widths):
    r = cli("inspect", widths / "narrow", widths / "deep", "--json")
    assert r.exit_code == 0  # an incompatible pair is a finding, not an error
    c = json.loads(r.stdout)["comparison"]
    assert not c["compatible"] and not c["heterogeneous"] and c["verdict"] == "incompatible"
    assert c["extra"]["1"] and all(n.startswith("encoder.layer.2.") for n in c["extra"]["1"])
    assert "incompatible" in cli("inspect", widths / "narrow", widths / "deep").stdout


def test_rank_change_is_incompatible(tmp_path):
    a = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.zeros(4, 3)}, layout="file")
    b = write_checkpoint(tmp_path / "b.safetensors", {"w": torch.zeros(12)}, layout="file")
    c = compare([open_checkpoint(a), open_checkpoint(b)])
    assert c["verdict"] == "incompatible" and c["rank_mismatch"] == ["w"]


def test_summarize_bare_state_dict(tmp_path):
    p = write_checkpoint(tmp_path / "m.safetensors", {"fc.weight": torch.zeros(2, 3, dtype=torch.bfloat16),
                                                      "fc.bias": torch.zeros(2)}, layout="file")
    s = summarize(open_checkpoint(p))
    assert s["format"] == "single" and s["architectures"] is None and s["num_parameters"] == 8
    assert s["dtypes"] == {"bfloat16": 1, "float32": 1}
    assert isinstance(s["model_type"], str) and s["model_type"]  # a family name or "unknown"


def test_version_and_entry_point(tiny_bert):
    r = cli("--version")
    assert r.exit_code == 0 and __version__ in r.stdout
    r = cli_subprocess("inspect", tiny_bert["single"], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["models"][0]["model_type"] == "bert"


def test_usage_errors_are_one_line():
    r = cli("inspect")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "Missing argument" in r.stderr
    r = cli("inspect", "x", "--no-such-option")
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, tiny_bert):
    import otfuse_cli.checkpoint as ckpt_mod

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "open_checkpoint", interrupted)
    r = cli("inspect", tiny_bert["single"])
    assert r.exit_code == 130 and r.stderr == "error: interrupted\n"
