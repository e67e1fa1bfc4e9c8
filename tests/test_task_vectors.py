"""Children of one pre-trained model (fuse --base): the task-vector rules against closed forms written here in
numpy (no otfuse code), DARE's determinism, rules that commute with the base, the identity certificate that
skips the assignment solve, and parents with different task heads written as one model folder each."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, cli
from models import mlp
from oracle_permute import permute_chain
from tiny_transformers import save_tokenizer
from otfuse_cli import AlignOptions, MergeOptions, fuse

NONE = AlignOptions(align="none")
LAYERS = [("0", []), ("2", []), ("4", [])]


def children(tmp_path, count=3, scale=0.05, seed=0, sparse=False):
    """A bare ReLU MLP (the base) and `count` children = base + tau_k, as safetensors files."""
    base = {k: v.detach().clone() for k, v in mlp((12, 10, 8, 4), seed=seed).state_dict().items()}
    if sparse:  # multiples of 2^-6 plus multiples of 2^-8: sums and differences exact in float32
        base = {k: torch.round(v * 64) / 64 for k, v in base.items()}
    gen = torch.Generator().manual_seed(seed + 1)
    save_file(base, tmp_path / "base.safetensors")
    paths, taus = [], []
    for k in range(count):
        tau = {n: scale * torch.randn(v.shape, generator=gen) for n, v in base.items()}
        if sparse:  # entries of equal magnitude and opposite signs: sign-election ties and threshold ties
            tau = {n: torch.sign(t) * 2.0**-8 * (1 + (torch.arange(t.numel()).view(t.shape) % 3)) for n, t in tau.items()}
        save_file({n: base[n] + tau[n] for n in base}, tmp_path / f"c{k}.safetensors")
        paths.append(str(tmp_path / f"c{k}.safetensors"))
        taus.append({n: (base[n] + tau[n]).double().numpy() - base[n].double().numpy() for n in base})
    return str(tmp_path / "base.safetensors"), paths, {n: v.double().numpy() for n, v in base.items()}, taus


def trimmed(tau: np.ndarray, density: float) -> np.ndarray:
    """TIES' trim: keep magnitudes at or above the ceil(density * n)-th largest."""
    mags = np.sort(np.abs(tau).ravel())[::-1]
    k = int(np.ceil(density * mags.size))
    return tau if k >= mags.size else np.where(np.abs(tau) >= mags[k - 1], tau, 0.0)


def elected_mean(taus: list[np.ndarray], w: list[float]) -> np.ndarray:
    sign = np.sign(sum(wi * t for wi, t in zip(w, taus)))
    agree = [(np.sign(t) == sign) & (t != 0) for t in taus]
    num = sum(wi * np.where(a, t, 0.0) for wi, t, a in zip(w, taus, agree))
    den = sum(wi * a for wi, a in zip(w, agree))
    return np.where(den > 0, num / np.maximum(den, 1e-30), 0.0)


def merged(tmp_path, paths, base, merge: MergeOptions, align=NONE, weights=None, seed=0, name="out.safetensors"):
    fuse(paths, str(tmp_path / name), options=align, merge=merge, base=base, weights=weights,
         data=__import__("otfuse_cli").DataOptions(seed=seed))
    return {n: v.double().numpy() for n, v in load_file(tmp_path / name).items()}


