"""Thread policy A/B: what `--threads` and OpenMP's wait policy cost, on a quiet machine and on one busy with
other work, in interleaved rounds.

Two workloads, each run as its own `otfuse` process (benchmarks/scale.py's `measure`: wall and CPU seconds):
- `125m none`: `otfuse fuse --align none` of a random Llama pair of 125M parameters (scale.py's generator);
- `minilm activations`: `otfuse fuse --align activations` of the real all-MiniLM-L6-v2 and an independently
  permuted copy on Multi30k English sentences (benchmarks/activation_memory.py's pair).

Settings: `--threads` 1 and the default (the cores this process may use), each with OpenMP's default wait
policy and with OMP_WAIT_POLICY=PASSIVE (threads sleep at a barrier instead of spinning). Load: none, or
`--busy` processes spinning on the CPU for the whole of each run (other work on a shared machine). One
round runs every (load, setting, workload) once, in an order rotated each round; the table shows the median
over rounds. The fused outputs' SHA-256 are recorded: a setting that changes the thread count may change
the bytes (reductions split by thread count), one that changes only the wait policy must not.

    python benchmarks/threads.py [--rounds 2] [--busy 2] [--samples 256]   # writes benchmarks/threads.json
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from activation_memory import DATA, make_pair  # noqa: E402
from scale import SHAPES, measure, write_random_llama  # noqa: E402

SETTINGS = {  # name: (--threads, OMP_WAIT_POLICY)
    "default threads": (None, None),
    "default threads, passive wait": (None, "PASSIVE"),
    "--threads 1": ("1", None),
    "--threads 1, passive wait": ("1", "PASSIVE"),
}


def spin() -> None:  # pragma: no cover - a busy process, killed by the parent
    while True:
        pass


def sha(path: Path) -> str:
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--busy", type=int, default=2, help="spinning processes in the loaded runs")
    ap.add_argument("--samples", type=int, default=256, help="Multi30k sentences for the activation workload")
    ap.add_argument("--out", type=Path, default=HERE / "threads.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="otfuse-threads-"))
    a, b = (write_random_llama(work / "llama" / name, SHAPES["125m"], seed) for name, seed in (("a", 1), ("b", 2)))
    (work / "minilm").mkdir()
    ma, mb = make_pair(work / "minilm")
    data = work / "sentences.jsonl"
    with gzip.open(DATA, "rt") as f:
        lines = [next(f).strip() for _ in range(args.samples)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    workloads = {
        "125m none": lambda out: ["fuse", str(a), str(b), "-o", str(out), "--align", "none"],
        "minilm activations": lambda out: ["fuse", str(ma), str(mb), "-o", str(out), "--align", "activations",
                                           "--data", str(data), "--samples", str(args.samples)],
    }
    base_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OTFUSE_THREADS",
                                                                 "OMP_WAIT_POLICY")}
    base_env["PYTHONPATH"] = str(REPO)
    jobs = [(load, s, w) for load in ("quiet", "busy") for s in SETTINGS for w in workloads]
    runs: list[dict] = []
    for r in range(args.rounds):
        shift = (r * 3) % len(jobs)
        for load, setting, workload in jobs[shift:] + jobs[:shift]:
            threads, wait = SETTINGS[setting]
            env = {**base_env, **({"OMP_WAIT_POLICY": wait} if wait else {})}
            out = work / workload.replace(" ", "_")
            cmd = [sys.executable, "-m", "otfuse_cli", *(["--threads", threads] if threads else []), "--quiet",
                   *workloads[workload](out), "--force"]
            spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy if load == "busy"
                                                                                        else 0)]
            for p in spinners:
                p.start()
            try:
                m = measure(cmd, env)
            finally:
                for p in spinners:
                    p.kill()
                    p.join()
            runs.append({"round": r, "load": load, "setting": setting, "workload": workload,
                         "wall_s": round(m["wall_s"], 2), "cpu_s": round(m["cpu_s"], 2), "sha256": sha(out)})
            print(json.dumps(runs[-1]), flush=True)
    table = {}
    for load, setting, workload in jobs:
        mine = [x for x in runs if (x["load"], x["setting"], x["workload"]) == (load, setting, workload)]
        table[f"{workload}|{load}|{setting}"] = {
            "cpu_s": statistics.median(x["cpu_s"] for x in mine), "wall_s": statistics.median(x["wall_s"] for x in mine),
            "outputs": sorted({x["sha256"] for x in mine})}
    doc = {"cores": len(os.sched_getaffinity(0)), "busy_processes": args.busy, "rounds": args.rounds,
           "samples": args.samples, "median": table, "runs": runs}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for key, v in table.items():
        print(f"{key:60} cpu {v['cpu_s']:7.1f}  wall {v['wall_s']:7.1f}  {','.join(v['outputs'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
