"""The paths that keep alignment small and fast at LLM scale (issue 16), each against an oracle that shares
no code with it: the head-space cost against scipy's cdist, the assignment solver against scipy's, compact
hard plans against a coupling written out by hand, and a memory bound on the head cost measured in a
subprocess."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from conftest import REPO, cli
from otfuse_cli.alignment.cost import Features, _dims, channel_grams
from otfuse_cli.alignment.solvers import assignment
from otfuse_cli.alignment.transport import Plan


def head_dims(xs, ys, metric):
    """The head cost of one channel whose entries are xs and ys, each (units, dims, features)."""
    grams = channel_grams(Features(channels={"h": xs}), Features(channels={"h": ys}))
    return _dims(grams[("channel", "h")], metric)


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_head_cost_is_cdist_of_every_head_pair(metric):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 2, generator=g)]  # 3 heads of 4 dims, two entries
    ys = [torch.randn(5, 4, 5, generator=g), torch.randn(5, 4, 2, generator=g)]
    got = head_dims(xs, ys, metric).numpy()
    xp, xa = torch.cat(xs, -1).double().numpy(), torch.cat(ys, -1).double().numpy()
    assert got.shape == (3, 5, 4, 4)
    for u in range(3):
        for v in range(5):
            np.testing.assert_allclose(got[u, v], cdist(xp[u], xa[v], metric), rtol=1e-10, atol=1e-10)


def test_head_cost_memory_stays_near_its_output():
    """32 heads x 64 dims x 1024 features a side: broadcasting both sides to (n, m, d, D) float64 would take
    2 x 1.07 GB; one matrix product needs two 17 MB inputs and a 34 MB result."""
    code = textwrap.dedent("""
        import resource, torch
        from otfuse_cli.alignment.cost import Features, _dims, channel_grams
        x, y = Features(channels={"h": [torch.randn(32, 64, 1024)]}), Features(channels={"h": [torch.randn(32, 64, 1024)]})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = _dims(channel_grams(x, y)[("channel", "h")], "sqeuclidean")
        assert out.shape == (32, 32, 64, 64)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    grown_mb = int(result.stdout.split()[-1])
    assert grown_mb < 300, f"head cost grew the process by {grown_mb} MB"


def scipy_src(cost: np.ndarray) -> np.ndarray:
    rows, cols = linear_sum_assignment(cost)
    src = np.empty(len(cols), dtype=np.int64)
    src[cols] = rows
    return src


@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
def test_assignment_matches_scipy(n):
    rng = np.random.default_rng(n)
    for cost in (rng.random((n, n)), rng.standard_normal((n, 32)) @ rng.standard_normal((32, n))):
        np.testing.assert_array_equal(assignment(cost), scipy_src(cost))


def test_assignment_keeps_precision_under_a_large_common_offset():
    """Squared distances between large weight vectors share a big offset; float32 of the raw cost could not
    tell the candidates apart (spacing 0.06 at 1e6), the reduced cost can."""
    rng = np.random.default_rng(0)
    cost = 1e6 + rng.random((200, 200)) + rng.random((200, 1)) * 1e3
    np.testing.assert_array_equal(assignment(cost), scipy_src(cost))


def test_compact_plans_stand_for_the_scaled_permutation():
    src = torch.tensor([2, 0, 3, 1])
    plan = Plan(index=src)
    by_hand = torch.zeros(4, 4, dtype=torch.float64)
    for anchor_unit, parent_unit in enumerate([2, 0, 3, 1]):
        by_hand[parent_unit, anchor_unit] = 0.25
    assert plan.shape == (4, 4) and torch.equal(plan.coupling, by_hand)
    assert torch.equal(Plan(by_hand).hard_index(), src) and Plan(by_hand).index is None
    assert plan.same_as(Plan(by_hand)) and not plan.same_as(Plan(index=torch.tensor([0, 2, 3, 1])))


def test_soft_plans_are_the_same_when_no_unit_mixture_moves_more_than_the_tolerance():
    base = torch.full((4, 4), 1 / 16, dtype=torch.float64)
    nudge = torch.zeros(4, 4, dtype=torch.float64)
    nudge[0, 0], nudge[1, 0] = 1e-7, -1e-7  # column 0's mixture moves by 2 * 1e-7 * 4 = 8e-7 of its mass
    assert Plan(base).same_as(Plan(base + nudge))
    assert not Plan(base).same_as(Plan(base + 1e4 * nudge))  # 8e-3 of column 0's mass