def test_task_arithmetic_is_base_plus_lambda_times_the_weighted_sum(tmp_path):
    base, paths, b, taus = children(tmp_path)
    out = merged(tmp_path, paths, base, MergeOptions(merge="task-arithmetic", scale=0.7), weights="1,2,3")
    w = np.array([1, 2, 3]) / 6 * 3  # K * normalised weights: equal weights give the plain sum
    for n in b:
        np.testing.assert_allclose(out[n], b[n] + 0.7 * sum(wk * t[n] for wk, t in zip(w, taus)), atol=2e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_ties_matches_trim_elect_disjoint_mean(tmp_path, sparse):
    """Random task vectors, and ones built of equal magnitudes with opposite signs (elections that tie at
    zero give no entry; entries tied at the threshold are all kept)."""
    base, paths, b, taus = children(tmp_path, count=2 if sparse else 3, sparse=sparse)
    out = merged(tmp_path, paths, base, MergeOptions(merge="ties", density=0.4, scale=0.9))
    w = [1 / len(paths)] * len(paths)
    for n in b:
        expect = b[n] + 0.9 * elected_mean([trimmed(t[n], 0.4) for t in taus], w)
        np.testing.assert_allclose(out[n], expect, atol=2e-6)
    if sparse:  # the construction does make elections tie: those entries stay at the base
        tied = [n for n in b if (np.sign(taus[0][n]) == -np.sign(taus[1][n])).any()]
        assert tied


def test_ties_election_tie_keeps_the_base(tmp_path):
    """Two task vectors that cancel exactly: every sign election is a tie, and the result is the base."""
    shapes = {"0.weight": (4, 3), "0.bias": (4,), "2.weight": (2, 4), "2.bias": (2,)}
    base_sd = {n: torch.round(torch.randn(s) * 64) / 64 for n, s in shapes.items()}  # +-0.25 stays exact
    save_file(base_sd, tmp_path / "base.safetensors")
    tau = {n: torch.full(v.shape, 0.25) for n, v in base_sd.items()}
    for k, s in enumerate((1, -1)):
        save_file({n: base_sd[n] + s * tau[n] for n in base_sd}, tmp_path / f"c{k}.safetensors")
    fuse([str(tmp_path / "c0.safetensors"), str(tmp_path / "c1.safetensors")], str(tmp_path / "o.safetensors"),
         options=NONE, merge=MergeOptions(merge="ties", density=1.0), base=str(tmp_path / "base.safetensors"))
    out = load_file(tmp_path / "o.safetensors")
    for n in base_sd:
        assert torch.equal(out[n], base_sd[n])


@pytest.mark.parametrize("rule", ["dare", "dare-ties"])
def test_dare_drops_and_rescales_deterministically(tmp_path, monkeypatch, rule):
    base, paths, b, taus = children(tmp_path, count=1, scale=0.1)
    paths.append(base)  # a second child that is the base itself: tau = 0 adds nothing to either rule
    merge = MergeOptions(merge=rule, density=0.3, scale=1.0)
    first = merged(tmp_path, paths, base, merge, seed=5, name="a.safetensors")
    again = merged(tmp_path, paths, base, merge, seed=5, name="b.safetensors")
    other = merged(tmp_path, paths, base, merge, seed=6, name="c.safetensors")
    monkeypatch.setattr("otfuse_cli.fusion.BLOCK", 7)  # masks do not depend on how tensors are cut
    blocked = merged(tmp_path, paths, base, merge, seed=5, name="d.safetensors")
    kept = total = 0
    for n in b:
        assert np.array_equal(first[n], again[n]) and np.array_equal(first[n], blocked[n])
        delta, tau = first[n] - b[n], taus[0][n]
        on = np.abs(delta) > 1e-7
        # one parent: every entry is dropped (the base) or its task vector divided by the density
        np.testing.assert_allclose(delta[on], tau[on] / 0.3, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(delta[~on], 0.0, atol=1e-7)
        kept, total = kept + on.sum(), total + on.size
    assert any(not np.array_equal(first[n], other[n]) for n in b)
    assert abs(kept / total - 0.3) < 4 * np.sqrt(0.3 * 0.7 / total)  # binomial: within four sd


def test_dare_at_density_one_is_task_arithmetic(tmp_path):
    base, paths, b, taus = children(tmp_path)
    out = merged(tmp_path, paths, base, MergeOptions(merge="dare", density=1.0, scale=0.5))
    for n in b:
        np.testing.assert_allclose(out[n], b[n] + 0.5 * sum(t[n] for t in taus), atol=2e-6)


@pytest.mark.parametrize("rule", ["average", "fisher", "regmean"])
def test_rules_without_a_base_are_unchanged_by_it(tmp_path, rule):
    """average, Fisher and RegMean are weighted means (weights summing to one per entry or row), so merging
    task vectors and adding the base back gives what merging the weights gives."""
    base, paths, b, taus = children(tmp_path)
    merge = MergeOptions(merge=rule)
    data = None
    if rule != "average":
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(64, 12, generator=gen)
        np.savez(tmp_path / "d.npz", x=x.numpy(), y=torch.randint(0, 4, (64,), generator=gen).numpy())
        data = str(tmp_path / "d.npz")
    from otfuse_cli import DataOptions

    opts = DataOptions(data=data, activation="relu", samples=64) if data else DataOptions()
    fuse(paths, str(tmp_path / "with.safetensors"), options=NONE, merge=merge, base=base, data=opts)
    fuse(paths, str(tmp_path / "without.safetensors"), options=NONE, merge=merge, data=opts)
    a, c = load_file(tmp_path / "with.safetensors"), load_file(tmp_path / "without.safetensors")
    for n in a:
        torch.testing.assert_close(a[n], c[n], atol=1e-5, rtol=1e-5)
    if rule == "average":  # and both are the plain mean
        for n in b:
            np.testing.assert_allclose(a[n].double().numpy(), b[n] + sum(t[n] for t in taus) / 3, atol=2e-6)


def test_children_of_one_base_need_no_assignment_and_a_permuted_child_is_still_aligned(tmp_path):
    """Weight alignment of children of one base: every plan is the identity (said in a note) and the result
    equals --align none's; a child with hidden permutations is aligned back, with no such note."""
    base, paths, b, taus = children(tmp_path, count=2, scale=0.02)
    res = cli("fuse", *paths, "-o", tmp_path / "w.safetensors", "--base", base, "--merge", "ties")
    assert res.exit_code == 0, res.stderr
    assert "every plan is the identity" in res.stderr
    res = cli("fuse", *paths, "-o", tmp_path / "n.safetensors", "--base", base, "--merge", "ties", "--align", "none")
    assert res.exit_code == 0, res.stderr
    w, n = load_file(tmp_path / "w.safetensors"), load_file(tmp_path / "n.safetensors")
    assert all(torch.equal(w[k], n[k]) for k in w)
    sd = load_file(paths[1])
    save_file(permute_chain(sd, torch.Generator().manual_seed(9), LAYERS), tmp_path / "perm.safetensors")
    res = cli("fuse", paths[0], tmp_path / "perm.safetensors", "-o", tmp_path / "p.safetensors", "--base", base,
              "--merge", "ties")
    assert res.exit_code == 0, res.stderr
    assert "every plan is the identity" not in res.stderr
    p = load_file(tmp_path / "p.safetensors")
    for k in w:
        torch.testing.assert_close(p[k], w[k], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- different task heads

def bert_family(tmp_path):
    """A pre-trained tiny BERT body (BertModel: no task head, no "bert." prefix) and two classifiers
    fine-tuned from it with different label sets (2 and 3 classes)."""
    cfg = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24)
    torch.manual_seed(0)
    base = T.BertModel(T.BertConfig(**cfg)).eval()
    base.save_pretrained(tmp_path / "base")
    save_tokenizer(tmp_path / "base")
    folders = []
    for name, labels, seed in (("sentiment", 2, 1), ("topic", 3, 2)):
        config = T.BertConfig(**cfg, num_labels=labels, id2label={i: f"{name}_{i}" for i in range(labels)},
                              label2id={f"{name}_{i}": i for i in range(labels)})
        torch.manual_seed(seed)
        model = T.BertForSequenceClassification(config).eval()
        model.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        model.save_pretrained(tmp_path / name)
        save_tokenizer(tmp_path / name)
        folders.append(tmp_path / name)
    return tmp_path / "base", folders


def test_parents_with_different_heads_fuse_into_one_folder_each(tmp_path):
    """The 2-label and 3-label classifiers: OUT/sentiment and OUT/topic share identical body tensors, keep
    their own heads and label names, load with from_pretrained and run in a text-classification pipeline;
    their logits equal a model assembled here from base + lambda * (tau_1 + tau_2) with the parent's head."""
    base, (a, b) = bert_family(tmp_path)
    out = tmp_path / "merged"
    res = cli("fuse", a, b, "-o", out, "--base", base, "--merge", "task-arithmetic", "--scale", "0.6",
              "--align", "none")
    assert res.exit_code == 0, res.stderr
    assert "each parent keeps its own head" in res.stderr
    (tmp_path / "d.jsonl").write_text('{"text": "the film was good", "label": "topic_0"}\n')
    res = cli("evaluate", out, "--data", tmp_path / "d.jsonl")  # the bundle itself is not one model
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "holds 2 models", str(out / "topic"))
    bodies = []
    base_sd = {f"bert.{n}": v for n, v in load_file(base / "model.safetensors").items()}
    parents = {p.name: load_file(p / "model.safetensors") for p in (a, b)}
    for parent in (a, b):
        folder = out / parent.name
        sd = load_file(folder / "model.safetensors")
        heads = {n for n in sd if n.startswith("classifier.")}
        assert heads == {"classifier.weight", "classifier.bias"}
        for n in heads:
            assert torch.equal(sd[n], parents[parent.name][n])
        bodies.append({n: v for n, v in sd.items() if n not in heads})
        config = json.loads((folder / "config.json").read_text())
        assert config["id2label"] == json.loads((parent / "config.json").read_text())["id2label"]
        model = T.AutoModelForSequenceClassification.from_pretrained(folder).eval()
        oracle = T.BertForSequenceClassification(T.BertConfig.from_pretrained(parent)).eval()
        expect = {}
        for n, v in parents[parent.name].items():
            if n in heads or n not in base_sd:
                expect[n] = v
            else:
                expect[n] = base_sd[n] + 0.6 * sum(parents[p][n] - base_sd[n] for p in parents)
        oracle.load_state_dict(expect, strict=False)
        ids = torch.randint(5, 40, (3, 6), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, oracle(input_ids=ids).logits, atol=1e-5,
                                       rtol=1e-4)
        pipe = T.pipeline("text-classification", model=model, tokenizer=T.AutoTokenizer.from_pretrained(folder))
        assert pipe("the film was good")[0]["label"].startswith(parent.name)
    assert bodies[0].keys() == bodies[1].keys()
    assert all(torch.equal(bodies[0][n], bodies[1][n]) for n in bodies[0])


def test_heads_keep_on_same_label_sets_and_heads_merge_refused_for_different_ones(tmp_path):
    base, (a, b) = bert_family(tmp_path)
    res = cli("fuse", a, a, "-o", tmp_path / "same", "--base", base, "--merge", "ties", "--heads", "keep",
              "--align", "none")
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "same").iterdir()) == ["sentiment-0", "sentiment-1"]
    res = cli("fuse", a, b, "-o", tmp_path / "m", "--heads", "merge", "--align", "none")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "classifier")
    assert not (tmp_path / "m").exists()


