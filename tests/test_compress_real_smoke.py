"""benchmarks/compress_real.py's smoke mode (a tiny random Llama): every route runs and is scored, and the
baselines' pruning is checked against the model's own forward: keeping every unit (in any order of the
indices given) leaves the logits exactly as they were, and dropping units whose down_proj column is zero
changes nothing either; model folding of a Llama whose FFN units come in identical pairs (each writing half
of the pair's output) gives the logits back."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

pytestmark = pytest.mark.skipif(not (DATA / "libreoffice-help").is_dir(), reason=f"no data at {DATA}")


def load_benchmark():
    """benchmarks/compress_real.py as a module, without putting benchmarks/ on sys.path (its run.py would shadow
    the studies' run module in later tests)."""
    spec = importlib.util.spec_from_file_location("compress_real", ROOT / "benchmarks" / "compress_real.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_scores_every_route(tmp_path):
    compress_real = load_benchmark()

    # the plain OT routes are left out (OT compression of a Llama is tested in test_compress.py): a subprocess
    # each
    result = compress_real.main(["--smoke", "--ratios", "0.5", "--seeds", "1", "--work", str(tmp_path),
                                 "--json", str(tmp_path / "r.json"), "--ridges", "1e-4", "1e-2",
                                 "--groups", "baselines", "folding", "repair", "importance", "datafree",
                                 "statistics", "--heads", "1"])
    ridge = result["refit_ridge_on_validation"]["0.5"]
    expected = {"original", "magnitude", "minitron", "wanda", "random (seed 0)",
                "model folding (k-means on weights, Fold-AR rescaling)", "otfuse importance",
                f"otfuse importance + repair (ridge {ridge:g})",
                "otfuse magnitude + repair (ridge 0.01)", "otfuse magnitude + repair (ridge 0.0001)",
                f"otfuse ot acts + repair (ridge {ridge:g})", "otfuse ot + data-free repair",
                "otfuse ot acts + REPAIR"}
    assert set(result["rows"]) == expected
    # the KV-group baselines (the tiny Llama has 2 groups): one column each
    assert {k for k, v in result["rows"].items() if "kv1" in v} == {"magnitude", "minitron", "random (seed 0)",
                                                                    "otfuse importance"}
    assert result["kv_groups"] == {"full": 2, "kv1": 1}
    for label, by_col in result["rows"].items():
        for ppl in by_col.values():
            assert math.isfinite(ppl["val"]) and math.isfinite(ppl["test"]) and ppl["val"] > 1, label
    repaired = {r: result["rows"][f"otfuse magnitude + repair (ridge {r:g})"]["0.5"]["val"] for r in (1e-4, 1e-2)}
    assert ridge == min(repaired, key=repaired.get)  # the ridge is chosen on validation
    # otfuse's importance pruning keeps the units this file's Minitron baseline keeps (its own code)
    assert result["rows"]["otfuse importance"]["0.5"] == result["rows"]["minitron"]["0.5"]
    # and, cutting KV groups, the groups this file's Minitron head importance keeps
    assert result["rows"]["otfuse importance"]["kv1"] == result["rows"]["minitron"]["kv1"]
    best = result["best_otfuse_on_validation"]["0.5"]
    assert result["rows"][best]["0.5"]["val"] == min(v["0.5"]["val"] for k, v in result["rows"].items()
                                                    if k.startswith("otfuse"))

    from transformers import AutoModelForCausalLM

    source = tmp_path / "original"
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    full = model.config.intermediate_size
    compress_real.pruned(source, [torch.arange(full) for _ in model.model.layers], tmp_path / "all")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "all").eval()(input_ids=ids).logits, ref)
    # units that write nothing (a zero down_proj column) can go without changing the function
    dead = torch.arange(0, full, 3)
    for layer in model.model.layers:
        layer.mlp.down_proj.weight.data[:, dead] = 0.0
    model.save_pretrained(tmp_path / "dead")
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    alive = torch.tensor([u for u in range(full) if u % 3])
    compress_real.pruned(tmp_path / "dead", [alive for _ in model.model.layers], tmp_path / "pruned")
    cut = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert cut.config.intermediate_size == len(alive)
    with torch.no_grad():
        torch.testing.assert_close(cut(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)

    # model folding: every unit doubled (gate and up rows repeated, each copy writing half the down column)
    # folds back to the original width and function
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for layer in model.model.layers:
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            w = getattr(mlp, name).weight.data
            setattr(mlp, name, torch.nn.Linear(w.shape[1], 2 * full, bias=False))
            getattr(mlp, name).weight.data = torch.cat([w, w])
        d = mlp.down_proj.weight.data
        mlp.down_proj = torch.nn.Linear(2 * full, d.shape[0], bias=False)
        mlp.down_proj.weight.data = torch.cat([d / 2, d / 2], 1)
    model.config.intermediate_size = 2 * full
    model.save_pretrained(tmp_path / "doubled")
    compress_real.folded(tmp_path / "doubled", full, tmp_path / "folded")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "folded").eval()
    assert back.config.intermediate_size == full
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_calibration_seeds_move_only_the_calibration_texts():
    """Seed 0 is the first N calibration paragraphs (the committed runs'); seed N > 0 another N of the
    calibration split, read here straight from the file; validation and test never move."""
    import lzma

    compress_real = load_benchmark()
    first = compress_real.load_texts(DATA, 12, 5, 5)
    other = compress_real.load_texts(DATA, 12, 5, 5, calib_seed=1)
    again = compress_real.load_texts(DATA, 12, 5, 5, calib_seed=1)
    third = compress_real.load_texts(DATA, 12, 5, 5, calib_seed=2)
    calib, held = [], set()
    with lzma.open(DATA / "libreoffice-help" / "en-fi.jsonl.xz", "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if len(row["en"]) >= 200:
                (held.add(row["en"]) if row["id"] % 10 in (0, 1) else calib.append(row["en"]))
            if len(calib) >= 120:
                break
    assert first["calib"] == calib[:12]
    assert other == again and other["calib"] != first["calib"] != third["calib"] != other["calib"]
    for sample in (other, third):
        assert len(set(sample["calib"])) == 12 and set(sample["calib"]) <= set(calib[:120])
        assert not set(sample["calib"]) & held
        assert sample["calib"] == sorted(sample["calib"], key=calib.index)  # file order kept
        assert (sample["val"], sample["test"]) == (first["val"], first["test"])


def test_merge_joins_runs_and_refuses_a_changed_cell(tmp_path):
    compress_real = load_benchmark()
    base = {"model": "m", "full_width": 8, "texts": {"calib": 4, "val": 2, "test": 2}, "max_length": 16}
    a = {**base, "widths": {"0.5": 4}, "rows": {"original": {"1.0": {"val": 3.0, "test": 4.0}},
                                                "otfuse ot": {"0.5": {"val": 9.0, "test": 9.5}},
                                                "otfuse ot acts": {"0.5": {"val": 3.0, "test": 3.5}}},
         "runs": [{"command": "a"}], "otfuse_cpu_s": {"otfuse ot|0.5": 1.0}}
    b = {**base, "widths": {"0.9": 7}, "rows": {"original": {"1.0": {"val": 3.0, "test": 4.0}},
                                                "otfuse ot": {"0.9": {"val": 5.0, "test": 6.0}},
                                                "otfuse importance (calibration seed 1)": {
                                                    "0.9": {"val": 1.0, "test": 1.0}}},
         "runs": [{"command": "b"}], "otfuse_cpu_s": {}}
    for name, doc in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    out = compress_real.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                              "--json", str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text()) == out
    assert list(out["widths"]) == ["0.9", "0.5"] and [r["command"] for r in out["runs"]] == ["a", "b"]
    assert out["rows"]["otfuse ot"] == {"0.5": {"val": 9.0, "test": 9.5}, "0.9": {"val": 5.0, "test": 6.0}}
    # the best route is chosen among the first calibration sample's routes only (lowest perplexity; for an
    # accuracy, the highest)
    assert out["best_otfuse_on_validation"] == {"0.9": "otfuse ot", "0.5": "otfuse ot acts"}
    accuracy = compress_real.merge_results([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "acc.json", max)
    assert accuracy["best_otfuse_on_validation"] == {"0.9": "otfuse ot", "0.5": "otfuse ot"}
    # another thread count sums float32 in another order: a 1e-5 relative change is the same cell (the first
    # run's value kept); a 1e-3 change is another result
    b["rows"]["otfuse ot"] = {"0.5": {"val": 9.0 * (1 + 1e-5), "test": 9.5}}
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = compress_real.merge_results([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "m1.json")
    assert out["rows"]["otfuse ot"]["0.5"] == {"val": 9.0, "test": 9.5}
    b["rows"]["otfuse ot"] = {"0.5": {"val": 9.0 * (1 + 1e-3), "test": 9.5}}
    (tmp_path / "b.json").write_text(json.dumps(b))
    with pytest.raises(SystemExit, match="differs between runs"):
        compress_real.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                            "--json", str(tmp_path / "m2.json")])
    assert not (tmp_path / "m2.json").exists()


