"""What the identity certificate saves when the parents are children of one pre-trained model.

Weight alignment of fine-tunes of one model finds the identity in every space. Since the certificate (a cost
whose every column is least on its diagonal is solved by the identity, alignment/solvers.py) no assignment
is solved for them. This runs, interleaved over rounds, each in its own process:
  certified  `otfuse fuse CHILDREN --align weights` as shipped;
  solved     the same with the certificate switched off (every assignment solved by lapjvs);
  none       `--align none` (no alignment: the floor of any route that aligns);
and checks that the certified and solved outputs are byte-identical. CPU seconds of the child process
(user + system) and wall seconds; medians over rounds in benchmarks/same_basis.json.

    python benchmarks/same_basis.py CHILD_A/ CHILD_B/ [...] [--rounds 3] [--base BASE/ --merge ties]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = """
import sys
import otfuse_cli.alignment.solvers as solvers
if sys.argv[1] == "solved":
    solvers.identity_is_optimal = lambda cost: False
from otfuse_cli.cli import main
sys.argv = ["otfuse", "-q", *sys.argv[2:]]
main()
"""


def run(mode: str, args: list[str]) -> dict:
    start = time.perf_counter()
    before = os.times()
    subprocess.run([sys.executable, "-c", RUN, mode, *args], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    after = os.times()
    return {"wall_s": time.perf_counter() - start,
            "cpu_s": (after.children_user - before.children_user) + (after.children_system - before.children_system)}


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("children", nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base")
    parser.add_argument("--merge", default="average")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "same_basis.json"))
    a = parser.parse_args()
    extra = ["--merge", a.merge] + (["--base", a.base] if a.base else [])
    runs: dict[str, list[dict]] = {"certified": [], "solved": [], "none": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for mode in runs:
                out = Path(tmp) / f"{mode}{r}"
                align = ["--align", "none"] if mode == "none" else ["--align", "weights"]
                runs[mode].append(run(mode, ["fuse", *a.children, "-o", str(out), *align, *extra]))
                runs[mode][-1]["sha256"] = digest(out)
        same = len({x["sha256"] for x in runs["certified"] + runs["solved"]}) == 1
    summary = {mode: {k: round(statistics.median(x[k] for x in xs), 2) for k in ("wall_s", "cpu_s")}
               for mode, xs in runs.items()}
    doc = {"children": a.children, "base": a.base, "merge": a.merge, "rounds": a.rounds,
           "date": time.strftime("%Y-%m-%d"), "outputs_identical": same, "median": summary, "runs": runs}
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({"outputs_identical": same, "median": summary}, indent=2))


if __name__ == "__main__":
    main()
