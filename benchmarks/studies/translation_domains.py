"""Study 7, translation across software domains: Debian EN→FI catalogues, one party per domain. The desktop
party holds the strings of desktop programs (sections gnome, kde, x11, xfce, graphics, sound, video), the
system party those of system and developer tools (devel, libs, admin, utils, net, shells, vcs, interpreters,
database, python, perl, php, web, mail); each trains a small BART on its own domain only (different seeds).
Fused every way otfuse can, scored on each domain's test strings and on LibreOffice help paragraphs, a
domain neither party saw (longer sentences), against each party, the output ensemble and a joint model
trained on both domains' data.

Splits by a stable hash of each string's near-duplicate key (test 0, validation 1, training the rest of 10
buckets), so a string that recurs in several packages (Debian ids are per pair) lands in one split only. The
`localization` section (it holds LibreOffice's own UI catalogue) is left out, and training strings whose
English is a near-duplicate of a LibreOffice test paragraph are dropped. Short strings only (at most
`MAX_WORDS` English words: 43,393 desktop and 34,600 system training strings), the budget the learning-curve
pilot (`translation_domains_curve.py`, validation only) found a 2-core CPU can teach; every party trains a fixed
number of steps and the joint model the two parties' steps together (the same compute). Test sets: each
domain's short strings, and LibreOffice paragraphs of up to twice that length (the unseen domain is also
longer). One BPE tokenizer learnt on the two parties' training strings. Scores: sacrebleu BLEU and chrF,
greedy, from `otfuse evaluate`; stored as fractions, shown ×100.
"""

from __future__ import annotations

import csv
import json
import lzma
import time
import zlib
from pathlib import Path

from common import check_no_leak, drop_similar, fusion_routes, near_duplicate_key, save_model
from translation import MTScale, fit_mt, train_tokenizer, write_pairs

import otfuse_cli as otf

DOMAINS = {
    "desktop": ("gnome", "kde", "x11", "xfce", "graphics", "sound", "video"),
    "system": ("devel", "libs", "admin", "utils", "net", "shells", "vcs", "interpreters", "database", "python",
               "perl", "php", "web", "mail"),
}
TESTS = {"desktop": "desktop test", "system": "system test", "libreoffice": "LibreOffice help (unseen)"}
COLUMNS = [f"{m}, {t}" for t in TESTS.values() for m in ("BLEU", "chrF")]

# The first full run (10,000 strings of every length per party, 4 epochs) gave parties that did not translate
# (BLEU < 1). The learning-curve pilot (desktop party, 1e-3, validation): every length, 4,000 steps, 12.0 BLEU
# in 26 min; strings of <= 6 words, 2,000 steps 13.3 (mid-run, a lower bound) in 8 min, 4,000 steps 18.8.
# 1e-3 is study 6's validation choice for the same model; one candidate keeps three seeds in the budget.
FULL = MTScale(hidden=128, layers=2, heads=4, ffn=512, vocab=6000, epochs=0.0, lrs=(1e-3,), steps=2000)
SMOKE = MTScale(hidden=32, layers=1, heads=2, ffn=64, vocab=400, epochs=1.0, lrs=(1e-3,), batch=32, limit=200)
MAX_WORDS = 6  # English words per training, validation and domain-test string; LibreOffice test: twice this
TEST_SIZE = {"full": 400, "smoke": 60}
VALIDATION_SIZE = {"full": 500, "smoke": 30}  # strings per domain, before the length filter


def words(pairs: list, most: int | None) -> list:
    """The pairs whose English has at most `most` words (every pair for None)."""
    return [p for p in pairs if most is None or len(p[0].split()) <= most]


