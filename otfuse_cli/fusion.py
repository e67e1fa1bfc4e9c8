"""Fusion: every parent mapped into the anchor's basis by its plans and combined by a merge rule,
F = merge(T_out^T W_k T_in), streamed tensor by tensor."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from otfuse_cli.alignment.plans import check_plan_inputs, load_plans
from otfuse_cli.alignment.transport import Plan, Transporter
from otfuse_cli.alignment.weights import as_float
from otfuse_cli.card import card_for
from otfuse_cli.checkpoint import provenance, sha256_file, write_checkpoint
from otfuse_cli.checkpoint.guard import input_paths, refuse_overlap
from otfuse_cli import report
from otfuse_cli.errors import OtfuseError
from otfuse_cli.merging.rules import MERGES
from otfuse_cli.options import AlignOptions, DataOptions, MergeOptions, OutputOptions
from otfuse_cli.pipeline import (Parents, check_output, check_shard_size, compute_plans, data_record, dtype_overrides,
                                 layout_of, open_parents, output_dtype, plan_summary)


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


def _statistic(rule, parents: Parents, movers, plans, stats, name: str, k: int):
    """Parent k's statistic for tensor `name`, moved into the anchor's basis; None when it has none."""
    if rule.needs == "gram":
        gram = stats[k].grams.get(name)
        if gram is None:
            return None
        axis = stats[k].in_axis[name]
        return (gram if k == parents.anchor else movers[k].move_like(name, axis, gram, plans[k], (0, 1)), axis)
    fisher = stats[k].fisher.get(name)
    if fisher is None:
        return None
    return fisher if k == parents.anchor else movers[k].move(name, fisher, plans[k])


def fused_tensors(parents: Parents, plans: list[dict[str, Plan]], weights: list[float], merge: MergeOptions,
                  write: OutputOptions, stats: list | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    anchor = parents.anchor
    movers = [Transporter(parents.specs[anchor], s) for s in parents.specs]
    rule = MERGES[merge.merge]
    ckpt = parents.ckpts[anchor]
    for name, dtype, shape in fused_layout(ckpt, write):
        if not dtype.is_floating_point:  # integer buffers (num_batches_tracked) stay the anchor's
            yield name, ckpt.get(name)
            continue
        aligned = []
        for k in range(len(parents.ckpts)):
            x = parents.source(k).take(name, raw=rule.elementwise)  # an elementwise rule converts block by block
            if k != anchor:
                x = movers[k].move(name, x, plans[k])
            if tuple(x.shape) != shape:
                raise OtfuseError(f"{parents.label(k)}: {name} has shape {tuple(x.shape)}, anchor "
                                  f"{shape}; align the parents to fuse different widths")
            aligned.append(x)
        extra = None
        if rule.needs:
            extra = [_statistic(rule, parents, movers, plans, stats, name, k) for k in range(len(aligned))]
            extra = None if any(e is None for e in extra) else extra
        if rule.elementwise:
            yield name, _blockwise(rule, name, aligned, weights, extra, merge.regmean_alpha, dtype)
        else:
            yield name, rule(name, aligned, weights, extra, merge.regmean_alpha).to(dtype)


def fused_layout(ckpt, write: OutputOptions) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor fused_tensors yields, known from the anchor's header before any
    weight is read: the writer lays the shards out from it and writes each tensor as it comes."""
    return [(name, output_dtype(ckpt.dtype(name), write) if ckpt.dtype(name).is_floating_point
             else ckpt.dtype(name), ckpt.shape(name)) for name in ckpt.keys()]


# Elements per block of an elementwise merge. Its float32 temporaries (4 MiB) are reused from the allocator's
# free memory; whole-tensor temporaries were fresh pages every time, and faulting them in (5.4 million faults)
# took half the CPU time of `--align none` on a 1.1B pair.
BLOCK = 1 << 20


def _blockwise(rule, name: str, aligned: list[torch.Tensor], weights: list[float], extra: list | None, alpha: float,
               dtype: torch.dtype) -> torch.Tensor:
    """rule applied to aligned blocks of the parents' elements (any dtype; computed in float32, float64 kept),
    written straight into the output tensor of `dtype`."""
    out = torch.empty(aligned[0].shape, dtype=dtype)
    flat = out.view(-1)
    xs = [x.reshape(-1) for x in aligned]
    ss = None if extra is None else [s.reshape(-1) for s in extra]
    for start in range(0, flat.numel(), BLOCK):
        block = slice(start, start + BLOCK)
        flat[block] = rule(name, [as_float(x[block]) for x in xs], weights,
                           None if ss is None else [as_float(s[block]) for s in ss], alpha)
    return out


def parent_stats(parents: Parents, merge: MergeOptions, data: DataOptions, stats_files: list[str] | None):
    """The statistics the merge rule needs, one per parent: read from --stats files (each party's own), or
    computed for every parent on --data (one party holding all the data)."""
    rule = MERGES[merge.merge]
    if not rule.needs:
        if stats_files:
            raise OtfuseError(f"--stats is read by --merge regmean or fisher, not {merge.merge}")
        return None
    from otfuse_cli.merging.stats import compute_stats, load_stats

    if stats_files:
        if len(stats_files) != len(parents.ckpts):
            raise OtfuseError(f"--stats needs one file per model: {len(stats_files)} for {len(parents.ckpts)} models")
        stats = [load_stats(p) for p in stats_files]
        for k, (s, ckpt) in enumerate(zip(stats, parents.ckpts)):
            check_stats_source(s, ckpt, stats_files[k], parents.label(k))
    elif data.data:
        stats = [compute_stats(ckpt, data, (rule.needs,)) for ckpt in parents.ckpts]
    else:
        raise OtfuseError(f"--merge {merge.merge} needs statistics: --stats FILE per model (otfuse stats) "
                          "or --data FILE")
    if not any(getattr(s, "grams" if rule.needs == "gram" else "fisher") for s in stats):
        raise OtfuseError(f"the statistics hold no {rule.needs} data for --merge {merge.merge}")
    return stats


