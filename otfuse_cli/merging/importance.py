"""Activation importance of the units of compressed spaces (`compress --method importance --data`).

A unit's score is the L2 norm, over every token (or sample) of --data, of what it writes: its column of the
input to the linear layer that reads the space (a transformer FFN's down projection sees silu(gate) * up, an
MLP's next layer the ReLU's output). This is Minitron's width-pruning importance (Muralidharan et al. 2024),
which on SmolLM2-135M kept the model usable where weight-based pruning and merging did not
(benchmarks/RESULTS.md). One forward pass over the data."""

from __future__ import annotations

import torch

from otfuse_cli import interrupts
from otfuse_cli.errors import OtfuseError
from otfuse_cli.options import DataOptions


@torch.no_grad()
def unit_importance(ckpt, spec, targets: dict[str, int], data: DataOptions) -> dict[str, torch.Tensor]:
    """Per compressed space, each unit's score (float64, CPU); a space no linear layer reads whole is refused."""
    from otfuse_cli.alignment.activations import sample_batches
    from otfuse_cli.merging.refit import Hooks, readers, token_rows
    from otfuse_cli.runnable import load_runnable

    model = load_runnable(ckpt, device=data.device)
    found = readers(spec, targets, model.module)
    unread = sorted(set(targets) - {space for _, _, space in found})
    if unread:
        raise OtfuseError(f"compress --method importance scores a unit by what a linear layer reading its space "
                          f"receives; no linear layer reads space {unread[0]!r} whole (e.g. a conv's channels)")
    batches = sample_batches(model, data.data, data.samples, data.seed, data.max_length, split=data.split)
    spaces = {s.name: s for s in spec.spaces}
    # a reader's input columns, unit by unit as the space lays them out (a KV group's heads span many columns)
    entry_of = {name: next(e for e in spaces[space].entries if e.tensor == tensor and e.role == "in")
                for name, tensor, space in found}
    space_of = {name: space for name, _, space in found}
    squares = {space: torch.zeros(spaces[space].size, dtype=torch.float64) for space in targets}
    for batch, masks in batches:
        interrupts.check()

        def record(name, h, masks=masks):
            rows = token_rows(h, masks)
            e, size = entry_of[name], spaces[space_of[name]].size
            columns = (rows * rows).sum(0).cpu().narrow(0, e.start, e.span(size))
            squares[space_of[name]] += columns.reshape(size, -1).sum(1)

        with Hooks(model, list(space_of), record):
            model.predict_logits(batch)
    return {space: s.sqrt() for space, s in squares.items()}
