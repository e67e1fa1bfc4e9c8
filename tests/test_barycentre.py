"""Issue 33, parts 1 and 2: barycentric N-parent fusion (`--rounds`) and the collapse guard (`fit`).

Oracles share no code with otfuse: one-hidden-layer MLPs whose weight matching is one assignment problem over
each hidden unit's [incoming weights, bias, outgoing weights] (the closed form of weight matching for this
net), solved here by scipy; hidden permutations drawn by numpy; the guard's agreement recomputed in numpy
from the aligned parents."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from scipy.optimize import linear_sum_assignment

from conftest import cli

D, H, C = 12, 32, 4
META = {"otfuse.arch": "mlp", "otfuse.activation": "relu", "otfuse.input_shape": str(D)}


def random_mlp(rng) -> dict[str, np.ndarray]:
    return {"0.weight": rng.normal(size=(H, D)).astype(np.float32), "0.bias": rng.normal(size=H).astype(np.float32),
            "2.weight": rng.normal(size=(C, H)).astype(np.float32), "2.bias": rng.normal(size=C).astype(np.float32)}


def permuted(sd, perm) -> dict[str, np.ndarray]:
    # C order: safetensors writes the buffer as it lies, and a column gather may come back in Fortran order
    return {"0.weight": sd["0.weight"][perm], "0.bias": sd["0.bias"][perm],
            "2.weight": np.ascontiguousarray(sd["2.weight"][:, perm]), "2.bias": sd["2.bias"]}


def units(sd) -> np.ndarray:
    """Each hidden unit's row: what weight matching compares for a one-hidden-layer MLP."""
    return np.concatenate([sd["0.weight"], sd["0.bias"][:, None], sd["2.weight"].T], 1).astype(np.float64)


def forward(sd, x) -> np.ndarray:
    return np.maximum(x @ sd["0.weight"].T + sd["0.bias"], 0) @ sd["2.weight"].T + sd["2.bias"]


