"""The weights route before and after a change, interleaved (issue 29, item 1: "speed on CPU no worse than
today's"). Each route runs as its own `otfuse fuse` process from one of two source trees (PYTHONPATH), rounds
alternating which tree goes first, CPU seconds (user + sys) from the child's rusage; medians reported.

Pairs: the Fashion-MNIST MLP pairs of benchmarks/sinkhorn_speed.py (its cache; run that once first), exact and
`--solver sinkhorn`, and a random 125M Llama pair (benchmarks/scale.py's writer), exact.

    git worktree add /tmp/old <commit before the change>
    .venv/bin/python benchmarks/device_route_ab.py --old /tmp/old --widths 512 2048 --llama

Writes the medians as JSON to stdout (and --out)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def cpu_seconds(tree: Path, args: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = subprocess.run([sys.executable, "-m", "otfuse_cli", *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tree), "OTFUSE_THREADS": "1"}, cwd=tempfile.gettempdir())
    if run.returncode:
        raise SystemExit(run.stderr[-2000:])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="the source tree before the change")
    ap.add_argument("--new", type=Path, default=REPO)
    ap.add_argument("--widths", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--llama", action="store_true", help="also a random 125M Llama pair, exact")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "OTFUSE_BENCH_CACHE", Path(tempfile.gettempdir()) / "otfuse-bench")))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="otfuse-device-ab-"))
    cases = {}
    for w in args.widths:
        pair = [str(args.cache / "sinkhorn_speed" / f"fmnist_mlp{w}_seed{s}.safetensors") for s in (0, 1)]
        for solver in ("exact", "sinkhorn"):
            cases[f"MLP {w}, {solver}"] = ["fuse", *pair, "-o", str(work / f"mlp{w}.safetensors"), "--force",
                                           "--solver", solver]
    if args.llama:
        sys.path[:0] = [str(HERE), str(REPO)]
        import scale

        for name, seed in (("a", 0), ("b", 1)):
            if not (args.cache / "llama125m" / name).exists():
                scale.write_random_llama(args.cache / "llama125m" / name, scale.SHAPES["125m"], seed)
        cases["Llama 125M, exact"] = ["fuse", str(args.cache / "llama125m" / "a"), str(args.cache / "llama125m" / "b"),
                                      "-o", str(work / "llama"), "--force"]
    trees = {"old": args.old, "new": args.new}
    seconds: dict = {}
    for rnd in range(args.rounds):
        order = list(trees.items()) if rnd % 2 == 0 else list(trees.items())[::-1]
        for case, cmd in cases.items():
            for label, tree in order:
                seconds.setdefault(case, {}).setdefault(label, []).append(round(cpu_seconds(tree, cmd), 2))
                print(rnd, case, label, seconds[case][label][-1], file=sys.stderr, flush=True)
    result = {case: {**{f"{k} median CPU-s": statistics.median(v) for k, v in by.items()},
                     "new / old": statistics.median(by["new"]) / statistics.median(by["old"]), "runs": by}
              for case, by in seconds.items()}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
