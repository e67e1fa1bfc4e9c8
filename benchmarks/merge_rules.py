"""Merge rules side by side on the real-data fixture pairs (digit MLPs, digit CNNs, BERT sentiment).

Each party's statistics come from the calibration file, 256 samples of the parents' own training split
("party data"). The fixtures' 1,000 held-out samples are split in file order: the first 500 are validation,
on which the choices are made (RegMean's alpha, the activation-alignment variant), the last 500 are the test
set every number in the table is measured on; no choice sees them.

    .venv/bin/python benchmarks/merge_rules.py            # all pairs, prints the tables, writes merge_rules.json
    .venv/bin/python benchmarks/merge_rules.py --pairs mlp
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import otfuse_cli as otf  # noqa: E402
from otfuse_cli.options import MergeOptions  # noqa: E402

PAIRS = {
    "mlp": ("digits/mlp_a.safetensors", "digits/mlp_b.safetensors", "digits/calib.safetensors", "digits/test.safetensors"),
    "cnn": ("digits/cnn_a.safetensors", "digits/cnn_b.safetensors", "digits/calib.safetensors", "digits/test.safetensors"),
    "bert": ("sentiment/bert_a", "sentiment/bert_b", "sentiment/calib.jsonl", "sentiment/test.jsonl"),
}
ALPHAS = (0.5, 0.8, 0.9, 0.95, 1.0)
RIDGES = (0.01, 0.1, 0.3, 1.0)  # --align cca's covariance ridge, chosen on validation


def split(held_out: Path, tmp: Path) -> tuple[str, str]:
    """(validation, test): the two halves of the held-out file, in file order."""
    if held_out.suffix == ".jsonl":
        lines = held_out.read_text().splitlines(keepends=True)
        half = len(lines) // 2
        (tmp / "val.jsonl").write_text("".join(lines[:half]))
        (tmp / "test.jsonl").write_text("".join(lines[half:]))
        return str(tmp / "val.jsonl"), str(tmp / "test.jsonl")
    from safetensors.torch import load_file, save_file

    d = load_file(held_out)
    half = len(d["x"]) // 2
    save_file({k: v[:half].contiguous() for k, v in d.items()}, tmp / "val.safetensors")
    save_file({k: v[half:].contiguous() for k, v in d.items()}, tmp / "test.safetensors")
    return str(tmp / "val.safetensors"), str(tmp / "test.safetensors")


def score(paths: dict[str, str], data: str, ensemble: bool = False) -> dict[str, dict]:
    doc = otf.evaluate(paths, data, ensemble=[0, 1] if ensemble else False)
    return {row["model"]: row for row in doc["rows"]}


def run_pair(name: str, tmp: Path) -> dict:
    a, b, party, held_out = (str(ROOT / "fixtures" / p) for p in PAIRS[name])
    val, test = split(Path(held_out), tmp)
    bare = name != "bert"
    data = otf.DataOptions(data=party, samples=10_000)
    weights = otf.AlignOptions(solver="sinkhorn", reg=0.02) if name == "bert" else otf.AlignOptions()
    none = otf.AlignOptions(align="none")
    out: dict[str, str] = {}
    seconds: dict[str, float] = {}

    def make(row: str, **kw) -> str:
        path = str(tmp / f"{row}{'' if name == 'bert' else '.safetensors'}")
        start = time.process_time()
        otf.fuse([a, b], path, **kw)
        seconds[row] = round(time.process_time() - start, 1)
        out[row] = path
        return path

    # choices on validation: RegMean's alpha (with and without alignment), the activation variant
    chosen = {}
    for prefix, align in (("regmean", none), ("ot_regmean", weights)):
        val_scores = {}
        for alpha in ALPHAS:
            try:
                path = make(f"{prefix}_a{alpha}", options=align, data=data,
                            merge=MergeOptions(merge="regmean", regmean_alpha=alpha))
            except otf.OtfuseError:  # alpha 1 with fewer samples than inputs: a singular Gram
                continue
            val_scores[alpha] = score({"m": path}, val)["m"]["nll"]
        chosen[prefix] = min(val_scores, key=val_scores.get)
    variants = {"pre_zscore": otf.DataOptions(data=party, samples=10_000, standardize="zscore", post_activation=False)}
    if bare:
        variants["post_zscore"] = otf.DataOptions(data=party, samples=10_000, standardize="zscore",
                                                  post_activation=True)
    variants["pre_center"] = otf.DataOptions(data=party, samples=10_000, standardize="center", post_activation=False)
    val_nll = {}
    for v, opts in variants.items():
        path = make(f"acts_{v}", options=otf.AlignOptions(align="activations"), data=opts)
        val_nll[v] = score({"m": path}, val)["m"]["nll"]
    chosen["activations"] = min(val_nll, key=val_nll.get)
    # linear maps (--align cca) on the family's default activations; the ridge on validation
    val_ridge = {}
    for ridge in RIDGES:
        path = make(f"cca_r{ridge}", options=otf.AlignOptions(align="cca", ridge=ridge), data=data)
        val_ridge[ridge] = score({"m": path}, val)["m"]["nll"]
    chosen["cca_ridge"] = min(val_ridge, key=val_ridge.get)
    cca = otf.AlignOptions(align="cca", ridge=chosen["cca_ridge"])

    rows = {
        "vanilla average": make("average", options=none),
        f"RegMean (alpha {chosen['regmean']})": out[f"regmean_a{chosen['regmean']}"],
        "Fisher": make("fisher", options=none, data=data, merge=MergeOptions(merge="fisher")),
        "OT (weights)": make("ot", options=weights),
        f"OT (activations, {chosen['activations']})": out[f"acts_{chosen['activations']}"],
        f"OT + RegMean (alpha {chosen['ot_regmean']})": out[f"ot_regmean_a{chosen['ot_regmean']}"],
        "OT + Fisher": make("ot_fisher", options=weights, data=data, merge=MergeOptions(merge="fisher")),
        f"CCA (ridge {chosen['cca_ridge']})": out[f"cca_r{chosen['cca_ridge']}"],
        # RegMean's alpha as chosen for OT + RegMean
        f"CCA + RegMean (alpha {chosen['ot_regmean']})": make(
            "cca_regmean", options=cca, data=data,
            merge=MergeOptions(merge="regmean", regmean_alpha=chosen["ot_regmean"])),
    }
    if name != "bert":
        rows["OT + REPAIR" if name == "mlp" else "OT + BN reset"] = make("ot_repair", options=weights, data=data,
                                                                       repair=True)
    scored = score({"parent A": a, "parent B": b, **rows}, test, ensemble=True)
    return {"pair": name, "chosen_on_validation": chosen, "validation_nll_activations": val_nll,
            "validation_nll_cca_ridge": val_ridge,
            "rows": {k: {m: v[m] for m in ("accuracy", "nll", "ece")} for k, v in scored.items()},
            "cpu_seconds": seconds}


def table(result: dict) -> str:
    lines = [f"{result['pair']}: test accuracy / NLL / ECE (choices on validation: {result['chosen_on_validation']})",
             "| model | accuracy | NLL | ECE |", "| --- | --- | --- | --- |"]
    for model, m in result["rows"].items():
        lines.append(f"| {model} | {100 * m['accuracy']:.1f}% | {m['nll']:.4f} | {m['ece']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="*", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "merge_rules.json"))
    args = parser.parse_args()
    results = []
    for name in args.pairs:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run_pair(name, Path(tmp)))
        print(table(results[-1]), flush=True)
        print(flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
