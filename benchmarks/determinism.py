"""Same command, same bytes, however busy the machine is.

Runs one Sinkhorn fuse (the route whose stopping rule used to read the clock) several times: with the machine
quiet, then while CPU-bound jobs (one busy loop per core) compete with it, and checks that every output is
byte-identical. Wall and CPU seconds of each run show how much the load slowed it; the output never moves.

    python benchmarks/determinism.py [A B] [--runs 2] [--reg 0.02]
Results: benchmarks/determinism.json (and a row in benchmarks/RESULTS.md, written by hand).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUSY = "while True: pass"


def fuse(models: list[str], out: Path, reg: float) -> dict:
    start, before = time.perf_counter(), os.times()
    subprocess.run([sys.executable, "-m", "otfuse_cli", "-q", "fuse", *models, "-o", str(out), "--solver",
                    "sinkhorn", "--reg", str(reg)], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    after = os.times()
    return {"wall_s": round(time.perf_counter() - start, 2),
            "cpu_s": round(after.children_user - before.children_user + after.children_system
                           - before.children_system, 2),
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=[str(REPO / "fixtures/digits/mlp_a.safetensors"),
                                                      str(REPO / "fixtures/digits/mlp_b.safetensors")])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--reg", type=float, default=0.02)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "determinism.json"))
    a = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for busy in (0, os.cpu_count() or 2):
            hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
            try:
                for r in range(a.runs):
                    runs.append({"busy_loops": busy, "load_1min_before": round(os.getloadavg()[0], 2),
                                 **fuse(a.models, Path(tmp) / f"o{busy}_{r}.safetensors", a.reg)})
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
    identical = len({r["sha256"] for r in runs}) == 1
    doc = {"date": time.strftime("%Y-%m-%d"), "models": a.models, "reg": a.reg, "identical": identical, "runs": runs}
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    if not identical:
        sys.exit("outputs differ")


if __name__ == "__main__":
    main()
