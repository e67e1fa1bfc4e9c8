"""Smoke mode of benchmarks/ensemble_decoding.py: the cached and whole-prefix ensembles run on both shapes and
give the same translations (the speed is the benchmark's, not the suite's)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_ensemble_decoding_benchmark_smoke(tmp_path):
    out = tmp_path / "e.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ensemble_decoding.py"), "--sentences", "3",
                             "--max-length", "5", "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["beams"], r["sentences"]) for r in rows] == [(1, 3), (4, 3)] * 2
    for r in rows:
        assert r["identical translations"] is True
        assert r["mean output tokens"] >= 3  # re-tokenised text, so about the limit (5); an empty output counts 1
        assert r["seconds, cached"] > 0 and r["seconds, whole prefix"] > 0
