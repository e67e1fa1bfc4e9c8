"""Merge rules against closed forms written here in numpy (no otfuse code): RegMean, its least-squares
property, RegMean after alignment, Fisher averaging, shareable statistics, and their bad inputs."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, cli
from models import mlp
from oracle_permute import permute_chain, permute_transformer
from tiny_transformers import tiny_model
from otfuse_cli import AlignOptions, DataOptions, fuse
from otfuse_cli.options import MergeOptions

NONE = AlignOptions(align="none")


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def mlp_inputs(sd: dict, x: np.ndarray) -> dict[str, np.ndarray]:
    """Input of every Linear layer of a ReLU MLP (nn.Sequential naming), by a numpy forward pass."""
    inputs, h = {}, x.reshape(len(x), -1).astype(np.float64)
    names = sorted({k.split(".")[0] for k in sd}, key=int)
    for i, p in enumerate(names):
        inputs[f"{p}.weight"] = h
        h = h @ sd[f"{p}.weight"].double().numpy().T + sd[f"{p}.bias"].double().numpy()
        if i < len(names) - 1:
            h = np.maximum(h, 0)
    return inputs


def regmean_closed_form(weights: list[np.ndarray], grams: list[np.ndarray], alpha: float) -> np.ndarray:
    """W = (sum G~)^-1 sum G~ W_k^T, G~ = a G + (1 - a) diag(G); W_k is (out, in)."""
    tilde = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    return np.linalg.solve(sum(tilde), sum(t @ w.T for t, w in zip(tilde, weights))).T


@pytest.fixture
def mlp_pair(tmp_path):
    a, b = mlp((20, 16, 12, 5), seed=0), mlp((20, 16, 12, 5), seed=1)
    paths = []
    for name, net in (("a", a), ("b", b)):
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / f"{name}.safetensors")
        paths.append(str(tmp_path / f"{name}.safetensors"))
    x = torch.randn(64, 20, generator=torch.Generator().manual_seed(3))
    save_file({"x": x}, tmp_path / "x.safetensors")
    return paths, x.numpy(), str(tmp_path / "x.safetensors")


@pytest.mark.parametrize("alpha", [1.0, 0.9])
def test_regmean_equals_closed_form_on_an_mlp(tmp_path, mlp_pair, alpha):
    paths, x, data = mlp_pair
    out = tmp_path / "rm.safetensors"
    fuse(paths, str(out), options=NONE, merge=MergeOptions(merge="regmean", regmean_alpha=alpha),
         data=DataOptions(data=data, samples=64))
    sds = [load_file(p) for p in paths]
    fused = load_file(out)
    for name in ("0.weight", "2.weight", "4.weight"):
        grams = [mlp_inputs(sd, x)[name].T @ mlp_inputs(sd, x)[name] for sd in sds]
        expect = regmean_closed_form([sd[name].double().numpy() for sd in sds], grams, alpha)
        assert rel(fused[name].numpy(), expect) < 1e-6, name
    for name in ("0.bias", "4.bias"):  # biases take the plain average
        assert torch.allclose(fused[name], (sds[0][name] + sds[1][name]) / 2)


@pytest.mark.parametrize("alpha", [1.0, 0.9])
def test_regmean_equals_closed_form_on_a_bert_layer(tmp_path, alpha):
    """One BERT layer's FFN input projection: Gram of its inputs captured with torch hooks on transformers'
    own model (padding excluded), solved in numpy."""
    from transformers import AutoTokenizer

    from tiny_transformers import save_tokenizer, sentences

    models = [tiny_model("bert_cls", seed=s) for s in (0, 1)]
    for k, m in enumerate(models):
        m.save_pretrained(tmp_path / f"m{k}")
        save_tokenizer(tmp_path / f"m{k}")
    texts = sentences(24)
    (tmp_path / "d.jsonl").write_text("".join(f'{{"text": "{t}"}}\n' for t in texts))
    fuse([str(tmp_path / "m0"), str(tmp_path / "m1")], str(tmp_path / "f"), options=NONE,
         merge=MergeOptions(merge="regmean", regmean_alpha=alpha), data=DataOptions(data=str(tmp_path / "d.jsonl")))
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    tok = AutoTokenizer.from_pretrained(tmp_path / "m0")
    grams, weights = [], []
    for m in models:
        seen = []
        hook = m.bert.encoder.layer[0].intermediate.dense.register_forward_pre_hook(
            lambda _m, args: seen.append(args[0].detach()))
        gram = 0
        for i in range(0, len(texts), 32):  # otfuse's batching: padding within a batch
            enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
            with torch.no_grad():
                m(**enc)
            h = seen.pop()[enc["attention_mask"].bool()].double().numpy()
            gram = gram + h.T @ h
        hook.remove()
        grams.append(gram)
        weights.append(m.state_dict()[name].double().numpy())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "f" / "model.safetensors"), "pt") as f:
        fused = f.get_tensor(name).numpy()
    assert rel(fused, regmean_closed_form(weights, grams, alpha)) < 1e-6


def test_regmean_merges_least_squares_halves_into_the_union_fit(tmp_path):
    """RegMean's defining property: least-squares regressors fitted on disjoint halves, merged with alpha=1
    from each party's own statistics, are the least-squares fit on the union."""
    gen = np.random.default_rng(0)
    x = gen.normal(size=(400, 12))
    y = x @ gen.normal(size=(12, 3)) + 0.3 * gen.normal(size=(400, 3))
    halves = [(x[:200], y[:200]), (x[200:], y[200:])]
    paths, stats = [], []
    for k, (xs, ys) in enumerate(halves):
        w = np.linalg.lstsq(xs.astype(np.float32).astype(np.float64), ys, rcond=None)[0].T  # (out, in)
        save_file({"fc.weight": torch.from_numpy(w.copy())}, tmp_path / f"r{k}.safetensors")
        save_file({"x": torch.from_numpy(xs).float()}, tmp_path / f"x{k}.safetensors")
        paths.append(str(tmp_path / f"r{k}.safetensors"))
        res = cli("stats", paths[-1], "--data", tmp_path / f"x{k}.safetensors", "--samples", "1000", "--kind",
                  "gram", "-o", tmp_path / f"s{k}.safetensors")
        assert res.exit_code == 0, res.output
        stats.append(str(tmp_path / f"s{k}.safetensors"))
    fuse(paths, str(tmp_path / "m.safetensors"), options=NONE, stats=stats,
         merge=MergeOptions(merge="regmean", regmean_alpha=1.0))
    union = np.linalg.lstsq(x.astype(np.float32).astype(np.float64), y, rcond=None)[0].T
    merged = load_file(tmp_path / "m.safetensors")["fc.weight"]
    assert merged.dtype == torch.float64
    assert rel(merged.numpy(), union) < 1e-8
    # and plain averaging is not the union fit
    fuse(paths, str(tmp_path / "avg.safetensors"), options=NONE)
    assert rel(load_file(tmp_path / "avg.safetensors")["fc.weight"].numpy(), union) > 1e-4


