"""Smoke mode of benchmarks/scale.py (tiny Llama shape, no mergekit): every route runs, is measured, and the
hidden-permutation recovery check holds — the pipeline end to end, not the speed (that is the benchmark's).
The weights route's arithmetic floor is recomputed here from the JSON's own recorded rates and counts."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO


def test_scale_benchmark_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale.py"), "--sizes", "tiny", "--no-mergekit",
                             "--recovery", "--rounds", "2", "--once", "weights", "--json", "--work", str(tmp_path)], capture_output=True, text=True,
                            cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    (size,) = doc["sizes"]
    assert set(size["routes"]) == {"I/O floor (read both, write one)", "otfuse fuse --align none",
                                   "otfuse fuse (weights, exact)"}
    for route in size["routes"].values():
        assert route["wall_s"] > 0 and route["cpu_s"] > 0 and route["peak_rss_gib"] > 0 and route["peak_anon_gib"] > 0
    # two rounds, the weights route once; figures are medians of the runs, ratios to this run's floor
    routes = size["routes"]
    floor = routes["I/O floor (read both, write one)"]
    assert [len(r["runs"]) for r in routes.values()] == [2, 2, 1]
    for route in routes.values():
        assert route["cpu_s"] == float(np.median([run["cpu_s"] for run in route["runs"]]))
        assert route["cpu_vs_floor"] == pytest.approx(route["cpu_s"] / float(np.median([run["cpu_s"] for run in
                                                                                      floor["runs"]])))
    check_arithmetic_floor(routes["otfuse fuse (weights, exact)"], rounds=2)
    (check,) = doc["recovery"]
    assert check["relative_logit_error"] < 1e-4 < 0.1 < check["vanilla_relative_logit_error"]
    assert (tmp_path / "tiny" / "ot" / "config.json").is_file()  # the fused model was written


def check_arithmetic_floor(route: dict, rounds: int) -> None:
    """The floor's arithmetic, independently in numpy from what the JSON records: each space's estimated GFLOP
    per solve x the solves the route ran, at the median GEMM rate of its kind (one rate per round), plus one
    assignment of the space's width per solve (and one head-dim map per unit pair in head spaces) at the
    median lapjvs time of that size."""
    f = route["arith_floor"]
    spaces, solves, rates = f["spaces"], f["solves"], f["rates"]
    assert len(rates) == rounds and f["threads"] >= 1
    assert set(solves) == {sp["space"] for sp in spaces}  # every space was solved, and no other
    assert all(1 <= k <= f["estimated_most_solves_per_space"] for k in solves.values())
    kinds = sorted({sp["kind"] for sp in spaces})
    assert kinds == ["ffn", "heads", "residual"]
    gflop = {kind: np.sum([sp["cost_gflops"] * solves[sp["space"]] for sp in spaces if sp["kind"] == kind])
             for kind in kinds}
    rate = {kind: np.median([r["gemm"][kind]["gflop_per_cpu_s"] for r in rates]) for kind in kinds}
    widths = np.array([sp["width"][0] for sp in spaces])
    dims = np.array([sp["head_dim"] for sp in spaces])
    runs = np.array([solves[sp["space"]] for sp in spaces])
    sizes = np.unique(np.concatenate([widths, dims[dims > 0]]))
    counts = {int(n): int(runs[widths == n].sum() + (runs * widths ** 2)[dims == n].sum()) for n in sizes}
    each = {n: np.median([r["assignment"][str(n)]["cpu_s"] for r in rates]) for n in counts}
    expected = sum(gflop[k] / rate[k] for k in kinds) + sum(counts[n] * each[n] for n in counts)
    assert {k: g["gflop"] for k, g in f["gemm"].items()} == pytest.approx(gflop, rel=1e-12)
    assert f["gemm_gflop"] == pytest.approx(sum(gflop.values()), rel=1e-12)
    assert {int(n): a["count"] for n, a in f["assignments"].items()} == counts
    assert f["cpu_s"] == pytest.approx(expected, rel=1e-12) and f["cpu_s"] > 0
    assert route["cpu_vs_arith_floor"] == pytest.approx(route["cpu_s"] / expected, rel=1e-12)
    assert route["wall_vs_arith_floor"] == pytest.approx(route["wall_s"] / f["wall_s"], rel=1e-12)