def test_alignment_writes_hard_plans_as_index_vectors(tmp_path):
    from safetensors.torch import load_file, save_file

    from models import mlp

    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"m{seed}.safetensors")
        save_file({k: v.contiguous() for k, v in mlp((20, 16, 12, 5), seed).state_dict().items()}, paths[-1])
    assert cli("align", *paths, "-o", tmp_path / "plans.safetensors").exit_code == 0
    tensors = load_file(tmp_path / "plans.safetensors")
    assert sorted(tensors) == ["1/0/index", "1/2/index"]  # the Sequential's Linear layers 0 and 2
    assert [len(tensors[k]) for k in sorted(tensors)] == [16, 12]
    assert all(torch.equal(t.sort().values, torch.arange(len(t))) for t in tensors.values())


@pytest.mark.parametrize("pair", [("digits/cnn_a.safetensors", "digits/cnn_b.safetensors"),
                                  ("sentiment/bert_a", "sentiment/bert_b")])
def test_refinement_skips_only_spaces_whose_inputs_did_not_move(pair):
    """Skipping a re-solve whose neighbours' plans are unchanged must give exactly the plans of the engine
    that re-solves every space every sweep (the same provider without its neighbour map). The trained
    fixtures take 3-4 sweeps, so some spaces are skipped."""
    from otfuse_cli.alignment.engine import align_pair
    from otfuse_cli.alignment.weights import TensorSource, WeightFeatures
    from otfuse_cli.arch import build_spec
    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli.options import AlignOptions

    ckpts = [open_checkpoint(str(REPO / "fixtures" / p)) for p in pair]
    specs = [build_spec(c) for c in ckpts]

    class Counting(WeightFeatures):
        def features(self, *args, **kw):
            self.calls = getattr(self, "calls", 0) + 1
            return super().features(*args, **kw)

    class Unskipped(Counting):
        neighbours = property()  # hasattr() is False: every space re-solved every sweep

    runs = {}
    for cls in (Counting, Unskipped):
        provider = cls(specs[0], specs[1], TensorSource(ckpts[0], "a"), TensorSource(ckpts[1], "b"))
        runs[cls] = align_pair(specs[0], specs[1], provider, AlignOptions(refine=5)), provider.calls
    (skipping, skipped_calls), (full, full_calls) = runs[Counting], runs[Unskipped]
    assert skipping.keys() == full.keys()
    for name in full:
        assert torch.equal(skipping[name].hard_index(), full[name].hard_index()), name
        assert skipping[name].inner.keys() == full[name].inner.keys()
        assert all(torch.equal(skipping[name].inner[c], full[name].inner[c]) for c in full[name].inner)
    assert skipped_calls < full_calls


def test_sketched_distances_approximate_the_exact_ones():
    """A CountSketch into D buckets keeps squared distances unbiased with relative error about sqrt(2/D):
    compared with scipy's exact distances over the concatenated entries (the sketch must also be active:
    not equal to them)."""
    from otfuse_cli.alignment.cost import FeaturePair, unit_cost
    from otfuse_cli.arch.model import Entry

    g = torch.Generator().manual_seed(0)
    entries = [Entry("a.weight", 0, "out"), Entry("b.weight", 1, "in")]
    xs = [torch.randn(40, 3000, generator=g), torch.randn(40, 2000, generator=g)]
    ys = [torch.randn(50, 3000, generator=g), torch.randn(50, 2000, generator=g)]
    pair = FeaturePair(sketch=1024)
    for e, x, y in zip(entries, xs, ys):
        pair.add(e, x[:, None, None, :], e, y[:, None, None, :])
    sketched = unit_cost(pair.parent, pair.anchor, "sqeuclidean", folded=pair.folded())[0].numpy()
    exact = cdist(torch.cat(xs, 1).double().numpy(), torch.cat(ys, 1).double().numpy(), "sqeuclidean")
    rel = np.abs(sketched - exact) / exact
    assert 0 < np.median(rel) < 0.1 and rel.max() < 0.3
    mass = pair.parent.mass(2)  # marginals keep the exact norms
    np.testing.assert_allclose(mass, torch.cat(xs, 1).double().norm(dim=1).numpy(), rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e19])  # 1e19: finite in float32, dot products are not
