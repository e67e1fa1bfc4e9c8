"""Exact linear assignment: SciPy's linear_sum_assignment against lapx's lapjvx (float64) and lapjvs
(float64 and float32 kernels) and otfuse's choice (lapjvs float32 on the row/column-reduced cost), on the
cost shapes alignment meets, measured side by side in one run.

Costs are squared distances between the rows of two weight-like matrices: `independent` (two random
layers, what two separately trained models look like to the solver: no clear optimum) and `permuted`
(a hidden permutation + 1% noise, the recovery tests' regime). For each size and backend: seconds (best of
`--repeat`), and whether the plan equals SciPy's and its cost is the same.

    .venv/bin/python benchmarks/assignment.py                 # sizes 512 … 11008
    .venv/bin/python benchmarks/assignment.py --sizes 64 256  # quick
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy.optimize import linear_sum_assignment


def costs(n: int, d: int, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = rng.standard_normal((n, d)) if kind == "independent" else \
        x[rng.permutation(n)] + 0.01 * rng.standard_normal((n, d))
    return (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T


def scipy_cols(cost: np.ndarray) -> np.ndarray:
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


def lapjvs_cols(float32: bool):
    import lap

    def solve(cost: np.ndarray) -> np.ndarray:
        _, rows, cols = lap.lapjvs(cost, prefer_float32=float32)
        return cols[np.argsort(rows)]
    return solve


def lapjvx_cols(cost: np.ndarray) -> np.ndarray:
    import lap

    _, rows, cols = lap.lapjvx(cost)
    return cols[np.argsort(rows)]


def otfuse_cols(cost: np.ndarray) -> np.ndarray:
    from otfuse_cli.alignment.solvers import assignment

    src = assignment(cost)  # src[col] = row
    cols = np.empty_like(src)
    cols[src] = np.arange(len(src))
    return cols


BACKENDS = {"scipy": scipy_cols, "lapjvx (float64)": lapjvx_cols, "lapjvs float64": lapjvs_cols(False),
            "lapjvs float32": lapjvs_cols(True), "otfuse (reduced, lapjvs float32)": otfuse_cols}


def best_time(fn, cost: np.ndarray, repeat: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(cost)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 4096, 11008])
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        for kind in ("independent", "permuted"):
            cost = costs(n, args.features, kind, seed=n)
            ref_t, ref = best_time(scipy_cols, cost, args.repeat)
            ref_cost = cost[np.arange(n), ref].sum()
            for name, fn in BACKENDS.items():
                t, cols = (ref_t, ref) if name == "scipy" else best_time(fn, cost, args.repeat)
                gap = float(cost[np.arange(n), cols].sum() - ref_cost)
                rows.append({"n": n, "cost": kind, "backend": name, "seconds": t, "vs_scipy": ref_t / t,
                             "same_plan": bool(np.array_equal(cols, ref)), "cost_gap": gap})
                if not args.json:
                    print(f"{n:>6} {kind:<12} {name:<32} {t:8.3f} s  {ref_t / t:5.2f}x scipy  "
                          f"same plan {rows[-1]['same_plan']!s:<5} cost gap {gap:.2e}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