def test_regmean_after_alignment_equals_regmean_on_the_unpermuted_parent(tmp_path, mlp_pair):
    """Grams move into the anchor's basis with the parent's plans: fusing A with a hidden permutation of B
    by weights + RegMean equals RegMean of A and B themselves (no alignment needed)."""
    paths, x, data = mlp_pair
    sd_b = load_file(paths[1])
    permuted = permute_chain(sd_b, torch.Generator().manual_seed(5), [("0", []), ("2", []), ("4", [])])
    save_file({k: v.contiguous() for k, v in permuted.items()}, tmp_path / "bp.safetensors")
    merge = MergeOptions(merge="regmean", regmean_alpha=0.9)
    opts = DataOptions(data=data, samples=64)
    # alignment of A and B finds some plan P; aligning A and P(B) must find P composed with the hidden one
    fuse(paths, str(tmp_path / "direct.safetensors"), merge=merge, data=opts)
    fuse([paths[0], str(tmp_path / "bp.safetensors")], str(tmp_path / "hidden.safetensors"), merge=merge, data=opts)
    a, b = load_file(tmp_path / "direct.safetensors"), load_file(tmp_path / "hidden.safetensors")
    for name in a:
        assert rel(b[name].numpy(), a[name].numpy()) < 1e-6, name


