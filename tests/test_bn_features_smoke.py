"""benchmarks/bn_features.py's smoke run: both choices scored on every route, the decision recomputed here from
the rows with numpy, and the module switch left as it was."""

from __future__ import annotations

import importlib.util

import numpy as np

from conftest import REPO

SPEC = importlib.util.spec_from_file_location("bn_features", REPO / "benchmarks" / "bn_features.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_smoke_run_scores_both_choices_and_decides_by_its_rule(tmp_path):
    from otfuse_cli.alignment import weights

    before = weights.NORM_STATISTICS_IN_FEATURES
    result = bench.main(["--smoke", "--json", str(tmp_path / "r.json")])
    assert weights.NORM_STATISTICS_IN_FEATURES == before
    assert {r["config"] for r in result["runs"]} == {"fixture", "small", "wide"}
    gains: dict[str, list[float]] = {}
    for run in result["runs"]:
        rows = run["rows"]
        assert len(rows) % 2 == 0 and all(0 <= v <= 1 for v in rows.values())
        for key in rows:
            if key.endswith(" | out"):
                gains.setdefault(run["config"], []).append(100 * (rows[key] - rows[key[:-6] + " | in"]))
    per_config = {c: np.mean(g) for c, g in gains.items()}
    decision = result["decision"]
    for c, g in per_config.items():
        assert abs(decision["gain_by_config"][c] - g) < 0.006
    expected = np.mean(list(per_config.values())) > 0 and sum(g > 0 for g in per_config.values()) >= 2
    assert decision["leave_out"] == expected
    assert min(result["runs"][0]["rows"].values()) > 0.5  # the bundled pair's fusions are far from chance