def load(data_dir: Path, scale: MTScale, smoke: bool, max_words: int | None = MAX_WORDS) -> dict:
    """Splits, leakage-checked; `max_words=None` keeps strings of every length (the learning-curve pilot)."""
    with open(data_dir / "debian-l10n" / "packages.tsv", encoding="utf-8") as f:
        section = {r["package"]: r["section"] for r in csv.DictReader(f, delimiter="\t")}
    domain_of = {s: d for d, sections in DOMAINS.items() for s in sections}
    with lzma.open(data_dir / "libreoffice-help" / "en-fi.jsonl.xz", "rt", encoding="utf-8") as f:
        office = [json.loads(line) for line in f]
    size, val_size = (d["smoke" if smoke else "full"] for d in (TEST_SIZE, VALIDATION_SIZE))
    office_test = [(r["en"], r["fi"]) for r in office if r["id"] % 10 == 0]
    office_test = words(office_test, 2 * max_words if max_words else None)[:size]
    unseen = {near_duplicate_key(en) for en, _ in office_test}
    out = {f"{d} {split}": [] for d in DOMAINS for split in ("train", "val", "test")}
    dropped = 0
    with lzma.open(data_dir / "debian-l10n" / "en-fi.jsonl.xz", "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            domain = domain_of.get(section.get(r["package"], ""))
            if domain is None:
                continue
            key = near_duplicate_key(r["en"])
            split = {0: "test", 1: "val"}.get(zlib.crc32(key.encode()) % 10, "train")
            if split != "test" and key in unseen:
                dropped += 1
                continue
            out[f"{domain} {split}"].append((r["en"], r["fi"]))
    for d in DOMAINS:  # the file is in a fixed pseudo-random order (by id): prefixes are fixed subsamples
        # a margin over the limit for the second drop below (near-duplicates by 5-gram Jaccard, every pair)
        out[f"{d} train"] = words(out[f"{d} train"], max_words)[:scale.limit + 2000 if scale.limit else None]
        out[f"{d} val"] = words(out[f"{d} val"][:val_size], max_words)
        out[f"{d} test"] = words(out[f"{d} test"], max_words)[:size]
    tests = [en for d in DOMAINS for en, _ in out[f"{d} test"]] + [en for en, _ in office_test]
    keys = [f"{d} {split}" for d in DOMAINS for split in ("train", "val")]
    kept, similar = drop_similar(tests, *(out[k] for k in keys))
    out.update(zip(keys, kept))
    dropped += similar
    for d in DOMAINS:
        out[f"{d} train"] = out[f"{d} train"][:scale.limit]
    train_en = [en for d in DOMAINS for en, _ in out[f"{d} train"] + out[f"{d} val"]]
    for d in DOMAINS:
        check_no_leak([en for en, _ in out[f"{d} test"]], train_en)
    check_no_leak([en for en, _ in office_test], train_en)
    out["libreoffice test"] = office_test
    out["dropped_near_duplicates"] = dropped
    return out


def bleu_chrf(paths: dict[str, Path], files: dict[str, str], ensemble: tuple[int, int] | None) -> dict[str, float]:
    record = {}
    for key, column in TESTS.items():
        doc = otf.evaluate({k: str(v) for k, v in paths.items()}, files[key], task="translation", max_length=64,
                           batch_size=64, ensemble=list(ensemble) if ensemble else False)
        for row in doc["rows"]:
            record[f"{row['model']}|BLEU, {column}"] = row["bleu"] / 100
            record[f"{row['model']}|chrF, {column}"] = row["chrf"] / 100
    return record


def run(data_dir: Path, out: Path, seeds: list[int], smoke: bool = False) -> dict:
    scale = SMOKE if smoke else FULL
    data = load(data_dir, scale, smoke)
    files = {d: write_pairs(out / f"{d}_test.jsonl", data[f"{d} test"]) for d in DOMAINS}
    files["libreoffice"] = write_pairs(out / "libreoffice_test.jsonl", data["libreoffice test"])
    for d in DOMAINS:
        files[f"{d} train"] = write_pairs(out / f"{d}_train.jsonl", data[f"{d} train"])
    files["val"] = write_pairs(out / "val.jsonl", data["desktop val"] + data["system val"])
    tok = train_tokenizer([t for d in DOMAINS for pair in data[f"{d} train"] for t in pair], scale.vocab)

    # learning rate on validation only (seed 0): mean greedy BLEU of the two parties on both domains' strings;
    # the chosen rate's parties are seed 0's
    # (one candidate needs no run, so a run of later seeds alone (`--seeds 1`) trains only what it scores)
    choice, first = {}, {}
    for lr in scale.lrs if len(scale.lrs) > 1 else ():
        first[lr] = {}
        for i, d in enumerate(DOMAINS):
            model, _, sec = fit_mt(scale, tok, data[f"{d} train"], 1000 * i, lr)
            first[lr][f"{d} party"] = (save_model(model, out / f"lr_{lr}_{d}", tok), sec)
        doc = otf.evaluate({k: str(p) for k, (p, _) in first[lr].items()}, files["val"], task="translation",
                           max_length=64, batch_size=64)
        choice[lr] = sum(r["bleu"] for r in doc["rows"]) / len(doc["rows"]) / 100
    lr = max(choice, key=choice.get) if choice else scale.lrs[0]

    runs, timing = [], []
    for seed in seeds:
        root = out / f"seed{seed}"
        root.mkdir(parents=True, exist_ok=True)
        models, cost = {}, {}
        for i, d in enumerate(DOMAINS):
            if seed == 0 and lr in first:
                models[f"{d} party"], cost[f"{d} party"] = first[lr][f"{d} party"]
                continue
            model, _, cost[f"{d} party"] = fit_mt(scale, tok, data[f"{d} train"], seed + 1000 * i, lr)
            models[f"{d} party"] = save_model(model, root / d, tok)
        model, _, cost["joint"] = fit_mt(scale, tok, data["desktop train"] + data["system train"], seed + 2000, lr,
                                         steps=2 * scale.steps if scale.steps else None)
        joint = save_model(model, root / "joint", tok)
        start = time.perf_counter()
        # activations on public pairs (both domains' validation strings); Grams from each party's own data
        routes = fusion_routes(list(models.values()), root, files["val"], [files[f"{d} train"] for d in DOMAINS])
        routes.pop("OT weights (sinkhorn)")
        cost["fusion (all routes)"] = time.perf_counter() - start
        start = time.perf_counter()
        record = bleu_chrf({**models, **routes, "joint (both domains' data)": joint}, files, ensemble=(0, 1))
        cost["evaluation"] = time.perf_counter() - start
        runs.append(record)
        timing.append(cost)
        print(f"seed {seed}: " + json.dumps(record), flush=True)  # the whole record: a run cut short keeps it
    rows = ["desktop party", "system party", "ensemble", "vanilla average", "OT weights (exact)", "OT activations",
            "RegMean", "OT + RegMean", "joint (both domains' data)"]
    return {"study": "translation_domains", "runs": runs, "rows": rows, "columns": COLUMNS, "timing": timing,
            "lr": lr, "lr_validation": {str(k): v for k, v in choice.items()}, "metric": "BLEU / chrF",
            "domains": {d: list(s) for d, s in DOMAINS.items()}, "scale": scale.__dict__,
            "sizes": {k: len(v) for k, v in data.items() if isinstance(v, list)},
            "dropped_near_duplicates": data["dropped_near_duplicates"]}