def match(target: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The permutation of `rows` closest to `target` (scipy's assignment on squared distances)."""
    cost = ((target[:, None, :] - rows[None, :, :]) ** 2).sum(-1)
    return linear_sum_assignment(cost)[1]


def write_parents(tmp_path, sds) -> list[str]:
    paths = []
    for k, sd in enumerate(sds):
        save_file(sd, tmp_path / f"p{k}.safetensors", metadata=META)
        paths.append(str(tmp_path / f"p{k}.safetensors"))
    return paths


def fuse(paths, out, *flags) -> dict:
    result = cli("fuse", *paths, "-o", out, "--json", *flags)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def four_random(tmp_path):
    rng = np.random.default_rng(1)
    return [random_mlp(rng) for _ in range(4)], tmp_path


def test_rounds_reach_the_merge_many_fixed_point(four_random):
    """After --rounds, every parent's matching is the best one against the mean of the OTHER parents as they
    sit in the result (scipy's assignment finds no better), and the fused model is their mean. The anchor's
    one-shot fusion is not such a point: its parents sit unevenly around the result."""
    sds, tmp = four_random
    paths = write_parents(tmp, sds)
    rows = [units(sd) for sd in sds]
    for rounds, expect_fixed in ((0, False), (10, True)):
        out = tmp / f"f{rounds}.safetensors"
        fuse(paths, out, "--rounds", str(rounds))
        fused = units(load_file(out))
        aligned = [r[match(fused, r)] for r in rows]  # each parent in the result's basis
        np.testing.assert_allclose(np.mean(aligned, 0), fused, atol=1e-4)  # the result is their mean
        fixed = all(np.array_equal(match(np.mean([a for j, a in enumerate(aligned) if j != k], 0), rows[k]),
                                   match(fused, rows[k])) for k in range(4))
        assert fixed == expect_fixed
        spread = [np.linalg.norm(a - fused) / np.linalg.norm(a) for a in aligned]
        if rounds == 0:
            before = spread
    # the sum of pairwise distances the rounds descend on is lower, and no parent is the favoured one any more
    assert max(spread) - min(spread) < max(before) - min(before)
    assert np.mean(spread) < np.mean(before)


def test_rounds_do_not_depend_on_the_order_of_the_parents(tmp_path):
    """Three noisy copies of one network behind hidden permutations: from any parent as the start the rounds
    reach the same function, the mean of the un-permuted copies (closed form)."""
    rng = np.random.default_rng(7)
    base = random_mlp(rng)
    copies = [{k: (v + 0.05 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
              for _ in range(3)]
    hidden = [permuted(c, rng.permutation(H)) for c in copies]
    paths = write_parents(tmp_path, hidden)
    x = rng.normal(size=(64, D))
    expected = forward({k: np.mean([c[k] for c in copies], 0) for k in base}, x)
    for order in ([0, 1, 2], [1, 2, 0], [2, 0, 1]):
        out = tmp_path / f"o{''.join(map(str, order))}.safetensors"
        result = fuse([paths[i] for i in order], out, "--rounds", "3")
        np.testing.assert_allclose(forward(load_file(out), x), expected, rtol=1e-4, atol=1e-4)
        assert result["fit"]["outliers"] == []


def test_the_plan_file_holds_the_anchors_plans_and_fuse_reuses_it(four_random):
    sds, tmp = four_random
    paths = write_parents(tmp, sds)
    result = cli("align", *paths, "-o", tmp / "plans.safetensors", "--rounds", "10")
    assert result.exit_code == 0, result.output
    plans = load_file(tmp / "plans.safetensors")
    assert "0/0/index" in plans  # the anchor was moved too
    fuse(paths, tmp / "direct.safetensors", "--rounds", "10")
    fuse(paths, tmp / "reused.safetensors", "--plan", tmp / "plans.safetensors")
    a, b = load_file(tmp / "direct.safetensors"), load_file(tmp / "reused.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_rounds_refused_with_align_none(tmp_path):
    rng = np.random.default_rng(0)
    paths = write_parents(tmp_path, [random_mlp(rng) for _ in range(2)])
    result = cli("fuse", *paths, "-o", tmp_path / "x.safetensors", "--align", "none", "--rounds", "2")
    assert result.exit_code == 2
    assert "--rounds" in result.output


def test_the_guard_names_a_parent_that_does_not_belong(tmp_path):
    """Three noisy permuted copies of one network and an unrelated random one: the random one is named in a
    warning, and the agreement figures equal numpy's cosine between each aligned parent and the others' mean."""
    rng = np.random.default_rng(3)
    base = random_mlp(rng)
    family = [permuted({k: (v + 0.3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()},
                       rng.permutation(H)) for _ in range(3)]
    paths = write_parents(tmp_path, family + [random_mlp(rng)])
    result = cli("fuse", *paths, "-o", tmp_path / "f.safetensors", "--json")
    assert result.exit_code == 0, result.output
    fit = json.loads(result.stdout)["fit"]
    assert fit["outliers"] == [3]
    assert "warning: model 3" in result.stderr and "p3.safetensors" in result.stderr
    fused = load_file(tmp_path / "f.safetensors")
    vectors = []
    for k in range(4):  # each parent in the result's basis, every tensor flattened
        sd = load_file(paths[k])
        perm = match(units(fused), units(sd))
        vectors.append(np.concatenate([v.ravel() for _, v in sorted(permuted(sd, perm).items())]).astype(np.float64))
    for k in range(4):
        others = np.mean([v for j, v in enumerate(vectors) if j != k], 0)
        cos = vectors[k] @ others / np.linalg.norm(vectors[k]) / np.linalg.norm(others)
        assert fit["parents"][k]["agreement"] == pytest.approx(cos, rel=1e-6)
    f = np.concatenate([v.ravel() for _, v in sorted(fused.items())]).astype(np.float64)
    assert fit["retention"] == pytest.approx(np.linalg.norm(f) / np.mean([np.linalg.norm(v) for v in vectors]),
                                             rel=1e-6)
    # the same parents without the stranger: no warning
    quiet = cli("fuse", *paths[:3], "-o", tmp_path / "g.safetensors", "--json")
    assert json.loads(quiet.stdout)["fit"]["outliers"] == [] and "warning" not in quiet.stderr


def test_no_guard_where_nothing_is_aligned(tmp_path):
    rng = np.random.default_rng(0)
    paths = write_parents(tmp_path, [random_mlp(rng) for _ in range(3)])
    assert "fit" not in fuse(paths, tmp_path / "v.safetensors", "--align", "none")


def test_rounds_by_default_with_three_parents_not_two_nor_for_children(tmp_path):
    """The default (validation: benchmarks/cnn_parents.py): barycentric rounds with three or more parents from
    other initialisations; none with two, and none where every parent already shares the anchor's basis
    (children of one model: no round could move a plan, and each would write a scratch model)."""
    rng = np.random.default_rng(5)
    strangers = write_parents(tmp_path, [random_mlp(rng) for _ in range(3)])
    three = cli("fuse", *strangers, "-o", tmp_path / "three.safetensors")
    assert three.exit_code == 0 and "barycentre:" in three.stderr
    plans = cli("align", *strangers, "-o", tmp_path / "plans.safetensors")
    assert plans.exit_code == 0 and "0/0/index" in load_file(tmp_path / "plans.safetensors")
    two = cli("fuse", *strangers[:2], "-o", tmp_path / "two.safetensors")
    assert two.exit_code == 0 and "barycentre:" not in two.stderr
    base = random_mlp(rng)
    children = tmp_path / "children"
    children.mkdir()
    kids = write_parents(children, [{k: (v + 1e-3 * rng.normal(size=v.shape)).astype(np.float32)
                                     for k, v in base.items()} for _ in range(3)])
    kin = cli("fuse", *kids, "-o", tmp_path / "kin.safetensors")
    assert kin.exit_code == 0 and "barycentre:" not in kin.stderr and "every plan is the identity" in kin.stderr


def test_provenance_and_plan_files_record_the_rounds_that_ran(tmp_path):
    """The default is written out (5 with three parents, 0 with two), not recorded as "default"."""
    from safetensors import safe_open

    rng = np.random.default_rng(6)
    paths = write_parents(tmp_path, [random_mlp(rng) for _ in range(3)])
    for models, expected in ((paths, 5), (paths[:2], 0)):
        out = tmp_path / f"f{len(models)}.safetensors"
        fuse(models, out)
        with safe_open(str(out), "np") as f:
            assert json.loads(f.metadata()["otfuse"])["options"]["align"]["rounds"] == expected
    assert cli("align", *paths, "-o", tmp_path / "p.safetensors").exit_code == 0
    with safe_open(str(tmp_path / "p.safetensors"), "np") as f:
        assert json.loads(f.metadata()["otfuse.plans"])["options"]["rounds"] == 5