def test_inspect_calls_different_heads_a_shared_body(tmp_path):
    _, (a, b) = bert_family(tmp_path)
    res = cli("inspect", a, b, "--check", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["comparison"]["verdict"] == "shared body, different task heads"


def test_recipe_with_a_base(tmp_path):
    base, paths, b, taus = children(tmp_path)
    (tmp_path / "r.yaml").write_text("command: fuse\nmodels: [c0.safetensors, c1.safetensors, c2.safetensors]\n"
                                     "output: o.safetensors\nbase: base.safetensors\noptions: {align: none}\n"
                                     "merge: {merge: ties, density: 0.5, scale: 1.0}\n")
    res = cli("run", tmp_path / "r.yaml")
    assert res.exit_code == 0, res.stderr
    out = load_file(tmp_path / "o.safetensors")
    for n in b:
        expect = b[n] + elected_mean([trimmed(t[n], 0.5) for t in taus], [1 / 3] * 3)
        np.testing.assert_allclose(out[n].double().numpy(), expect, atol=2e-6)
    meta = json.loads((tmp_path / "o.safetensors").read_bytes()[8:8 + int.from_bytes(
        (tmp_path / "o.safetensors").read_bytes()[:8], "little")])["__metadata__"]["otfuse"]
    assert json.loads(meta)["options"]["base"].endswith("base.safetensors")


BAD = {
    "task vectors without a base": (["--merge", "ties"], "--base"),
    "scale for average": (["--base", "{base}", "--scale", "0.5"], "--scale does not apply"),
    "density for task arithmetic": (["--base", "{base}", "--merge", "task-arithmetic", "--density", "0.5"],
                                    "--density does not apply"),
    "base of other shapes": (["--base", "{other}", "--merge", "ties"], "shape"),
    "missing base": (["--base", "{missing}", "--merge", "ties"], "no such file"),
    "heads keep without heads": (["--base", "{base}", "--merge", "ties", "--heads", "keep"], "no task head"),
    "seed for ties": (["--base", "{base}", "--merge", "ties", "--seed", "3"], "--seed does not apply"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_task_vector_inputs_get_one_line(tmp_path, case):
    base, paths, _, _ = children(tmp_path)
    save_file({k: v for k, v in mlp((12, 9, 8, 4)).state_dict().items()}, tmp_path / "other.safetensors")
    args, fragment = BAD[case]
    args = [a.format(base=base, other=tmp_path / "other.safetensors", missing=tmp_path / "nope") for a in args]
    before = {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}
    res = cli("fuse", *paths, "-o", tmp_path / "o.safetensors", "--align", "none", *args)
    assert res.exit_code == 2, res.stderr
    assert_one_line_error(res.stderr, fragment)
    assert not (tmp_path / "o.safetensors").exists()
    assert before == {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}


def mlp_grams(sd: dict, x: np.ndarray) -> dict[str, np.ndarray]:
    """X^T X of every Linear layer's input, by a numpy forward pass of the ReLU MLP (nn.Sequential naming)."""
    grams, h = {}, x.astype(np.float64)
    names = sorted({k.split(".")[0] for k in sd}, key=int)
    for i, p in enumerate(names):
        grams[f"{p}.weight"] = h.T @ h
        h = h @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]
        h = np.maximum(h, 0) if i < len(names) - 1 else h
    return grams


def regmean_solve(taus: list[np.ndarray], grams: list[np.ndarray], alpha: float) -> np.ndarray:
    tilde = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    return np.linalg.solve(sum(tilde), sum(t @ w.T for t, w in zip(tilde, taus))).T


def test_regmean_on_ties_task_vectors_matches_the_closed_form(tmp_path):
    """Linear maps: RegMean's solve on the trimmed task vectors cleared where they disagree with the elected
    sign; biases: TIES' disjoint mean. Grams from a numpy forward pass of each child on the same inputs."""
    from otfuse_cli import DataOptions

    base, paths, b, taus = children(tmp_path, count=2, scale=0.2)
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(3))
    save_file({"x": x}, tmp_path / "x.safetensors")
    fuse(paths, str(tmp_path / "o.safetensors"), options=NONE, base=base,
         merge=MergeOptions(merge="regmean-ties", density=0.5, scale=0.8, regmean_alpha=0.9),
         data=DataOptions(data=str(tmp_path / "x.safetensors"), samples=64))
    out = {n: v.double().numpy() for n, v in load_file(tmp_path / "o.safetensors").items()}
    sds = [{n: b[n] + t[n] for n in b} for t in taus]
    grams = [mlp_grams(sd, x.double().numpy()) for sd in sds]
    for n in b:
        trimmed_taus = [trimmed(t[n], 0.5) for t in taus]
        if n.endswith("weight"):
            sign = np.sign(sum(trimmed_taus))
            agreeing = [np.where(np.sign(t) == sign, t, 0.0) for t in trimmed_taus]
            expect = b[n] + 0.8 * regmean_solve(agreeing, [g[n] for g in grams], 0.9)
        else:
            expect = b[n] + 0.8 * elected_mean(trimmed_taus, [0.5, 0.5])
        assert np.abs(out[n] - expect).max() <= 1e-5 * max(1.0, np.abs(expect).max()), n


def test_regmean_on_dare_at_density_one_is_scaled_regmean(tmp_path):
    from otfuse_cli import DataOptions

    base, paths, b, taus = children(tmp_path, count=2, scale=0.2)
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(3))
    save_file({"x": x}, tmp_path / "x.safetensors")
    data = DataOptions(data=str(tmp_path / "x.safetensors"), samples=64)
    fuse(paths, str(tmp_path / "o.safetensors"), options=NONE, base=base, data=data,
         merge=MergeOptions(merge="regmean-dare", density=1.0, scale=0.5, regmean_alpha=0.9))
    out = {n: v.double().numpy() for n, v in load_file(tmp_path / "o.safetensors").items()}
    grams = [mlp_grams({n: b[n] + t[n] for n in b}, x.double().numpy()) for t in taus]
    for n in b:
        merged_tau = (regmean_solve([t[n] for t in taus], [g[n] for g in grams], 0.9) if n.endswith("weight")
                      else sum(t[n] for t in taus) / 2)
        assert np.abs(out[n] - (b[n] + 0.5 * merged_tau)).max() <= 1e-5 * max(1.0, np.abs(b[n]).max()), n


