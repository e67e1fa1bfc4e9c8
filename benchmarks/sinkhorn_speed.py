"""Sinkhorn at the price of exact (issue 33): CPU seconds of `otfuse fuse --solver exact` against
`--solver sinkhorn` on 784-W-W-10 MLP pairs trained on Fashion-MNIST from two seeds, W = 512, 2,048, 4,096.

Routes, each its own `otfuse fuse` process (CPU = user + sys of that process):
  exact         --solver exact (assignment; 5 refinement sweeps by default)
  sinkhorn      --solver sinkhorn (epsilon scaling + Newton, alignment/solvers.py; 1 sweep by default)
  sinkhorn-old  --solver sinkhorn with the previous solver swapped in: POT's ot.sinkhorn(method="sinkhorn_log")
                in chunks of 100 iterations, stopThr 1e-9 (L2), up to --max-iter 5000. Kept here only, as the
                baseline; at 512 units only by default (a few minutes a run; hours at 4,096).
The routes run interleaved, round by round (`--rounds`, median reported), so a machine that gets busier
slows every route alike; compare ratios within one run, never seconds across runs.

The pairs are trained on first use (two epochs of 20,000 training images for 512, one for the wider ones, Adam,
one thread; about 8 minutes in all) and cached in --cache (default: $OTFUSE_BENCH_CACHE or a folder under the
system's temporary directory). Fashion-MNIST comes from ../shared/data/fashion-mnist (--data).

    .venv/bin/python benchmarks/sinkhorn_speed.py                         # 512, 2048, 4096; 3 rounds
    .venv/bin/python benchmarks/sinkhorn_speed.py --widths 512 --rounds 1 --no-old   # quick look

Writes benchmarks/sinkhorn_speed.json (--out); the table goes to stdout."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "fashion-mnist"
META = {"otfuse.input_shape": "1,28,28", "format": "pt", "otfuse.activation": "relu", "otfuse.arch": "mlp"}


# ---------------------------------------------------------------- the previous solver (baseline only)


def old_sinkhorn(cost, a, b, reg, max_iter=5000):
    """The solver this issue replaced, as it was: POT's log-domain Sinkhorn in chunks of 100 iterations."""
    import warnings

    import numpy as np
    import ot

    from otfuse_cli import deadline
    from otfuse_cli.errors import OtfuseError

    done, warm = 0, None
    while True:
        deadline.check("solving Sinkhorn")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan, log = ot.sinkhorn(a, b, cost, reg, method="sinkhorn_log", numItermax=min(100, max_iter - done),
                                    stopThr=1e-9, log=True, warmstart=warm)
        done += log["niter"] + 1
        warm = (log["log_u"], log["log_v"])
        if (log["err"] and log["err"][-1] < 1e-9) or done >= max_iter:
            break
    plan = np.asarray(plan)
    err = float(np.abs(plan.sum(1) - a).sum() + np.abs(plan.sum(0) - b).sum())
    if err > 1e-3:
        raise OtfuseError(f"sinkhorn did not converge within {done} iterations (marginal error {err:.1e})")
    return plan, {"solver": "sinkhorn", "marginal_error": err, "iterations": done}


def run_old_cli(argv: list[str]) -> None:
    from otfuse_cli.alignment import solvers
    from otfuse_cli.entry import main

    solvers.SOLVERS["sinkhorn"] = old_sinkhorn
    sys.argv = ["otfuse", *argv]
    main()


# ---------------------------------------------------------------- models


def fashion(n: int, split: str = "train"):
    import numpy as np
    import torch

    images = np.frombuffer(gzip.open(DATA / f"{split}-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    labels = np.frombuffer(gzip.open(DATA / f"{split}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    x = torch.tensor(images.reshape(-1, 784)[:n], dtype=torch.float32) / 255
    return x, torch.tensor(labels[:n].astype(np.int64))


def trained_pair(width: int, cache: Path, samples: int = 20000) -> list[Path]:
    """Two 784-width-width-10 MLPs trained from seeds 0 and 1 (cached)."""
    import torch
    from safetensors.torch import save_file

    paths = [cache / f"fmnist_mlp{width}_seed{seed}.safetensors" for seed in (0, 1)]
    if all(p.exists() for p in paths):
        return paths
    cache.mkdir(parents=True, exist_ok=True)
    x, y = fashion(samples)
    x_test, y_test = fashion(10000, "t10k")
    torch.set_num_threads(1)
    epochs = 2 if width <= 512 else 1
    for seed, path in zip((0, 1), paths):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(784, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                  torch.nn.ReLU(), torch.nn.Linear(width, 10))
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        gen = torch.Generator().manual_seed(seed)
        start = time.time()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), 128):
                idx = order[i:i + 128]
                loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            acc = float((net(x_test).argmax(1) == y_test).float().mean())
        print(f"trained 784-{width}-{width}-10 seed {seed}: {time.time() - start:.0f} s, test accuracy {acc:.3f}",
              file=sys.stderr, flush=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp, metadata=META)
        tmp.rename(path)
    return paths