def test_pruned_heads_follow_the_forward_pass(tmp_path):
    """Cutting KV groups, checked against transformers' own Llama forward: every group kept gives the logits
    back; a group whose query heads write nothing (zero o_proj columns) goes without changing them; the
    magnitude scores equal norms summed head by head from the weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    compress_real = load_benchmark()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    size, group = 48 // 6, 2
    dead = 1  # KV group 1: query heads 2 and 3
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.data[:, dead * group * size:(dead + 1) * group * size] = 0.0
    model.save_pretrained(tmp_path / "src")
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    compress_real.pruned_heads(tmp_path / "src", [torch.arange(3)] * 2, tmp_path / "all")
    compress_real.pruned_heads(tmp_path / "src", [torch.tensor([0, 2])] * 2, tmp_path / "cut")
    for name, heads, kv in (("all", 6, 3), ("cut", 4, 2)):
        cut = LlamaForCausalLM.from_pretrained(tmp_path / name).eval()
        assert (cut.config.num_attention_heads, cut.config.num_key_value_heads) == (heads, kv)
        with torch.no_grad():
            torch.testing.assert_close(cut(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    scores = compress_real.group_scores(model, "magnitude", [], 0)
    for layer, got in zip(model.model.layers, scores):
        a = {name: getattr(layer.self_attn, name).weight.detach()
             for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
        for g in range(3):
            total = 0.0
            for h in range(g * group, (g + 1) * group):
                total += float(a["q_proj"][h * size:(h + 1) * size].double().pow(2).sum())
                total += float(a["o_proj"][:, h * size:(h + 1) * size].double().pow(2).sum())
            total += float(a["k_proj"][g * size:(g + 1) * size].double().pow(2).sum())
            total += float(a["v_proj"][g * size:(g + 1) * size].double().pow(2).sum())
            assert abs(float(got[g]) - math.sqrt(total)) < 1e-9


def test_another_calibration_sample_runs_only_the_routes_that_read_it(tmp_path):
    compress_real = load_benchmark()
    result = compress_real.main(["--smoke", "--calib-seed", "1", "--ratios", "0.5", "--seeds", "1",
                                 "--work", str(tmp_path), "--json", str(tmp_path / "r.json"),
                                 "--groups", "baselines", "folding", "datafree", "--heads", "1"])
    # magnitude, random, model folding and the data-free repair read no calibration text: with another sample they would repeat seed 0
    assert {k: set(v) for k, v in result["rows"].items()} == {
        "original": {"1.0"}, "minitron (calibration seed 1)": {"0.5", "kv1"}, "wanda (calibration seed 1)": {"0.5"}}
