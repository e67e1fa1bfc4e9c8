"""Usability (issue 15): plan files that know their inputs, CI gates in evaluate, output form from the path,
model cards, and compress/interpolation options that are honoured."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import assert_one_line_error, cli

FIX = Path(__file__).resolve().parents[1] / "fixtures"
A, B = FIX / "digits" / "mlp_a.safetensors", FIX / "digits" / "mlp_b.safetensors"


def _provenance(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["otfuse"])


# ---------------------------------------------------------------- item 1: plan reuse


def test_plan_refused_for_swapped_inputs_and_other_anchor(tmp_path):
    plan = tmp_path / "p.safetensors"
    assert cli("align", A, B, "-o", plan, "--solver", "sinkhorn", "--reg", "0.05").exit_code == 0
    swapped = cli("fuse", B, A, "-o", tmp_path / "x.safetensors", "--plan", plan)
    assert swapped.exit_code == 2
    assert_one_line_error(swapped.stderr, "another order", "mlp_b")
    anchor = cli("fuse", A, B, "-o", tmp_path / "x.safetensors", "--plan", plan, "--anchor", "1")
    assert anchor.exit_code == 2
    assert_one_line_error(anchor.stderr, "--anchor 0")
    other = cli("fuse", A, FIX / "digits" / "mlp_wide.safetensors", "-o", tmp_path / "x.safetensors", "--plan", plan)
    assert other.exit_code == 2 and "mlp_wide" in other.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_plan_reuse_in_order_matches_direct_fusion_and_records_the_plan(tmp_path):
    plan = tmp_path / "p.safetensors"
    assert cli("align", A, B, "-o", plan, "--solver", "sinkhorn", "--reg", "0.05").exit_code == 0
    res = cli("fuse", A, B, "-o", tmp_path / "reused.safetensors", "--plan", plan)
    assert res.exit_code == 0, res.output
    direct_run = cli("fuse", A, B, "-o", tmp_path / "direct.safetensors", "--solver", "sinkhorn", "--reg", "0.05")
    assert direct_run.exit_code == 0
    reused, direct = load_file(tmp_path / "reused.safetensors"), load_file(tmp_path / "direct.safetensors")
    assert all(torch.equal(reused[k], direct[k]) for k in direct)
    record = _provenance(tmp_path / "reused.safetensors")["options"]
    assert record["align"]["solver"] == "sinkhorn" and record["align"]["reg"] == 0.05  # not the CLI defaults
    assert record["plan_sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()


# ---------------------------------------------------------------- item 8: CI gates in evaluate

TEST = FIX / "digits" / "test.safetensors"


def _scores() -> dict:
    res = cli("evaluate", A, B, "--data", TEST, "--max-samples", "200", "--json")
    assert res.exit_code == 0, res.output
    return {r["model"]: r for r in json.loads(res.stdout)["rows"]}


def test_fail_under_and_over_gate_rows_by_their_own_scores():
    rows = _scores()
    acc_a, acc_b = rows["mlp_a"]["accuracy"], rows["mlp_b"]["accuracy"]
    low, high = sorted((acc_a, acc_b))
    assert low < high  # the fixtures score differently on these 200 samples, so a bound can split them
    worse = "mlp_a" if acc_a < acc_b else "mlp_b"
    base = ("evaluate", A, B, "--data", TEST, "--max-samples", "200", "--json")
    passed = cli(*base, "--fail-under", f"accuracy={low}")
    assert passed.exit_code == 0, passed.output
    failed = cli(*base, "--fail-under", f"accuracy={(low + high) / 2}")
    assert failed.exit_code == 3
    assert json.loads(failed.stdout)["rows"]  # the results are still printed
    assert_one_line_error(failed.stderr, "gate failed", worse, "accuracy")
    assert ("mlp_a" in failed.stderr) != ("mlp_b" in failed.stderr)
    better = "mlp_b" if worse == "mlp_a" else "mlp_a"
    assert cli(*base, "--fail-under", f"{better}:accuracy={high}").exit_code == 0  # one row only
    nll = rows[worse]["nll"]
    over = cli(*base, "--fail-over", f"{worse}:nll={nll * 0.99}")
    assert over.exit_code == 3 and "nll" in over.stderr
    assert cli(*base, "--fail-over", f"{worse}:nll={nll * 1.01}").exit_code == 0


def test_gate_usage_errors_exit_2():
    base = ("evaluate", A, "--data", TEST, "--max-samples", "50")
    for args, frag in ((("--fail-under", "nll=0.5"), "--fail-over"), (("--fail-over", "accuracy=0.5"), "--fail-under"),
                       (("--fail-under", "accuracy"), "METRIC=VALUE"), (("--fail-under", "bleu=1"), "bleu"),
                       (("--fail-under", "fused:accuracy=0.5"), "no model named 'fused'")):
        res = cli(*base, *args)
        assert res.exit_code == 2, (args, res.output)
        assert_one_line_error(res.stderr, frag)


# ---------------------------------------------------------------- item 7: output form from the path

BERT_A, BERT_B = FIX / "sentiment" / "bert_a", FIX / "sentiment" / "bert_b"


def test_output_form_follows_the_path(tmp_path):
    from otfuse_cli.checkpoint import open_checkpoint

    # a file anchor with a folder path: a folder holding model.safetensors, same tensors as the file output
    assert cli("fuse", A, B, "-o", tmp_path / "newdir/", "--align", "none").exit_code == 0
    assert cli("fuse", A, B, "-o", tmp_path / "f.safetensors", "--align", "none").exit_code == 0
    assert (tmp_path / "newdir" / "model.safetensors").is_file() and (tmp_path / "f.safetensors").is_file()
    folder, file = load_file(tmp_path / "newdir" / "model.safetensors"), load_file(tmp_path / "f.safetensors")
    assert folder.keys() == file.keys() and all(torch.equal(folder[k], file[k]) for k in file)
    assert open_checkpoint(tmp_path / "newdir").format != "file"
    # pickle suffixes: refused with the way to get safetensors, nothing written
    for name in ("x.pt", "x.bin"):
        res = cli("fuse", A, B, "-o", tmp_path / name, "--align", "none")
        assert res.exit_code == 2 and not (tmp_path / name).exists()
        assert_one_line_error(res.stderr, "x.safetensors", "torch")
    res = cli("compress", A, "-o", tmp_path / "c.pt", "--ratio", "0.5")
    assert res.exit_code == 2 and "x.safetensors" not in res.stderr and "c.safetensors" in res.stderr
    # an HF folder anchor cannot become one file (config and tokenizer would be lost)
    res = cli("fuse", BERT_A, BERT_B, "-o", tmp_path / "bert.safetensors", "--align", "none")
    assert res.exit_code == 2 and not (tmp_path / "bert.safetensors").exists()
    assert_one_line_error(res.stderr, "config.json", "folder path")
    # a plan file is one file
    res = cli("align", A, B, "-o", tmp_path / "plans")
    assert res.exit_code == 2 and not (tmp_path / "plans").exists()
    assert_one_line_error(res.stderr, ".safetensors")


# ---------------------------------------------------------------- item 5: model card


def test_folder_output_card_names_both_parents_and_quotes_the_anchor_card(tmp_path):
    import shutil

    for name in ("bert_a", "bert_b"):
        shutil.copytree(FIX / "sentiment" / name, tmp_path / name)
    (tmp_path / "bert_a" / "README.md").write_text("---\nlicense: mit\n---\n# Sentiment BERT A\n\nSeed 1 model.\n")
    res = cli("fuse", tmp_path / "bert_a", tmp_path / "bert_b", "-o", tmp_path / "fused", "--merge", "average")
    assert res.exit_code == 0, res.output
    card = (tmp_path / "fused" / "README.md").read_text()
    digest = hashlib.sha256((tmp_path / "bert_b" / "model.safetensors").read_bytes()).hexdigest()
    assert str(tmp_path / "bert_a") in card and str(tmp_path / "bert_b") in card and digest in card
    assert "\"Sentiment BERT A\"" in card  # the parent's own title, by name
    assert "otfuse 0." in card and "solver" in card and "average" in card
    head, _, quoted = card.partition("## The anchor's original card")
    assert "Seed 1 model." not in head and "> Seed 1 model." in quoted  # only as a quote, at the end
    # compress: one parent; a file output gets no card
    assert cli("compress", tmp_path / "fused", "-o", tmp_path / "small", "--width", "ffn=64").exit_code == 0
    small = (tmp_path / "small" / "README.md").read_text()
    assert "`otfuse compress`" in small and str(tmp_path / "fused") in small and "ffn" in small
    assert cli("fuse", A, B, "-o", tmp_path / "mlp", "--align", "none").exit_code == 0
    assert not (tmp_path / "mlp" / "README.md").exists()


# ---------------------------------------------------------------- item 11: compress --repair, --aligned options

CNN, CALIB = FIX / "digits" / "cnn_a.safetensors", FIX / "digits" / "calib.safetensors"


def test_compress_repair_re_estimates_batchnorm_and_helps(tmp_path):
    plain, fixed = tmp_path / "plain.safetensors", tmp_path / "fixed.safetensors"
    assert cli("compress", CNN, "-o", plain, "--ratio", "0.5").exit_code == 0
    res = cli("compress", CNN, "-o", fixed, "--ratio", "0.5", "--repair", "--data", CALIB, "--samples", "512")
    assert res.exit_code == 0, res.output
    a, b = load_file(plain), load_file(fixed)
    stats = [k for k in a if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(a[k], b[k]) for k in stats)  # every BatchNorm re-estimated ...
    assert all(torch.equal(a[k], b[k]) for k in a if k not in stats)  # ... and nothing else touched
    doc = json.loads(cli("evaluate", plain, fixed, "--data", TEST, "--json").stdout)
    acc = {r["model"]: r["accuracy"] for r in doc["rows"]}
    assert acc["fixed"] > acc["plain"] + 0.02, acc
    assert _provenance(fixed)["options"]["repair"] == {"rule": "statistics", "data": str(CALIB)}
    bert = FIX / "sentiment" / "bert_a"
    # a Hugging Face model's --repair refits its layers on the data (tests/test_compress_refit.py): images do not
    # fit a text model, and nothing is written; the rules on data need data
    for model, args, frag in ((bert, ("--data", CALIB), "a text model cannot run on tensor data"),
                              (bert, ("--repair-by", "refit"), "--repair-by refit needs --data FILE"),
                              (CNN, ("--repair-by", "refit", "--data", CALIB), "applies to Hugging Face models")):
        bad = cli("compress", model, "-o", tmp_path / "x", "--ratio", "0.5", "--repair", *args)
        assert bad.exit_code == 2, bad.output
        assert_one_line_error(bad.stderr, frag)
        assert not (tmp_path / "x").exists()


def _midpoint(*options: str) -> dict:
    res = cli("evaluate", "--interpolate", A, B, "--data", TEST, "--max-samples", "500", "--steps", "3", "--aligned",
              *options, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)["interpolation"][1]["rows"][1]


def test_aligned_interpolation_uses_the_given_alignment_options(tmp_path):
    # oracle: the aligned line's midpoint is 0.5·A + 0.5·T(B), which is what `fuse` writes with the same options
    soft = ("--solver", "sinkhorn", "--reg", "0.05")
    assert cli("fuse", A, B, "-o", tmp_path / "soft.safetensors", *soft).exit_code == 0
    fused = json.loads(cli("evaluate", tmp_path / "soft.safetensors", "--data", TEST, "--max-samples", "500",
                           "--json").stdout)["rows"][0]
    mid_soft, mid_exact = _midpoint(*soft), _midpoint()
    assert mid_soft["accuracy"] == fused["accuracy"] and abs(mid_soft["nll"] - fused["nll"]) < 1e-4
    assert abs(mid_soft["nll"] - mid_exact["nll"]) > 1e-3  # the options changed the line
    res = cli("evaluate", "--interpolate", A, B, "--data", TEST, "--steps", "2", "--solver", "sinkhorn")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "--solver", "--aligned")
    res = cli("evaluate", "--interpolate", A, B, "--data", TEST, "--steps", "2", "--aligned", "--align", "activations")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "--align-data")
