"""Fusion: every parent mapped into the anchor's basis by its plans and combined by a merge rule,
F = merge(T_out^T W_k T_in), streamed tensor by tensor."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from otfuse_cli.alignment.plans import load_plans
from otfuse_cli.alignment.transport import Plan, Transporter
from otfuse_cli.alignment.weights import checked_float
from otfuse_cli.checkpoint import provenance, write_checkpoint
from otfuse_cli.checkpoint.guard import input_paths, refuse_overlap
from otfuse_cli.errors import OtfuseError
from otfuse_cli.merge import MERGES
from otfuse_cli.options import AlignOptions, DataOptions, OutputOptions
from otfuse_cli.pipeline import (Parents, check_output, compute_plans, data_record, layout_of, open_parents,
                                 output_dtype, plan_summary)

METHODS = ("ot", "average")


def parse_weights(text: str | None, count: int) -> list[float]:
    if not text:
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise OtfuseError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if len(weights) != count or any(not w >= 0 for w in weights) or not 0 < sum(weights) < float("inf"):
        raise OtfuseError(f"--weights needs {count} non-negative numbers with a positive sum, got {text!r}")
    return [w / sum(weights) for w in weights]


def fused_tensors(parents: Parents, plans: list[dict[str, Plan]], weights: list[float], merge: str,
                  write: OutputOptions) -> Iterator[tuple[str, torch.Tensor]]:
    anchor = parents.anchor
    movers = [Transporter(parents.specs[anchor], s) for s in parents.specs]
    rule = MERGES[merge]
    for name in parents.ckpts[anchor].keys():
        ref = parents.ckpts[anchor].get(name)
        if not ref.is_floating_point():  # integer buffers (BatchNorm's num_batches_tracked) stay the anchor's
            yield name, ref
            continue
        aligned = []
        for k, ckpt in enumerate(parents.ckpts):
            x = checked_float(ckpt.get(name), parents.label(k), name)
            if k != anchor:
                x = movers[k].move(name, x, plans[k])
            if x.shape != ref.shape:
                raise OtfuseError(f"{parents.label(k)}: {name} has shape {tuple(x.shape)}, anchor "
                                  f"{tuple(ref.shape)}; use --method ot to fuse different widths")
            aligned.append(x)
        yield name, rule(name, aligned, weights).to(output_dtype(ref.dtype, write))


def check_plans(plans, parents: Parents) -> None:
    if len(plans) != len(parents.specs):
        raise OtfuseError(f"plan file holds {len(plans)} models but {len(parents.specs)} were given")
    anchor = parents.anchor
    for k, spec in enumerate(parents.specs):
        if k == anchor:
            continue
        for sa, sp in zip(parents.specs[anchor].spaces, spec.spaces):
            plan = plans[k].get(sa.name)
            if plan is None or tuple(plan.coupling.shape) != (sp.size, sa.size):
                raise OtfuseError(f"plan file does not match these models (space {sa.name!r})")


def fuse(models: list[str], output: str, *, options: AlignOptions = AlignOptions(),
         data: DataOptions = DataOptions(), write: OutputOptions = OutputOptions(), method: str = "ot",
         merge: str = "average", anchor: int = 0, weights: str | None = None, plan: str | None = None,
         repair_bn: bool = False, command_options: dict | None = None,
         on_space: Callable[[str], None] | None = None) -> dict:
    """Fuse `models` into `output`: align onto the anchor (or reuse `plan`), then merge. method "average"
    skips alignment (the vanilla baseline). repair_bn re-estimates BatchNorm statistics on `data.data`."""
    if method not in METHODS:
        raise OtfuseError(f"unknown --method {method!r}; choose from {', '.join(METHODS)}")
    if merge not in MERGES:
        raise OtfuseError(f"unknown --merge {merge!r}; choose from {', '.join(MERGES)}")
    check_output(output, write)
    if repair_bn and not data.data:
        raise OtfuseError("--repair-bn needs --data FILE with sample inputs")
    parents = open_parents(models, anchor)
    uses_data = repair_bn or (method == "ot" and not plan and options.align == "activations")
    refuse_overlap(output, input_paths(parents.ckpts, [plan, data.data if uses_data else None]))
    w = parse_weights(weights, len(parents.ckpts))
    info = None
    if method == "average":
        plans = [{} for _ in parents.ckpts]
    elif plan:
        plans = load_plans(plan)[0]
        check_plans(plans, parents)
    else:
        info = data_record(options, data)
        plans = compute_plans(parents, options, data, on_space)
    record = provenance("fuse", {**(command_options or {}), "method": method, "merge": merge, "anchor": anchor,
                                 "weights": w, "dtype": write.dtype, "align": options.to_json(), "plan_file": plan,
                                 "repair_bn": str(data.data) if repair_bn else None,
                                 **({"data": info} if info else {})}, parents.ckpts)
    tensors = fused_tensors(parents, plans, w, merge, write)
    if repair_bn:  # needs the whole fused model in memory to run it
        from otfuse_cli.repair import repair_batchnorm

        tensors = repair_batchnorm(dict(tensors), parents.ckpts[anchor], data)
    out = write_checkpoint(output, tensors, layout=layout_of(parents.ckpts[anchor]), source=parents.ckpts[anchor],
                           provenance=record, max_shard_size=write.max_shard_size, force=write.force)
    return {"output": str(out), "family": parents.specs[anchor].family, "method": method, "anchor": anchor,
            "weights": w, "spaces": plan_summary(plans, parents.specs, anchor)}
