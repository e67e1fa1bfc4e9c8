"""The data side of the collapse guard (issue 33, part 2), measured on study 1's kept models.

Study 1 (IMDB shards) keeps every shard and every fused route with `run.py shards --keep DIR`. For each seed
and k this script runs otfuse's prediction check (otfuse_cli/merging/predictions.py, what `fuse --data` runs
after writing) on the study's VALIDATION texts, for every fused route against the k shards, and sets beside it
the route's TEST accuracy from the study's results JSON: a guard is useful when it names the routes at chance
and none of the working ones.

    .venv/bin/python benchmarks/studies/run.py shards --keep /tmp/keep          # or a kept run
    .venv/bin/python benchmarks/collapse_guard.py /tmp/keep/shards benchmarks/studies/results/shards.json \\
        --k 4 8 --out benchmarks/collapse_guard.json

Several kept runs (seeds run apart, each with its own JSON) are given as pairs: DIR JSON DIR JSON ...
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from otfuse_cli.checkpoint import open_checkpoint
from otfuse_cli.merging.predictions import SHARE, agreement, predictions_of
from otfuse_cli.options import DataOptions

PARENT = re.compile(r"shard\d+$")


def folder_of(row: str) -> str:
    """The route's folder, named as the study names it (common.fusion_routes)."""
    return re.sub(r"[^a-z0-9]+", "_", row.lower()).strip("_")


def measure(root: Path, results: dict, ks: list[int], samples: int) -> list[dict]:
    data = DataOptions(data=str(root / "val.jsonl"), samples=samples)
    rows = []
    for r, seed in enumerate(results["seeds"]):
        run = results["runs"][r]
        for k in ks:
            folder = root / f"seed{seed}" / f"k{k}"
            shards = sorted((p for p in folder.iterdir() if PARENT.match(p.name)), key=lambda p: int(p.name[5:]))
            parents = [predictions_of(open_checkpoint(p), data) for p in shards]
            routes = {folder_of(key.split("|")[0]): key.split("|")[0] for key in run if key.endswith(f"|k={k}")}
            for path in sorted(folder.iterdir()):
                name = routes.get(path.name)
                if name is None or PARENT.match(path.name) or not path.is_dir():
                    continue
                a = agreement(predictions_of(open_checkpoint(path), data), parents)
                kept = [j for j in range(len(parents)) if j not in a["strays"]]
                rows.append({"seed": seed, "k": k, "route": name, "test_accuracy": run[f"{name}|k={k}"],
                             "best_kappa": max(a["fused_kappa"][j] for j in kept), "reference": a["reference"],
                             "collapsed": a["collapsed"], "strays": [shards[j].name for j in a["strays"]],
                             "stray_accuracies": [run.get(f"shard {j + 1}|k={k}") for j in a["strays"]]})
                print(f"seed {seed} k={k} {name:34s} test {100 * rows[-1]['test_accuracy']:5.1f}  best kappa "
                      f"{rows[-1]['best_kappa']:.2f} (threshold {SHARE * a['reference']:.2f})  "
                      f"{'COLLAPSED' if a['collapsed'] else '':9s} strays {rows[-1]['strays']}", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", nargs="+", metavar="DIR JSON")
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if len(args.pairs) % 2:
        sys.exit("give kept folders and results JSON files in pairs")
    torch.set_num_threads(1)
    rows = []
    for folder, results in zip(args.pairs[::2], args.pairs[1::2]):
        rows += measure(Path(folder), json.loads(Path(results).read_text()), args.k, args.samples)
    working = [r for r in rows if r["test_accuracy"] >= 0.55]
    chance = [r for r in rows if r["test_accuracy"] < 0.55]
    summary = {"share": SHARE, "samples": args.samples, "routes": len(rows),
               "at_chance_named": f"{sum(r['collapsed'] for r in chance)} of {len(chance)}",
               "working_named": f"{sum(r['collapsed'] for r in working)} of {len(working)}"}
    print(json.dumps(summary))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
