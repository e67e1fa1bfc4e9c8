"""Issue 33, part 2 with data: with --data, `fuse` runs the written model and each parent on it and compares
their top-1 predictions by Cohen's kappa (otfuse_cli/merging/predictions.py).

Oracles share no code with otfuse: the networks' forward pass is written here in numpy, and kappa is
scikit-learn's cohen_kappa_score."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file
from sklearn.metrics import cohen_kappa_score

from conftest import assert_one_line_error, cli
from otfuse_cli.merging.predictions import agreement, kappa
from test_barycentre import META, C, D, H, permuted, random_mlp  # one-hidden-layer MLPs and their permutations

def predict(sd, x) -> np.ndarray:
    return (np.maximum(x @ sd["0.weight"].T + sd["0.bias"], 0) @ sd["2.weight"].T + sd["2.bias"]).argmax(1)


def setup(tmp_path, sds, samples=200):
    x = np.random.default_rng(7).normal(size=(samples, D)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    paths = []
    for k, sd in enumerate(sds):
        save_file(sd, tmp_path / f"p{k}.safetensors", metadata=META)
        paths.append(str(tmp_path / f"p{k}.safetensors"))
    return paths, x


def fuse(paths, out, *flags):
    return cli("fuse", *paths, "-o", out, "--json", *flags)


@pytest.mark.parametrize("classes", [2, 7, 300])
def test_kappa_is_sklearns(classes):
    rng = np.random.default_rng(classes)
    a = rng.integers(0, classes, 500)
    b = np.where(rng.random(500) < 0.6, a, rng.integers(0, classes, 500))
    assert kappa(a, b) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)
    assert kappa(np.zeros(50, int), np.zeros(50, int)) == 0.0  # chance explains everything: no agreement


def test_a_parent_stuck_on_one_answer_is_named_and_left_out(tmp_path):
    """Three permuted copies of one network and a fourth that always answers class 2 (its output weights
    zero): the fourth is named; the fused model's kappas are sklearn's on the numpy forward passes."""
    rng = np.random.default_rng(0)
    base = random_mlp(rng)
    copies = [permuted(base, rng.permutation(H)) for _ in range(3)]
    stuck = {**random_mlp(rng), "2.weight": np.zeros((C, H), np.float32),
             "2.bias": np.array([0, 0, 1, 0], np.float32)}
    paths, x = setup(tmp_path, copies + [stuck])
    result = fuse(paths, tmp_path / "f.safetensors", "--data", tmp_path / "data.npz", "--samples", "200")
    assert result.exit_code == 0, result.output
    checked = json.loads(result.stdout)["fit"]["predictions"]
    assert checked["strays"] == [3] and not checked["collapsed"]
    assert "warning: model 3" in result.stderr and "p3.safetensors) predicts on --data like no other" in result.stderr
    from safetensors.numpy import load_file

    fused = predict(load_file(tmp_path / "f.safetensors"), x)
    for k, sd in enumerate(copies + [stuck]):
        assert checked["fused_kappa"][k] == pytest.approx(cohen_kappa_score(fused, predict(sd, x)), abs=1e-12)
    assert checked["rows"] == 200


def test_a_collapse_is_named_and_an_aligned_fusion_is_not(tmp_path):
    """Three hidden permutations of one network agree perfectly (kappa 1). Averaged without alignment their
    units do not correspond; aligned they are recovered exactly (kappa 1 with each, no warning)."""
    rng = np.random.default_rng(1)
    base = random_mlp(rng)
    copies = [permuted(base, rng.permutation(H)) for _ in range(3)]
    paths, x = setup(tmp_path, copies)
    vanilla = {k: np.mean([sd[k] for sd in copies], 0) for k in base}
    oracle = max(cohen_kappa_score(predict(vanilla, x), predict(sd, x)) for sd in copies)
    assert oracle < 0.5  # the premise: this average has lost the function
    result = fuse(paths, tmp_path / "v.safetensors", "--align", "none", "--data", tmp_path / "data.npz",
                  "--samples", "200")
    assert result.exit_code == 0, result.output
    checked = json.loads(result.stdout)["fit"]["predictions"]
    assert checked["collapsed"] and checked["reference"] == pytest.approx(1.0)
    assert max(checked["fused_kappa"]) == pytest.approx(oracle, abs=1e-12)
    assert result.stderr.count("warning:") == 1 and "likely lost their function" in result.stderr
    aligned = fuse(paths, tmp_path / "a.safetensors", "--data", tmp_path / "data.npz", "--samples", "200")
    assert aligned.exit_code == 0, aligned.output
    fit = json.loads(aligned.stdout)["fit"]
    assert fit["predictions"]["fused_kappa"] == pytest.approx([1.0] * 3) and "warning" not in aligned.stderr


def test_no_check_and_bad_data(tmp_path):
    rng = np.random.default_rng(2)
    base = random_mlp(rng)
    paths, _ = setup(tmp_path, [base, permuted(base, rng.permutation(H))])
    quiet = fuse(paths, tmp_path / "q.safetensors", "--data", tmp_path / "data.npz", "--no-check")
    assert quiet.exit_code == 2  # --data read by nothing then
    assert_one_line_error(quiet.stderr, "--data is read by")
    np.savez(tmp_path / "wide.npz", x=np.zeros((10, D + 1), np.float32))
    bad = fuse(paths, tmp_path / "b.safetensors", "--data", tmp_path / "wide.npz")
    assert bad.exit_code == 2
    assert_one_line_error(bad.stderr, "do not fit the model")
    assert not (tmp_path / "b.safetensors").exists()  # refused before anything was written
    plain = cli("fuse", *paths, "-o", tmp_path / "p.safetensors", "--data", tmp_path / "data.npz")
    assert plain.exit_code == 0 and "checked on 200 predictions: Cohen's kappa with the parents 1.00" in plain.stdout


def test_agreement_leaves_strays_out_of_the_reference():
    """Four parents agreeing with each other, two constant ones, and a fused model that copies a constant
    parent: collapsed, though it agrees perfectly with that parent."""
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 400)
    good = [np.where(rng.random(400) < 0.9, truth, 1 - truth) for _ in range(4)]
    constant = np.ones(400, int)
    nearly = constant.copy()
    nearly[:5] = 0
    summary = agreement(nearly, good + [constant, nearly])
    assert summary["strays"] == [4, 5] and summary["collapsed"]
    assert agreement(good[0], good + [constant, nearly])["collapsed"] is False
