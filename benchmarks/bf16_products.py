"""Should exact costs use bfloat16 products? This CPU has AMX: a bf16 matrix product runs several times
faster than float32, and bf16 checkpoints' weights are bf16 already, so the inputs lose nothing. But torch's
CPU product returns bf16, so every dot product is rounded to 8 significant bits. This measures, side by
side in one run, what that rounding does to the plans, against float32 (what otfuse uses) and float64.

Features are one FFN space of the 1.1B shape by default (5,632 units x 6,144 weights: gate and up rows and
down columns) drawn as bf16: `independent` (two random layers, what separately trained models look like
to the solver) and `permuted` (a hidden permutation + 1% noise, the recovery tests' regime). Costs are
squared distances |x|² + |y|² - 2 x·y with the norms in float64; plans come from otfuse's assignment solver;
each plan is scored on the float64 cost. Reported per product dtype: seconds (best of --repeat) and GFLOP/s,
the share of units assigned as float64 assigns them, the share of float64's alignment gain (identity cost -
optimal cost) that is lost, and for `permuted` the median cost error on matched units relative to their distance.

    .venv/bin/python benchmarks/bf16_products.py              # the 1.1B FFN shape, about 2 minutes
    .venv/bin/python benchmarks/bf16_products.py --units 512  # quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from otfuse_cli.alignment.solvers import assignment  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def features(n: int, d: int, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (0.02 * torch.randn(n, d, generator=g)).bfloat16()
    if kind == "independent":
        return x, (0.02 * torch.randn(n, d, generator=g)).bfloat16()
    perm = torch.randperm(n, generator=g)
    return x, (x[perm].float() + 2e-4 * torch.randn(n, d, generator=g)).bfloat16()


def product(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, repeat: int) -> tuple[np.ndarray, float]:
    a, b = x.to(dtype), y.to(dtype)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = a @ b.T
        best = min(best, time.perf_counter() - start)
    return out.double().numpy(), best


def run(n: int, d: int, kind: str, repeat: int, seed: int) -> dict:
    x, y = features(n, d, kind, seed)
    nx, ny = (x.double() ** 2).sum(1).numpy(), (y.double() ** 2).sum(1).numpy()
    rows = {}
    exact = None
    for name, dtype in DTYPES.items():
        cross, seconds = product(x, y, dtype, repeat)
        cost = nx[:, None] + ny[None, :] - 2 * cross
        src = assignment(cost)
        if exact is None:
            exact = (cost, src)
        true_cost, true_src = exact
        cols = np.arange(n)
        identity, optimum = true_cost.trace(), true_cost[true_src, cols].sum()
        row = {"seconds": seconds, "gflops_per_s": 2 * n * n * d / seconds / 1e9,
               "same_assignment_as_float64": float((src == true_src).mean()),
               "alignment_gain_lost": float((true_cost[src, cols].sum() - optimum) / (identity - optimum))}
        if kind == "permuted":
            matched = true_cost[true_src, cols]
            row["matched_cost_error_vs_distance"] = float(np.median(np.abs(cost[true_src, cols] - matched) / matched))
        rows[name] = row
        print(f"  {kind} {name}: {row}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--units", type=int, default=5632)
    ap.add_argument("--features", type=int, default=6144)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", action="store_true", help="write benchmarks/bf16_products.json")
    args = ap.parse_args()
    result = {"units": args.units, "features": args.features, "torch_threads": torch.get_num_threads(),
              "cases": {kind: run(args.units, args.features, kind, args.repeat, args.seed)
                        for kind in ("independent", "permuted")}}
    text = json.dumps(result, indent=1)
    print(text)
    if args.save:
        (Path(__file__).parent / "bf16_products.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
