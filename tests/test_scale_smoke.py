"""Smoke mode of benchmarks/scale.py (tiny Llama shape, no mergekit): every route runs, is measured, and the
hidden-permutation recovery check holds — the pipeline end to end, not the speed (that is the benchmark's)."""

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
    (check,) = doc["recovery"]
    assert check["relative_logit_error"] < 1e-4 < 0.1 < check["vanilla_relative_logit_error"]
    assert (tmp_path / "tiny" / "ot" / "config.json").is_file()  # the fused model was written
