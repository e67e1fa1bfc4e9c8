"""Study 3, two languages: LibreOffice help paragraphs classified by module, one party training on English
paragraphs, the other on Finnish ones (disjoint paragraph ids), one WordPiece tokenizer learnt on both parties'
training text. Fused models are scored on English and on Finnish test paragraphs.

Splits (by the data's own `id`, see ../shared/data/README.md): English party id % 10 in (2, 4, 6, 8), Finnish
party id % 10 in (3, 5, 7, 9), validation id % 10 == 1, test id % 10 == 0. The 12 Finnish `sdatabase`
paragraphs are merged into `shared` (8 classes). Test texts with a near-duplicate in training or validation are
dropped from training and validation, then the split is checked for leakage.
"""

from __future__ import annotations

import json
import lzma
import time
from pathlib import Path

from common import (TextScale, check_no_leak, drop_similar, fit_text, fusion_routes, mass_routes,
                    near_duplicate_key, save_model, score, train_tokenizer, write_jsonl)


FULL = TextScale(hidden=128, layers=2, heads=4, ffn=256, vocab=6000, max_length=96, epochs=15.0, lrs=(5e-4, 1e-3))
SMOKE = TextScale(hidden=32, layers=1, heads=2, ffn=64, vocab=800, max_length=48, epochs=1.0, lrs=(1e-3,), limit=160)


def load(data_dir: Path, scale: TextScale) -> dict:
    rows = [json.loads(line) for line in lzma.open(data_dir / "libreoffice-help" / "en-fi.jsonl.xz", "rt",
                                                   encoding="utf-8")]
    for r in rows:
        r["module"] = "shared" if r["module"] == "sdatabase" else r["module"]
    labels = sorted({r["module"] for r in rows})
    part = {
        "en_train": [(r["en"], r["module"]) for r in rows if r["id"] % 10 in (2, 4, 6, 8)],
        "fi_train": [(r["fi"], r["module"]) for r in rows if r["id"] % 10 in (3, 5, 7, 9)],
        "en_val": [(r["en"], r["module"]) for r in rows if r["id"] % 10 == 1],
        "fi_val": [(r["fi"], r["module"]) for r in rows if r["id"] % 10 == 1],
        "en_test": [(r["en"], r["module"]) for r in rows if r["id"] % 10 == 0],
        "fi_test": [(r["fi"], r["module"]) for r in rows if r["id"] % 10 == 0],
    }
    test_keys = {near_duplicate_key(t) for k in ("en_test", "fi_test") for t, _ in part[k]}
    dropped = 0
    for k in ("en_train", "fi_train", "en_val", "fi_val"):
        kept = [(t, y) for t, y in part[k] if near_duplicate_key(t) not in test_keys]
        dropped += len(part[k]) - len(kept)
        part[k] = kept
    if scale.limit:
        part = {k: v[:scale.limit] for k, v in part.items()}
    # the independent notion too (5-gram Jaccard), on the splits as cut: what check_no_leak asserts next
    shared = [k for k in part if not k.endswith("test")]
    kept, similar = drop_similar([t for k in ("en_test", "fi_test") for t, _ in part[k]], *(part[k] for k in shared))
    part.update(zip(shared, kept))
    dropped += similar
    for lang in ("en", "fi"):
        check_no_leak([t for t, _ in part[f"{lang}_test"]], *([t for t, _ in part[k]] for k in part
                                                               if not k.endswith("test")))
    return {"parts": part, "labels": labels, "dropped_near_duplicates": dropped}


def run(data_dir: Path, out: Path, seeds: list[int], smoke: bool = False) -> dict:
    scale = SMOKE if smoke else FULL
    data = load(data_dir, scale)
    p, labels = data["parts"], data["labels"]
    files = {k: write_jsonl(out / f"{k}.jsonl", v) for k, v in p.items()}
    tok = train_tokenizer([t for t, _ in p["en_train"] + p["fi_train"]], scale.vocab, scale.max_length)

    # learning rate on validation only (seed 0): the mean of each party's own-language validation accuracy
    choice = {}
    for lr in scale.lrs:
        accs = []
        for lang in ("en", "fi"):
            model, _, _ = fit_text(scale, tok, labels, p[f"{lang}_train"], 0, lr)
            folder = save_model(model, out / f"lr_{lr}_{lang}", tok)
            accs.append(score({"m": folder}, files[f"{lang}_val"])["m"])
        choice[lr] = sum(accs) / 2
    lr = max(choice, key=choice.get)

    runs, timing, mass_changes = [], [], []
    for seed in seeds:
        root = out / f"seed{seed}"
        root.mkdir(parents=True, exist_ok=True)
        models, cost = {}, {}
        for lang, s in (("en", seed), ("fi", seed + 1000)):
            model, steps, seconds = fit_text(scale, tok, labels, p[f"{lang}_train"], s, lr)
            models[f"{lang.upper()} party"] = save_model(model, root / f"{lang}_party", tok)
            cost[f"{lang.upper()} party"] = seconds
        joint, _, seconds = fit_text(scale, tok, labels, p["en_train"] + p["fi_train"], seed + 2000, lr)
        models["joint (both parties' data)"] = save_model(joint, root / "joint", tok)
        cost["joint"] = seconds
        start = time.perf_counter()
        # activation alignment runs both parents on public inputs (the validation paragraphs of both
        # languages); RegMean's Grams come from each party's own training text only
        both_val = write_jsonl(root / "align.jsonl", p["en_val"] + p["fi_val"])
        routes = fusion_routes([models["EN party"], models["FI party"]], root, both_val,
                               [files["en_train"], files["fi_train"]])
        cost["fusion (all routes)"] = time.perf_counter() - start
        masses, changed = mass_routes([models["EN party"], models["FI party"]], root, both_val)
        mass_changes.append(changed)
        paths = {**models, **routes, **masses}
        record = {}
        for lang in ("en", "fi"):
            scores = score(paths, files[f"{lang}_test"], ensemble=(0, 1))
            for name, acc in scores.items():
                record[f"{name}|{lang.upper()} test"] = acc
        for name in list(paths) + ["ensemble"]:
            record[f"{name}|mean"] = (record[f"{name}|EN test"] + record[f"{name}|FI test"]) / 2
        runs.append(record)
        timing.append(cost)
    rows = ["EN party", "FI party", "ensemble", "vanilla average", "OT weights (exact)", "OT weights (sinkhorn)",
            "OT activations",
            "OT weights, l1 masses", "OT weights, l2 masses", "OT activations (raw)", "OT activations, activation masses",
            "RegMean",
            "OT + RegMean",
            "joint (both parties' data)"]
    return {"study": "languages", "runs": runs, "rows": rows, "columns": ["EN test", "FI test", "mean"],
            "timing": timing, "mass_changes": mass_changes, "lr": lr,
            "lr_validation": {str(k): v for k, v in choice.items()},
            "scale": scale.__dict__, "sizes": {k: len(v) for k, v in p.items()}, "labels": labels,
            "dropped_near_duplicates": data["dropped_near_duplicates"]}