def check_stats_source(stats, ckpt, path: str, label: str) -> None:
    """A stats file must come from this very model: its recorded weight files' hashes must match."""
    from otfuse_cli.checkpoint import sha256_file

    recorded = {f for entry in stats.info.get("inputs", []) for f in entry.get("files", {}).values()}
    weights = [f for f in ckpt.files() if f.suffix in (".safetensors", ".bin", ".pt")]
    if not weights or any(sha256_file(f) not in recorded for f in weights):
        raise OtfuseError(f"{path} was not computed from {label}: its weights differ from the stats' source")


def check_plans(plans, parents: Parents) -> None:
    if len(plans) != len(parents.specs):
        raise OtfuseError(f"plan file holds {len(plans)} models but {len(parents.specs)} were given")
    anchor = parents.anchor
    for k, spec in enumerate(parents.specs):
        if k == anchor:
            continue
        for sa, sp in zip(parents.specs[anchor].spaces, spec.spaces):
            plan = plans[k].get(sa.name)
            if plan is None or plan.shape != (sp.size, sa.size):
                raise OtfuseError(f"plan file does not match these models (space {sa.name!r})")


def reads_data(options: AlignOptions, merge: MergeOptions, plan: str | None, stats: list[str] | None,
               repair: bool) -> bool:
    """Whether some step of this fusion runs the models on --data: activation alignment (not with a plan),
    a merge rule's statistics (not given as --stats files), or the repair."""
    return repair or (not plan and options.align == "activations") or (MERGES[merge.merge].needs and not stats)


def fuse(models: list[str], output: str, *, options: AlignOptions = AlignOptions(),
         data: DataOptions = DataOptions(), merge: MergeOptions = MergeOptions(),
         write: OutputOptions = OutputOptions(), anchor: int = 0, weights: str | None = None,
         plan: str | None = None, stats: list[str] | None = None, repair: bool = False,
         command_options: dict | None = None, on_space: Callable[[str], None] | None = None,
         allow_config_mismatch: bool = False) -> dict:
    """Fuse `models` into `output`: align onto the anchor (or reuse `plan`; options.align "none" keeps every
    parent in its own basis, the vanilla baseline), then merge by `merge.merge`, reading `stats` files (one
    per model) or computing them on `data.data`. repair renormalises the fused units on `data.data` (REPAIR;
    BatchNorm nets: their statistics re-estimated). Parents whose config or tokenizer changes the function are
    refused unless allow_config_mismatch (the result runs with the anchor's config)."""
    check_output(output, write)
    if repair and not data.data:
        raise OtfuseError("--repair needs --data FILE with sample inputs")
    parents = open_parents(models, anchor, allow_config_mismatch)
    uses_data = reads_data(options, merge, plan, stats, repair)
    refuse_overlap(output, input_paths(parents.ckpts, [plan, *(stats or []), data.data if uses_data else None]))
    w = parse_weights(weights, len(parents.ckpts))
    layout = layout_of(parents.ckpts[anchor], output)
    check_shard_size(layout, write)
    if data.data and not uses_data:
        raise OtfuseError("--data is read by --align activations, --merge regmean/fisher (without --stats) or "
                          "--repair; none of them is chosen here")
    data = data.for_family(parents.specs[anchor].family)
    align_record, extra = options.to_json(), {}
    if plan:
        plans, plan_meta = load_plans(plan)
        check_plan_inputs(plan_meta, parents.ckpts, parents.specs, anchor, plan)
        check_plans(plans, parents)
        # provenance describes the plan actually used, not the command line's (unused) alignment defaults
        align_record = plan_meta.get("options", {})
        extra = {"plan_sha256": sha256_file(plan), **({"data": plan_meta["data"]} if "data" in plan_meta else {})}
    else:
        info = data_record(options, data)
        extra = {"data": info} if info else {}
        plans = compute_plans(parents, options, data, on_space)
    parent_statistics = parent_stats(parents, merge, data, stats)
    record = provenance("fuse", {**(command_options or {}), "merge": merge.to_json(), "anchor": anchor,
                                 "weights": w, "dtype": write.dtype, "align": align_record, "plan_file": plan,
                                 "stats_files": stats, "repair": str(data.data) if repair else None,
                                 **extra}, parents.ckpts)
    tensors = report.counted(fused_tensors(parents, plans, w, merge, write, parent_statistics), on_space,
                             "merging", len(parents.ckpts[anchor].keys()))
    planned = fused_layout(parents.ckpts[anchor], write)
    if repair:  # needs the whole fused model in memory to run it
        from otfuse_cli.merging.repair import repair_fused

        tensors, planned = repair_fused(dict(tensors), parents, plans, w, data), None
    out = write_checkpoint(output, tensors, layout=layout, source=parents.ckpts[anchor], planned=planned,
                           config_overrides=dtype_overrides(parents.ckpts[anchor], write) or None,
                           provenance=record, max_shard_size=write.max_shard_size, force=write.force,
                           card=card_for(layout, record, parents.ckpts, anchor))
    return {"output": str(out), "family": parents.specs[anchor].family,
            "align": align_record.get("align", options.align), "merge": merge.merge, "anchor": anchor, "weights": w,
            "spaces": plan_summary(plans, parents.specs, anchor)}
