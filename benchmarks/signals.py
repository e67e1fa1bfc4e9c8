"""Signals at random moments: SIGINT and SIGTERM sent to a real `otfuse fuse --align none` of two ~100 MB
models at offsets drawn uniformly over a whole uninterrupted run (start-up imports, reading, merging, writing,
renaming, exit), each trial followed by a rerun with --force.

The contract checked on every trial, whatever the moment:
- exit 130 with stderr exactly `error: interrupted`, or exit 0 (the signal came after the outcome was known)
  with an empty stderr; never a traceback, an abort (-6) or death by the signal (-2, -15);
- the output path absent or byte-identical to an uninterrupted run's output; no temporary left;
- the rerun exits 0, writes the same bytes and leaves no temporary.

A signal that lands before the interpreter has run otfuse's first line (its own start-up, ~10-20 ms, the
handler's SigCgt bit not yet set) meets Python's defaults, which no program can change; such trials are
counted apart (`before_handler`), not hidden.

Half the trials start the console script (`otfuse`), half `python -m otfuse_cli`; both go through
otfuse_cli.entry. Offsets are seeded: the same --seed gives the same moments (the machine decides what
each moment lands on).

    python benchmarks/signals.py --trials 50          # per signal; summary, then every failing trial
    python benchmarks/signals.py --trials 50 --out benchmarks/signals.json
tests/test_kill.py imports this module and runs a handful of trials in the suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IN, HIDDEN, OUT = 8000, 3072, 10  # 24.6M float32 parameters: ~98 MB per model
NAME = "fused.safetensors"
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}


def make_pair(folder: Path) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    paths = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        path = folder / f"big_{seed}.safetensors"
        save_file({"0.weight": torch.randn(HIDDEN, IN, generator=g), "0.bias": torch.randn(HIDDEN, generator=g),
                   "2.weight": torch.randn(OUT, HIDDEN, generator=g), "2.bias": torch.randn(OUT, generator=g)}, path)
        paths.append(path)
    return paths


def command(pair: list[Path], out: Path, script: bool, force: bool = False) -> list[str]:
    """The console script when it is installed next to this interpreter, else `python -m otfuse_cli`."""
    exe = Path(sys.executable).with_name("otfuse")
    head = [str(exe)] if script and exe.is_file() else [sys.executable, "-m", "otfuse_cli"]
    return [*head, "fuse", *map(str, pair), "-o", str(out), "--align", "none", *(["--force"] if force else [])]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scratch(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".otfuse-" in p.name)


def reference(pair: list[Path], folder: Path) -> tuple[str, float]:
    """An uninterrupted run's output hash and wall seconds (the span offsets are drawn over)."""
    out = folder / NAME
    start = time.perf_counter()
    done = subprocess.run(command(pair, out, script=False), env=env(), capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed: {done.stderr}")
    digest = sha(out)
    out.unlink()
    return digest, seconds


def handler_installed(pid: int) -> bool | None:
    """otfuse's handler is in place: the process catches SIGTERM (/proc/PID/status SigCgt; Python itself only
    catches SIGINT). None where there is no /proc, or the process is gone."""
    try:
        masks = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith(("SigCgt:", "SigIgn:")))
        bit = 1 << (signal.SIGTERM - 1)
        return bool((int(masks["SigCgt"], 16) | int(masks["SigIgn"], 16)) & bit)  # ignored: the outcome is known
    except (OSError, ValueError, KeyError):
        return None


def wait_for_handler(proc: subprocess.Popen, limit: float = 120) -> None:
    """Until the handler is installed (bounded by a generous hang guard, not a speed assumption)."""
    end = time.monotonic() + limit
    while proc.poll() is None and time.monotonic() < end and handler_installed(proc.pid) is False:
        time.sleep(0.0005)