def test_regmean_with_alignment_on_gqa_llama_uses_moved_grams(tmp_path):
    """Transformers too: a Llama with GQA against its own oracle-permuted copy, RegMean after alignment gives
    the same tensors as RegMean of the model with its unpermuted copy (every Gram moved by the plans)."""
    from tiny_transformers import save_tokenizer, sentences

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "a")
    save_tokenizer(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    permuted = permute_transformer(sd, model.config, torch.Generator().manual_seed(2))
    for name in list(permuted):
        if name not in load_file(tmp_path / "a" / "model.safetensors"):
            del permuted[name]
    save_file({k: v.contiguous() for k, v in permuted.items()}, tmp_path / "b" / "model.safetensors",
              metadata={"format": "pt"})
    (tmp_path / "d.jsonl").write_text("".join(f'{{"text": "{t}"}}\n' for t in sentences(16)))
    merge = MergeOptions(merge="regmean", regmean_alpha=0.9)
    data = DataOptions(data=str(tmp_path / "d.jsonl"))
    fuse([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "f"), merge=merge, data=data)
    fused = load_file(tmp_path / "f" / "model.safetensors")
    # RegMean of a model with itself (both Grams equal, weights equal) is the model
    for name, t in load_file(tmp_path / "a" / "model.safetensors").items():
        assert rel(fused[name].numpy(), t.numpy()) < 1e-5, name


@pytest.mark.parametrize("block", [5, None])
def test_fisher_equals_a_hand_computation_on_a_two_layer_mlp(tmp_path, monkeypatch, block):
    """Diagonal Fisher of a 2-layer MLP by hand-written backprop in numpy, labels drawn as documented (one
    multinomial draw per sample from the model's softmax, a generator seeded with --seed, data order).
    block 5: the elementwise rule applied to blocks of 5 elements gives the same numbers."""
    if block:
        monkeypatch.setattr("otfuse_cli.fusion.BLOCK", block)
    nets = [mlp((6, 5, 3), seed=s) for s in (0, 1)]
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(1))
    save_file({"x": x}, tmp_path / "x.safetensors")
    paths = []
    for k, net in enumerate(nets):
        save_file({n: v.contiguous() for n, v in net.state_dict().items()}, tmp_path / f"n{k}.safetensors")
        paths.append(str(tmp_path / f"n{k}.safetensors"))
    fuse(paths, str(tmp_path / "f.safetensors"), options=NONE, merge=MergeOptions(merge="fisher"),
         data=DataOptions(data=str(tmp_path / "x.safetensors"), seed=4))
    fishers = []
    for net in nets:
        sd = {n: v.double().numpy() for n, v in net.state_dict().items()}
        gen = torch.Generator().manual_seed(4)
        acc = {n: np.zeros_like(v) for n, v in sd.items()}
        for xi in x.double().numpy():
            h_pre = sd["0.weight"] @ xi + sd["0.bias"]
            h = np.maximum(h_pre, 0)
            z = sd["2.weight"] @ h + sd["2.bias"]
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            y = int(torch.multinomial(torch.from_numpy(p).float()[None], 1, generator=gen))
            dz = -p.copy()  # d log p_y / dz = onehot(y) - p
            dz[y] += 1
            dh = (sd["2.weight"].T @ dz) * (h_pre > 0)
            grads = {"2.weight": np.outer(dz, h), "2.bias": dz, "0.weight": np.outer(dh, xi), "0.bias": dh}
            for n, g in grads.items():
                acc[n] += g ** 2
        fishers.append({n: v / len(x) for n, v in acc.items()})
    fused = load_file(tmp_path / "f.safetensors")
    for name in fishers[0]:
        thetas = [net.state_dict()[name].double().numpy() for net in nets]
        expect = (fishers[0][name] * thetas[0] + fishers[1][name] * thetas[1]) / (fishers[0][name] + fishers[1][name])
        both_zero = (fishers[0][name] + fishers[1][name]) == 0
        expect = np.where(both_zero, (thetas[0] + thetas[1]) / 2, expect)
        assert rel(fused[name].numpy(), expect) < 1e-4, name