@pytest.mark.parametrize("band_cap", [None, 0])  # 0: every selection through the radix fallback
def test_magnitude_threshold_is_numpys_kth_largest_on_awkward_tensors(monkeypatch, band_cap):
    """TIES' per-tensor threshold, streamed in blocks, against numpy's sort: zeros (an untouched layer),
    mostly zeros, coarsely quantised values, bf16 steps, tiny tensors."""
    from otfuse_cli.merging import rules

    if band_cap is not None:
        monkeypatch.setattr(rules, "BAND_CAP", band_cap)
    gen = torch.Generator().manual_seed(0)
    sparse = torch.zeros(300_000)
    sparse[:9_000] = torch.randn(9_000, generator=gen)
    cases = [torch.randn(100_000, generator=gen), torch.zeros(50_000), sparse,
             torch.round(torch.randn(200_000, generator=gen) * 8) / 8,
             torch.randn(200_000, generator=gen).to(torch.bfloat16).float(), torch.randn(7, generator=gen)]
    for x in cases:
        for density in (0.01, 0.2, 0.5, 0.97):
            blocks = lambda x=x: (x[i:i + 4096] for i in range(0, x.numel(), 4096))
            k = int(np.ceil(density * x.numel()))
            expect = np.sort(np.abs(x.numpy()))[::-1][k - 1] if k < x.numel() else 0.0
            assert rules.magnitude_threshold(blocks, density) == expect, (x.numel(), density)
