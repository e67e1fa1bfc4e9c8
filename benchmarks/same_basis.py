"""What the same-basis fast path saves when the parents are children of one pre-trained model.

Weight alignment of fine-tunes of one model finds the identity in every space. The fast path (the identity
probe in alignment/engine.py and the certificate in alignment/solvers.py) reaches it with one pass of
features and no assignment solve, where the first pass plus a confirming sweep and every solve were needed.
This runs, interleaved over rounds, each in its own process:
  this      `otfuse fuse CHILDREN --align weights` from this checkout;
  baseline  the same command from another checkout (--baseline: a git worktree of an earlier commit);
  none      `--align none` (no alignment: the floor of any route that aligns);
and checks that this and the baseline write byte-identical tensors. CPU seconds of the child process (user +
system) and wall seconds; medians over rounds in benchmarks/same_basis.json.

    git worktree add /tmp/before cc2d1eb
    python benchmarks/same_basis.py CHILD_A/ CHILD_B/ [...] --baseline /tmp/before [--rounds 3]
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

import torch

REPO = Path(__file__).resolve().parents[1]


def run(tree: Path, args: list[str]) -> dict:
    start = time.perf_counter()
    before = os.times()
    subprocess.run([sys.executable, "-m", "otfuse_cli", "-q", *args], check=True, cwd=tree,
                   env={**os.environ, "PYTHONPATH": str(tree)})
    after = os.times()
    return {"wall_s": time.perf_counter() - start,
            "cpu_s": (after.children_user - before.children_user) + (after.children_system - before.children_system)}


def digest(folder: Path) -> str:
    """Of the tensors only (names and bytes): the provenance in the header differs between checkouts."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")):
        for name, t in sorted(load_file(f).items()):
            h.update(name.encode() + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def one_head(children: list[str], tmp: Path) -> list[str]:
    """Copies of the children that all carry the first child's classifier and config, so that a checkout
    without per-parent heads fuses them too (the heads are no part of what alignment costs)."""
    import shutil

    from safetensors.torch import load_file, save_file

    first = load_file(Path(children[0]) / "model.safetensors")
    out = []
    for k, child in enumerate(children):
        folder = tmp / f"child{k}"
        shutil.copytree(children[0], folder)
        sd = load_file(Path(child) / "model.safetensors")
        save_file({n: (first[n] if n.startswith("classifier.") else v).contiguous() for n, v in sd.items()},
                  folder / "model.safetensors")
        out.append(str(folder))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("children", nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", required=True, help="another checkout of otfuse (git worktree)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "same_basis.json"))
    a = parser.parse_args()
    trees = {"this": REPO, "baseline": Path(a.baseline).resolve(), "none": REPO}
    runs: dict[str, list[dict]] = {mode: [] for mode in trees}
    with tempfile.TemporaryDirectory() as tmp:
        children = one_head([str(Path(c).resolve()) for c in a.children], Path(tmp))
        for r in range(a.rounds):
            for mode, tree in trees.items():
                out = Path(tmp) / f"{mode}{r}"
                align = ["--align", "none"] if mode == "none" else ["--align", "weights"]
                runs[mode].append(run(tree, ["fuse", *children, "-o", str(out), *align]))
                runs[mode][-1]["sha256"] = digest(out)
        same = len({x["sha256"] for x in runs["this"] + runs["baseline"]}) == 1
    summary = {mode: {k: round(statistics.median(x[k] for x in xs), 2) for k in ("wall_s", "cpu_s")}
               for mode, xs in runs.items()}
    doc = {"children": a.children, "baseline": a.baseline, "rounds": a.rounds,
           "date": time.strftime("%Y-%m-%d"), "outputs_identical": same, "median": summary, "runs": runs}
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({"outputs_identical": same, "median": summary}, indent=2))


if __name__ == "__main__":
    main()