def trial(pair: list[Path], folder: Path, expected: str, sig: int, offset: float, script: bool,
          rerun: bool = True, after_handler: bool = False) -> dict:
    """One run signalled `offset` seconds after it started (after_handler: after otfuse's handler was in
    place); returns what happened and any broken promise. `handler` says whether the handler was in place
    when the signal was sent: a signal before it lands in the interpreter's own start-up, before any line of
    otfuse has run."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    out = folder / NAME
    proc = subprocess.Popen(command(pair, out, script), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        if after_handler:
            wait_for_handler(proc)
        time.sleep(offset)
        installed = handler_installed(proc.pid)
        landed = proc.poll() is None
        if landed:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
        proc.wait()
    rec = {"signal": signal.Signals(sig).name, "offset_s": round(offset, 3), "script": script, "landed": landed,
           "handler": installed,
           "exit": proc.returncode, "stderr": err[-2000:], "problems": []}
    problems = rec["problems"]
    if proc.returncode == 130:
        if err != "error: interrupted\n":
            problems.append("exit 130 without exactly one `error: interrupted` line")
    elif proc.returncode == 0:
        if err:
            problems.append("exit 0 with something on stderr")
    else:
        problems.append(f"exit {proc.returncode}")
    if "Traceback" in err:
        problems.append("traceback")
    if out.exists() and (not out.is_file() or sha(out) != expected):
        problems.append("output neither absent nor complete")
    if proc.returncode == 0 and not out.is_file():
        problems.append("exit 0 without an output")
    if left := scratch(folder):
        problems.append(f"temporaries left: {left}")
    if rerun:
        again = subprocess.run(command(pair, out, script, force=True), env=env(), capture_output=True, text=True,
                               timeout=600)
        if again.returncode != 0 or not out.is_file() or sha(out) != expected:
            problems.append(f"rerun failed (exit {again.returncode}): {again.stderr[-500:]}")
        elif left := scratch(folder):
            problems.append(f"temporaries left after the rerun: {left}")
    return rec


def run(trials: int, seed: int, work: Path) -> dict:
    pair = make_pair(work)
    expected, seconds = reference(pair, work)
    rng = random.Random(seed)
    records = []
    for i in range(trials):
        for name, sig in SIGNALS.items():
            offset = rng.uniform(0, seconds)
            rec = trial(pair, work / "trial", expected, sig, offset, script=bool(i % 2))
            records.append(rec)
            mark = "FAIL " + "; ".join(rec["problems"]) if rec["problems"] else "ok"
            where = "" if rec["handler"] is not False else " (before the handler: interpreter start-up)"
            print(f"{name:7s} #{i:3d} at {offset:6.3f} s -> exit {rec['exit']:4d}  {mark}{where}", flush=True)
    return {"trials_per_signal": trials, "seed": seed, "uninterrupted_s": round(seconds, 2),
            "model_mb": round(pair[0].stat().st_size / 1e6, 1), "records": records}


def summary(doc: dict) -> dict:
    out = {}
    for name in SIGNALS:
        rows = [r for r in doc["records"] if r["signal"] == name]
        early = [r for r in rows if r["handler"] is False]
        out[name] = {"trials": len(rows), "landed": sum(r["landed"] for r in rows),
                     "exit_130": sum(r["exit"] == 130 for r in rows), "exit_0": sum(r["exit"] == 0 for r in rows),
                     "failures": sum(bool(r["problems"]) for r in rows if r["handler"] is not False),
                     "before_handler": len(early),
                     "before_handler_failures": sum(bool(r["problems"]) for r in early)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50, help="per signal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the records and summary as JSON")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="otfuse-signals-") as work:
        doc = run(a.trials, a.seed, Path(work))
    doc["summary"] = summary(doc)
    print(json.dumps(doc["summary"], indent=2))
    for rec in doc["records"]:
        if rec["problems"]:
            print(json.dumps(rec, indent=1))
    if a.out:
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
    sys.exit(1 if any(s["failures"] for s in doc["summary"].values()) else 0)


if __name__ == "__main__":
    main()