# ---------------------------------------------------------------- runs

ROUTES = {
    "exact": ["--solver", "exact"],
    "sinkhorn": ["--solver", "sinkhorn"],
    "sinkhorn-old": ["--solver", "sinkhorn"],
}


def fuse(route: str, models: list[Path], out: Path) -> dict:
    args = ["fuse", *map(str, models), "-o", str(out), "--force", "--json", *ROUTES[route]]
    cmd = ([sys.executable, str(Path(__file__).resolve()), "_old_cli", *args] if route == "sinkhorn-old"
           else [sys.executable, "-m", "otfuse_cli", *args])
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{route} failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    doc = json.loads(stdout)
    return {"wall_s": round(wall, 2), "spaces": [
        {k: s.get(k) for k in ("space", "solver", "iterations", "marginal_error", "sweeps")} for s in doc["spaces"]]}


def cpu_of(run) -> float:
    """User + sys seconds of the child just waited for (RUSAGE_CHILDREN delta around the run)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    record = run()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    record["cpu_s"] = round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 2)
    return record


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_old_cli":
        return run_old_cli(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--old-widths", type=int, nargs="*", default=[512],
                        help="widths that also run the previous solver (default: 512)")
    parser.add_argument("--no-old", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "OTFUSE_BENCH_CACHE", Path(tempfile.gettempdir()) / "otfuse-bench")) / "sinkhorn_speed")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "sinkhorn_speed.json")
    a = parser.parse_args()
    globals()["DATA"] = a.data
    pairs = {w: trained_pair(w, a.cache) for w in a.widths}
    results = {w: {} for w in a.widths}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for w in a.widths:
                routes = ["exact", "sinkhorn"] + ([] if a.no_old or w not in a.old_widths else ["sinkhorn-old"])
                for route in routes:
                    rec = cpu_of(lambda: fuse(route, pairs[w], Path(tmp) / f"{w}_{route}.safetensors"))
                    results[w].setdefault(route, []).append(rec)
                    iters = [s["iterations"] for s in rec["spaces"] if s["iterations"] is not None]
                    print(f"round {r + 1} width {w} {route}: {rec['cpu_s']} CPU-s, {rec['wall_s']} s wall"
                          + (f", iterations per space {iters}" if iters else ""), file=sys.stderr, flush=True)
    rows = []
    for w in a.widths:
        med = {route: statistics.median(x["cpu_s"] for x in recs) for route, recs in results[w].items()}
        row = {"width": w, "median_cpu_s": med, "rounds": results[w],
               "sinkhorn_over_exact": round(med["sinkhorn"] / med["exact"], 2)}
        if "sinkhorn-old" in med:
            row["old_sinkhorn_over_exact"] = round(med["sinkhorn-old"] / med["exact"], 1)
            row["old_over_new"] = round(med["sinkhorn-old"] / med["sinkhorn"], 1)
        rows.append(row)
    doc = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "rounds": a.rounds,
           "load_1min_at_end": round(os.getloadavg()[0], 2),
           "models": "784-W-W-10 MLPs, Fashion-MNIST, seeds 0 and 1 (benchmarks/sinkhorn_speed.py trains them)",
           "rows": rows}
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print("| width | exact CPU-s | sinkhorn CPU-s | sinkhorn / exact | old sinkhorn CPU-s | old / exact |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        med = row["median_cpu_s"]
        old = (f"{med['sinkhorn-old']:.1f} | {row['old_sinkhorn_over_exact']}x" if "sinkhorn-old" in med
               else "— | —")
        print(f"| {row['width']} | {med['exact']:.1f} | {med['sinkhorn']:.1f} | {row['sinkhorn_over_exact']}x | {old} |")


if __name__ == "__main__":
    main()