def test_stats_files_reproduce_fuse_with_data_byte_for_byte(tmp_path, mlp_pair):
    """Each party computes its statistics alone; fuse then reads no data file and writes the same tensors
    as the one-party shortcut --data."""
    paths, _, data = mlp_pair
    for k, p in enumerate(paths):
        assert cli("stats", p, "--data", data, "--samples", "64", "-o", tmp_path / f"s{k}.safetensors").exit_code == 0
    direct = cli("fuse", *paths, "-o", tmp_path / "d.safetensors", "--merge", "regmean", "--data", data,
                 "--samples", "64")
    assert direct.exit_code == 0, direct.output
    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(data, moved)  # the data is gone: --stats must not need it
    shared = cli("fuse", *paths, "-o", tmp_path / "s.safetensors", "--merge", "regmean",
                 "--stats", tmp_path / "s0.safetensors", "--stats", tmp_path / "s1.safetensors")
    assert shared.exit_code == 0, shared.output
    a, b = load_file(tmp_path / "d.safetensors"), load_file(tmp_path / "s.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_merge_inputs_are_one_line(tmp_path, mlp_pair):
    paths, _, data = mlp_pair
    other = mlp((20, 16, 12, 5), seed=7)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "other.safetensors")
    assert cli("stats", tmp_path / "other.safetensors", "--data", data, "-o", tmp_path / "so.safetensors",
               "--kind", "gram").exit_code == 0
    assert cli("stats", paths[0], "--data", data, "-o", tmp_path / "s0.safetensors", "--kind", "gram").exit_code == 0
    before = {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}
    cases = [
        (["--merge", "regmean"], "needs statistics"),
        (["--merge", "regmean", "--stats", tmp_path / "s0.safetensors"], "one file per model"),
        (["--merge", "regmean", "--stats", tmp_path / "s0.safetensors", "--stats", tmp_path / "so.safetensors"],
         "was not computed from model 1"),
        (["--merge", "regmean", "--stats", tmp_path / "s0.safetensors", "--stats", paths[1]],
         "is not an otfuse stats file"),
        (["--merge", "fisher", "--stats", tmp_path / "s0.safetensors", "--stats", tmp_path / "s0.safetensors"],
         "was not computed from model 1"),
        (["--stats", tmp_path / "s0.safetensors", "--stats", tmp_path / "s0.safetensors"], "--stats is read by"),
    ]
    for args, words in cases:
        res = cli("fuse", *paths, "-o", tmp_path / "out.safetensors", *args)
        assert res.exit_code == 2, (args, res.output)
        assert_one_line_error(res.stderr, words)
        assert not (tmp_path / "out.safetensors").exists()
    # a singular Gram with alpha = 1: 16 inputs seen through only 3 samples
    res = cli("fuse", *paths, "-o", tmp_path / "out.safetensors", "--align", "none", "--merge", "regmean",
              "--regmean-alpha", "1", "--data", data, "--samples", "3")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "singular Gram matrix", "--regmean-alpha below 1")
    assert before == {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}


@pytest.mark.parametrize("block", [7, None])
def test_weighted_average_of_bf16_parents_is_computed_in_float32_blockwise(tmp_path, monkeypatch, block):
    """bf16 parents of awkward sizes (blocks of 7 cut every tensor mid-row): the result is numpy's float64
    weighted average within bf16's rounding, in bf16, never off by a block boundary."""
    if block:
        monkeypatch.setattr("otfuse_cli.fusion.BLOCK", block)
    gen = torch.Generator().manual_seed(0)
    shapes = {"0.weight": (5, 6), "0.bias": (5,), "2.weight": (3, 5), "2.bias": (3,)}
    parents = [{n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in shapes.items()} for _ in range(2)]
    paths = []
    for k, sd in enumerate(parents):
        save_file(sd, tmp_path / f"p{k}.safetensors")
        paths.append(str(tmp_path / f"p{k}.safetensors"))
    fuse(paths, str(tmp_path / "f.safetensors"), options=NONE, weights="0.3,0.7")
    fused = load_file(tmp_path / "f.safetensors")
    for name in shapes:
        a, b = (p[name].double().numpy() for p in parents)
        assert fused[name].dtype == torch.bfloat16
        assert np.abs(fused[name].double().numpy() - (0.3 * a + 0.7 * b)).max() <= 2**-8 * np.abs(0.3 * a + 0.7 * b).max()
