"""Data-free variance repair after compression (`compress --repair` without --data), as model folding does it
(Wang et al., ICLR 2025, its data-free approximate REPAIR).

A merged unit's incoming weights are its members' mean, whose norm is smaller than theirs unless they point the
same way: on inputs with no preferred direction its pre-activation has less spread than each member's, and the
next layer sees activations collapse toward their mean. REPAIR sets each merged unit's std to its members'
average; with no data the std of w·x on such inputs is |w| (and its mean the bias, which merging already
averages), so the repair scales each merged unit's incoming weight rows to their members' mean norm and leaves
biases alone. Identical members (scale 1) and pruned units (their own row) are left as they were.
"""

from __future__ import annotations

import torch

from otfuse_cli.alignment.transport import Plan, Transporter
from otfuse_cli.arch.model import Spec

# Units that are single rows of their producing weights; attention heads (blocks of rows read through softmax)
# are not rescaled.
PLAIN_KINDS = ("ffn", "hidden", "channel")


def repaired_axes(spec: Spec, plans: dict[str, Plan]) -> dict[str, dict[int, set[str]]]:
    """tensor -> axis -> the compressed spaces whose units that axis of that weight produces."""
    out: dict[str, dict[int, set[str]]] = {}
    for space in spec.spaces:
        if space.name not in plans or space.kind not in PLAIN_KINDS:
            continue
        for e in space.entries:
            if e.role == "out" and e.rep == 1 and e.inner == 1:
                out.setdefault(e.tensor, {}).setdefault(e.axis, set()).add(space.name)
    return out


def row_norms(x: torch.Tensor, axis: int) -> torch.Tensor:
    return x.double().movedim(axis, 0).reshape(x.shape[axis], -1).norm(dim=1)


class VarianceRepair:
    """Rescales the rows of each compressed tensor that produce merged units (see the module docs)."""

    def __init__(self, spec: Spec, target: Spec, plans: dict[str, Plan]):
        self.plans, self.mover = plans, Transporter(target, spec)
        self.axes = repaired_axes(spec, plans)

    def __call__(self, name: str, original: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        """`moved` (the compressed tensor) with its merged rows rescaled; `original` is the tensor before."""
        for axis, spaces in self.axes.get(name, {}).items():
            if original.dim() < 2:  # a bias or norm vector: the mean is kept
                continue
            own = {s: self.plans[s] for s in spaces}
            # members' mean norm and the merged row's norm, both in the original input basis
            target = self.mover.move_like(name, axis, row_norms(original, axis), own)
            merged = row_norms(self.mover.move(name, original, own), axis)  # other axes stay put
            if len(merged) != moved.shape[axis]:  # another kind of compressed space shares this axis
                continue
            scale = torch.where(merged > 1e-12, target / merged.clamp_min(1e-12), torch.ones_like(merged))
            shape = [1] * moved.dim()
            shape[axis] = -1
            moved = (moved.double() * scale.reshape(shape)).to(moved.dtype)
        return moved
