"""Merge rules: how parents already moved into the anchor's basis combine into one tensor. One function per
rule in a registry whose keys are the `--merge` choices; a rule sees one tensor name at a time (streaming).
Rules use tensor methods only, so the command line can list them without importing torch."""

from __future__ import annotations

from typing import Callable


def average(name: str, aligned: list, weights: list[float]):
    """Weighted average: F = sum_k w_k * T_k(W_k), accumulated from zero in float32."""
    out = aligned[0].new_zeros(aligned[0].shape)
    for x, w in zip(aligned, weights):
        out += w * x
    return out


# rule(tensor name, aligned float32 tensors (one per parent), normalised weights) -> fused tensor
MERGES: dict[str, Callable] = {"average": average}