def test_folded_cross_terms_match_float64_distances_even_where_float32_overflows(scale):
    """Folded plain entries give scipy's float64 squared distances: to float32 precision for ordinary
    weights, and exactly where float32 products of extreme but finite weights would overflow."""
    from otfuse_cli.alignment.cost import FeaturePair, unit_cost
    from otfuse_cli.arch.model import Entry

    g = torch.Generator().manual_seed(1)
    entries = [Entry("a.weight", 0, "out"), Entry("b.weight", 1, "in")]
    xs = [torch.randn(30, 200, generator=g) * scale, torch.randn(30, 100, generator=g)]
    ys = [torch.randn(30, 200, generator=g) * scale, torch.randn(30, 100, generator=g)]
    pair = FeaturePair()
    for e, x, y in zip(entries, xs, ys):
        pair.add(e, x[:, None, None, :], e, y[:, None, None, :])
    cost = unit_cost(pair.parent, pair.anchor, "sqeuclidean", folded=pair.folded())[0].numpy()
    exact = cdist(torch.cat(xs, 1).double().numpy(), torch.cat(ys, 1).double().numpy(), "sqeuclidean")
    assert np.isfinite(cost).all()
    np.testing.assert_allclose(cost, exact, rtol=1e-5 if scale == 1.0 else 1e-12)


@pytest.mark.parametrize("sketch", ["16"])  # the hardest: fewer buckets than the hidden width (64)
def test_sketched_alignment_still_recovers_a_hidden_permutation(tmp_path, sketch):
    """A tiny Llama fused with an independently permuted copy of itself (+1% noise), --sketch D: the fused
    model computes the plain average (the vanilla average, for contrast, does not)."""
    import importlib.util

    # loaded from its file: putting benchmarks/ on sys.path would shadow benchmarks/studies/run.py
    spec = importlib.util.spec_from_file_location("scale_benchmark", REPO / "benchmarks" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    recovery = scale.recovery

    check = recovery("tiny", tmp_path, ["--sketch", sketch])
    assert check["relative_logit_error"] < 1e-5 < 0.1 < check["vanilla_relative_logit_error"]


def test_many_to_one_plans_are_cluster_sums_and_means():
    """compress's plans are labels (a dropped unit, -1, and an empty cluster included), never an n x k
    matrix: the input side sums each cluster's members, the output side averages them (numpy loops here),
    and with head dims and reordered reps the result is the dense coupling's (the soft path)."""
    from otfuse_cli.alignment.transport import _move_slice
    from otfuse_cli.arch.model import Entry

    gen = torch.Generator().manual_seed(0)
    dst = torch.tensor([2, 0, -1, 2, 0, 2])  # unit 2 dropped; cluster 1 of 4 stays empty
    plan = Plan(labels=dst, width=4)
    assert plan.shape == (6, 4) and plan.hard_index() is None
    y = torch.randn(3, 6, dtype=torch.float64, generator=gen)
    for role in ("in", "out"):
        got = _move_slice(y, Entry("w", 1, role), plan, 6, 4).numpy()
        want = np.zeros((3, 4))
        for v in range(4):
            members = [u for u in range(6) if int(dst[u]) == v]
            if members:
                cols = y.numpy()[:, members]
                want[:, v] = cols.sum(1) if role == "in" else cols.mean(1)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        assert np.allclose(_move_slice(y, Entry("w", 1, role), Plan(plan.coupling), 6, 4).numpy(), want)
    # heads: 2 reps of 3 dims per unit, each member's reps and dims reordered onto its cluster's order
    reps = torch.stack([torch.stack([torch.randperm(2, generator=gen) for _ in range(4)]) for _ in range(6)])
    dims = torch.stack([torch.stack([torch.randperm(3, generator=gen) for _ in range(4)]) for _ in range(6)])
    y = torch.randn(5, 6 * 2 * 3, dtype=torch.float64, generator=gen)
    entry = Entry("w", 1, "out", rep=2, inner=3, channel="qk", group="query")
    inner = {"qk": dims, "query": reps}
    compact = _move_slice(y, entry, Plan(labels=dst, width=4, inner=inner), 6, 4)
    dense = _move_slice(y, entry, Plan(plan.coupling, inner), 6, 4)
    torch.testing.assert_close(compact, dense, rtol=1e-12, atol=1e-12)
