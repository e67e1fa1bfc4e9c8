"""Fusion: every parent mapped into the anchor's basis by its plans and combined by a merge rule,
F = merge(T_out^T W_k T_in), streamed tensor by tensor."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from otfuse_cli.alignment.plans import check_plan_inputs, load_plans
from otfuse_cli.alignment.transport import Plan, Transporter
from otfuse_cli.alignment.weights import TensorSource, as_float
from otfuse_cli.arch.compat import head_tensors
from otfuse_cli.card import card_for
from otfuse_cli.checkpoint import open_checkpoint, provenance, sha256_file, write_checkpoint
from otfuse_cli.checkpoint.guard import input_paths, refuse_overlap
from otfuse_cli import deadline, distributed, report
from otfuse_cli.errors import OtfuseError
from otfuse_cli.merging.fit import Fit, warnings as fit_warnings
from otfuse_cli.merging.predictions import check_fused, predictions_of, warnings as prediction_warnings
from otfuse_cli.merging.rules import MERGES, Tensor
from otfuse_cli.options import AlignOptions, DataOptions, MergeOptions, OutputOptions
from otfuse_cli.pipeline import (Parents, check_data, check_output, check_shard_size, compute_plans, data_record,
                                 dtype_overrides, layout_of, open_parents, output_dtype, plan_summary,
                                 requested_layout, resolved, weights_route_device)


def weight_numbers(text: str | None) -> list[float] | None:
    """--weights as numbers, checked before any model is read; None when not given. An empty string is not
    "not given": it is refused like any other text that holds no numbers."""
    if text is None:
        return None
    try:
        if not isinstance(text, str):
            raise ValueError
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise OtfuseError(f"--weights must be comma-separated numbers, got {text!r}") from None


def parse_weights(text: str | None, count: int) -> list[float]:
    weights = weight_numbers(text)
    if weights is None:
        return [1.0 / count] * count
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
        return (movers[k].move_like(name, axis, gram, plans[k], (0, 1)) if plans[k] else gram, axis)
    fisher = stats[k].fisher.get(name)
    if fisher is None:
        return None
    return movers[k].move(name, fisher, plans[k]) if plans[k] else fisher


@dataclass
class Base:
    """The parents' common pre-trained model (--base): its tensors, by the parents' tensor names."""

    source: TensorSource
    names: dict[str, str]  # parent tensor name -> the base's (a bare body may lack the parents' prefix)


def open_base(path: str, parents: Parents, allow_config_mismatch: bool) -> Base:
    """Open --base and match every tensor the parents merge to one of the base's of the same shape. A base
    saved as the bare body (BertModel) names its tensors without the task model's prefix ("bert.")."""
    from otfuse_cli.arch.compat import check_config_match

    ckpt = open_checkpoint(path)
    anchor = parents.ckpts[parents.anchor]
    kept = set(parents.heads[parents.anchor]) if parents.heads else set()
    names = {}
    for name in anchor.keys():
        if name in kept or not anchor.dtype(name).is_floating_point:
            continue
        found = name if name in ckpt else None
        if found is None and "." in name and name.split(".", 1)[1] in ckpt:
            found = name.split(".", 1)[1]
        if found is None:
            hint = "; its task heads are not in the base: keep each parent's own with --heads keep" \
                if name in head_tensors(anchor) else ""
            raise OtfuseError(f"--base {path} has no tensor {name}{hint}")
        if tuple(ckpt.shape(found)) != tuple(anchor.shape(name)):
            raise OtfuseError(f"--base {path}: {found} has shape {tuple(ckpt.shape(found))}, the parents' "
                              f"{tuple(anchor.shape(name))}; the base must be the parents' pre-trained model")
        names[name] = found
    if not allow_config_mismatch:
        check_config_match(anchor, ckpt, f"--base {path}")
    return Base(TensorSource(ckpt, f"--base {path}"), names)


def fused_tensors(parents: Parents, plans: list[dict[str, Plan]], weights: list[float], merge: MergeOptions,
                  write: OutputOptions, stats: list | None = None, base: Base | None = None,
                  seed: int = 0, fit=None, only: set[str] | None = None,
                  device: torch.device | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged tensors in the anchor's order; with `base`, the rule merges task vectors and the base is
    added back. Task heads kept apart (parents.heads) are not among them. fit (merging.fit.Fit), when
    given, measures each aligned parent's distance to every merged tensor. only: the names merged; every
    other tensor is the anchor's own (moved by the anchor's plans, which barycentric rounds give it).
    device: where each tensor is transported and merged (read on the CPU, moved there, and the result back)."""
    anchor = parents.anchor
    there = (lambda x: x.to(device)) if device is not None and device.type != "cpu" else (lambda x: x)
    movers = [Transporter(parents.specs[anchor], s) for s in parents.specs]
    rule = MERGES[merge.merge]
    ckpt = parents.ckpts[anchor]
    for name, dtype, shape in fused_layout(ckpt, write, _kept(parents)):
        deadline.check("merging")
        if not dtype.is_floating_point:  # integer buffers (num_batches_tracked) stay the anchor's
            yield name, ckpt.get(name)
            continue
        if only is not None and name not in only:
            x = there(parents.source(anchor).take(name))
            yield name, (movers[anchor].move(name, x, plans[anchor]) if plans[anchor] else x).to("cpu", dtype)
            continue
        aligned = []
        for k in range(len(parents.ckpts)):
            x = there(parents.source(k).take(name, raw=rule.elementwise))  # an elementwise rule converts in blocks
            if plans[k]:  # every parent but the anchor, and the anchor too after barycentric rounds
                x = movers[k].move(name, x, plans[k])
            if tuple(x.shape) != shape:
                raise OtfuseError(f"{parents.label(k)}: {name} has shape {tuple(x.shape)}, anchor "
                                  f"{shape}; align the parents to fuse different widths")
            aligned.append(x)
        extra = None
        if rule.needs:
            extra = [_statistic(rule, parents, movers, plans, stats, name, k) for k in range(len(aligned))]
            extra = None if any(e is None for e in extra) else [there(e) for e in extra]
        tensor = Tensor(name, weights, merge, seed=seed)
        origin = None if base is None else there(base.source.take(base.names[name], raw=rule.elementwise))
        if rule.elementwise:
            out = check_finite_output(name, _blockwise(rule, tensor, aligned, extra, origin, dtype), merge)
            if fit is not None:
                fit.add(aligned, out)
            yield name, out.to("cpu")
            continue
        whole = aligned
        if origin is not None:  # task vectors, then the base added back
            origin = as_float(origin)
            aligned = [as_float(x) - origin for x in aligned]
        out = rule(aligned, replace(tensor, stats=extra))
        out = check_finite_output(name, (out if origin is None else out.to(origin.dtype) + origin).to(dtype), merge)
        if fit is not None:
            fit.add(whole, out)
        yield name, out.to("cpu")


def selected(parents: Parents, only: list[str] | None) -> set[str] | None:
    """The floating tensors `only`'s glob patterns pick out (None: all); a pattern that matches none of the
    anchor's tensors is refused before any work, naming a few of them."""
    if not only:
        return None
    import fnmatch

    ckpt = parents.ckpts[parents.anchor]
    names = [n for n in ckpt.keys() if ckpt.dtype(n).is_floating_point and n not in _kept(parents)]
    picked = set()
    for pattern in only:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise OtfuseError(f"--only {pattern!r} matches no tensor of the anchor (its names look like "
                              f"{', '.join(names[:3])}, ...)")
        picked.update(hits)
    return picked


def check_finite_output(name: str, t: torch.Tensor, merge: MergeOptions | None = None) -> torch.Tensor:
    """An output tensor (fused or compressed) must be finite: the inputs are (checked when read), so NaN/Inf
    here is an overflow, e.g. `--scale 1e308` times a task vector, --dtype float16 below values past 65504, or
    compress summing huge outgoing weights (exit 0 with an Inf-filled output before). Checked in blocks: no
    tensor-sized temporary."""
    if not t.is_floating_point():
        return t
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), BLOCK):
        if not bool(torch.isfinite(flat[start:start + BLOCK]).all()):
            hint = f" (--scale {merge.scale:g} is too large)" if merge is not None and merge.scale not in (None, 1.0) \
                else ""
            raise OtfuseError(f"output tensor {name} overflows {str(t.dtype).removeprefix('torch.')}{hint}; nothing "
                              "was written")
    return t


def _kept(parents: Parents) -> set[str]:
    return set(parents.heads[parents.anchor]) if parents.heads else set()


def fused_layout(ckpt, write: OutputOptions, skip: set[str] = frozenset()) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor fused_tensors yields, known from the anchor's header before any
    weight is read: the writer lays the shards out from it and writes each tensor as it comes."""
    return [(name, output_dtype(ckpt.dtype(name), write) if ckpt.dtype(name).is_floating_point
             else ckpt.dtype(name), ckpt.shape(name)) for name in ckpt.keys() if name not in skip]


# Elements per block of an elementwise merge. Its float32 temporaries (4 MiB) are reused from the allocator's
# free memory; whole-tensor temporaries were fresh pages every time, and faulting them in (5.4 million faults)
# took half the CPU time of `--align none` on a 1.1B pair.
BLOCK = 1 << 20


def _blockwise(rule, tensor: Tensor, aligned: list[torch.Tensor], extra: list | None, origin: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
    """rule applied to aligned blocks of the parents' elements (any dtype; computed in float32, float64 kept),
    minus and plus the base's block when there is one, written straight into the output tensor of `dtype`.
    A rule with a per-tensor preparation (TIES' thresholds) first streams over every parent's blocks."""
    out = torch.empty(aligned[0].shape, dtype=dtype, device=aligned[0].device)
    flat = out.view(-1)
    xs = [x.reshape(-1) for x in aligned]
    ss = None if extra is None else [s.reshape(-1) for s in extra]
    bs = None if origin is None else origin.reshape(-1)

    def block(k: int, part: slice) -> torch.Tensor:
        x = as_float(xs[k][part])
        return x if bs is None else x - as_float(bs[part])

    if rule.prepare is not None:
        tensor = replace(tensor, state=rule.prepare(
            lambda k: (block(k, slice(s, s + BLOCK)) for s in range(0, flat.numel(), BLOCK)), tensor))
    for start in range(0, flat.numel(), BLOCK):
        part = slice(start, start + BLOCK)
        merged = rule([block(k, part) for k in range(len(xs))],
                      replace(tensor, start=start, stats=None if ss is None else [as_float(s[part]) for s in ss]))
        flat[part] = merged if bs is None else merged + as_float(bs[part])
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
    from otfuse_cli.merging.stats import check_fits

    check_fits(stats, ckpt, path)


def check_plans(plans, parents: Parents) -> None:
    if len(plans) != len(parents.specs):
        raise OtfuseError(f"plan file holds {len(plans)} models but {len(parents.specs)} were given")
    anchor = parents.anchor
    for k, spec in enumerate(parents.specs):
        if k == anchor and not plans[k]:  # the anchor has plans only after barycentric rounds
            continue
        for sa, sp in zip(parents.specs[anchor].spaces, spec.spaces):
            plan = plans[k].get(sa.name)
            if plan is None or plan.shape != (sp.size, sa.size):
                raise OtfuseError(f"plan file does not match these models (space {sa.name!r})")


def reads_data(options: AlignOptions, merge: MergeOptions, plan: str | None, stats: list[str] | None,
               repair: bool) -> bool:
    """Whether some step of this fusion runs the models on --data: activation alignment (not with a plan),
    a merge rule's statistics (not given as --stats files), or the repair."""
    return repair or (not plan and options.reads_data) or (MERGES[merge.merge].needs and not stats)


def member_names(parents: Parents) -> list[str]:
    """Folder names of the per-parent outputs when task heads are kept: each parent's own folder or file stem,
    numbered where two would collide."""
    names = [Path(str(c.folder or c.path)).name.removesuffix(".safetensors") or f"model{k}"
             for k, c in enumerate(parents.ckpts)]
    return [n if names.count(n) == 1 else f"{n}-{k}" for k, n in enumerate(names)]


def fuse(models: list[str], output: str, *, options: AlignOptions = AlignOptions(),
         data: DataOptions = DataOptions(), merge: MergeOptions = MergeOptions(),
         write: OutputOptions = OutputOptions(), anchor: int = 0, weights: str | None = None,
         plan: str | None = None, stats: list[str] | None = None, repair: bool = False, base: str | None = None,
         only: list[str] | None = None, command_options: dict | None = None,
         on_space: Callable[[str], None] | None = None, allow_config_mismatch: bool = False,
         check: bool = True) -> dict:
    """Fuse `models` into `output`: align onto the anchor (or reuse `plan`; options.align "none" keeps every
    parent in its own basis, the vanilla baseline), then merge by `merge.merge`, reading `stats` files (one
    per model) or computing them on `data.data`. With `base` (the parents' common pre-trained model) the rule
    merges task vectors theta_k - theta_base and the base is added back. Task heads that differ (or
    merge.heads "keep") stay each parent's own: `output` then holds one model folder per parent, the merged
    body with that parent's head and config. repair renormalises the fused units on `data.data` (REPAIR;
    BatchNorm nets: their statistics re-estimated). Parents whose config or tokenizer changes the function are
    refused unless allow_config_mismatch (the result runs with the anchor's config). only: glob patterns; the
    tensors they match are merged, every other is the anchor's own (moved with it: the basis stays one).
    check: with `data.data`, the written model and each parent are run on it and their predictions compared
    (merging/predictions.py; the result's "fit" carries the figures, a `warning:` line a collapse)."""
    deadline.start(options.time_limit)
    check_output(output, write)
    weight_numbers(weights)  # the text's form now; its count once the models are open
    rule = MERGES[merge.merge]
    if rule.task_vectors and not base:
        raise OtfuseError(f"--merge {merge.merge} merges task vectors (each parent minus its pre-trained model); "
                          "give that model with --base")
    if repair and not data.data:
        raise OtfuseError("--repair needs --data FILE with sample inputs")
    merge = merge.resolved()
    parents = open_parents(models, anchor, allow_config_mismatch, heads=merge.heads, base=base)
    if parents.heads is not None:
        if requested_layout(output) == "file":
            raise OtfuseError(f"-o {output}: the parents keep their own task heads, so the output is one model "
                              "folder per parent; give a folder path")
        if repair:
            raise OtfuseError("--repair runs one fused model; with each parent's own task head there are several")
    if repair:
        from otfuse_cli.merging.repair import check_repairable

        check_repairable(parents)
    if parents.heads is not None and merge.heads == "auto":
        report.note_line("the parents' task heads differ (label sets or names): the bodies are merged and each "
                         f"parent keeps its own head, one model folder each under {output}/ (--heads merge refuses)")
    merged_names = selected(parents, only)
    origin = open_base(base, parents, allow_config_mismatch) if base else None
    uses_data = reads_data(options, merge, plan, stats, repair)
    refuse_overlap(output, input_paths(parents.ckpts + ([origin.source.ckpt] if origin else []),
                                       [plan, *(stats or []), data.data if uses_data else None]))
    w = parse_weights(weights, len(parents.ckpts))
    layout = "folder" if parents.heads is not None else layout_of(parents.ckpts[anchor], output)
    check_shard_size(layout, write)
    checks = bool(data.data) and check and parents.heads is None  # one model to check (not one per head)
    if data.data and not (uses_data or checks):
        raise OtfuseError("--data is read by --align activations, --merge regmean/fisher (without --stats), "
                          "--repair or the check of the fused model (not with --no-check, nor where each parent "
                          "keeps its own task head); none of them is chosen here")
    data = data.for_family(parents.specs[anchor].family)
    if checks:
        from otfuse_cli.data import check_source

        check_source(data.data, data.split)
    if not plan:
        options = resolved(parents, options)  # the rounds written out: provenance records what ran
    align_record, extra = options.to_json(), {}
    if plan:
        plans, plan_meta = load_plans(plan)
        check_plan_inputs(plan_meta, parents.ckpts, parents.specs, anchor, plan)
        check_plans(plans, parents)
        # provenance describes the plan actually used, not the command line's (unused) alignment defaults
        align_record = plan_meta.get("options", {})
        extra = {"plan_sha256": sha256_file(plan), **({"data": plan_meta["data"]} if "data" in plan_meta else {})}
    else:
        check_data(options, data)
        plans = compute_plans(parents, options, data, on_space, w)
        info = data_record(options, data)  # the data read and accepted first, then hashed
        extra = {"data": info} if info else {}
    parent_statistics = parent_stats(parents, merge, data, stats)
    # the parents' predictions before anything is written: --data that does not fit them is refused first
    predicted = [predictions_of(c, data) for c in parents.ckpts] if checks and distributed.is_writer() else None
    inputs = parents.ckpts + ([origin.source.ckpt] if origin else [])
    record = provenance("fuse", {**(command_options or {}), "merge": merge.to_json(), "anchor": anchor,
                                 "weights": w, "dtype": write.dtype, "align": align_record, "plan_file": plan,
                                 "stats_files": stats, "repair": str(data.data) if repair else None,
                                 "base": base, "only": only, **extra}, inputs)
    # the collapse guard: only where parents were aligned (children of one model merged in place need none)
    fit = Fit(len(parents.ckpts), w) if any(plans) else None
    tensors = report.counted(fused_tensors(parents, plans, w, merge, write, parent_statistics, origin, data.seed,
                                           fit, merged_names, weights_route_device(data)), on_space, "merging",
                             len(fused_layout(parents.ckpts[anchor], write, _kept(parents))))
    result = {"family": parents.specs[anchor].family, "align": align_record.get("align", options.align),
              "merge": merge.merge, "anchor": anchor, "weights": w, "spaces": plan_summary(plans, parents.specs, anchor)}
    if not distributed.is_writer():  # rank 0 of a torchrun launch writes; every rank holds the same plans
        return {"output": str(output), **result}
    if parents.heads is not None:
        members = write_members(output, tensors, parents, plans, write, record)
        return {"output": str(output), "members": members, **result, **_fit_record(fit, parents)}
    planned = fused_layout(parents.ckpts[anchor], write)
    if repair:  # needs the whole fused model in memory to run it
        from otfuse_cli.merging.repair import repair_fused

        tensors, planned = repair_fused(dict(tensors), parents, plans, w, data), None
    out = write_checkpoint(output, tensors, layout=layout, source=parents.ckpts[anchor], planned=planned,
                           config_overrides=dtype_overrides(parents.ckpts[anchor], write) or None,
                           provenance=record, max_shard_size=write.max_shard_size, force=write.force,
                           card=card_for(layout, record, parents.ckpts, anchor))
    return {"output": str(out), **result, **_fit_record(fit, parents, out, predicted, data)}


def _fit_record(fit: Fit | None, parents: Parents, output: str | None = None,
                predicted: list | None = None, data: DataOptions | None = None) -> dict:
    """{"fit": summary} once every tensor is merged and the model written (and the warnings it calls for
    said): the weight-space figures where parents were aligned, and under "predictions" the fused model's
    agreement with its parents on --data where they were run on it; or nothing."""
    labels = [parents.label(k) for k in range(len(parents.ckpts))]
    summary = fit.summary(labels) if fit is not None else {}
    for line in fit_warnings(summary) if summary else []:
        report.warning_line(line)
    if predicted is not None and (checked := check_fused(output, predicted, data)) is not None:
        summary["predictions"] = checked
        for line in prediction_warnings(checked, labels):
            report.warning_line(line)
    return {"fit": summary} if summary else {}


# config.json fields that describe a parent's task head rather than its body
TASK_FIELDS = ("architectures", "id2label", "label2id", "num_labels", "problem_type", "finetuning_task")


def write_members(output: str, body: Iterator, parents: Parents, plans: list[dict[str, Plan]],
                  write: OutputOptions, record: dict) -> dict[str, str]:
    """OUTPUT/<name>/ for every parent: the merged body with that parent's own task head (moved into the
    anchor's basis and widths on its body axes), and the anchor's config and tokenizer with the parent's task
    fields. The body is merged once, streamed into the first folder and read back from there for the others;
    the whole OUTPUT appears in one step."""
    from otfuse_cli.arch import build_spec
    from otfuse_cli.checkpoint.writer import write_bundle

    names = member_names(parents)
    anchor = parents.anchor
    full = {k: build_spec(c) for k, c in enumerate(parents.ckpts)}  # the heads' body axes are in the full Specs

    def head(k: int) -> Iterator[tuple[str, torch.Tensor]]:
        mover = Transporter(full[anchor], full[k])
        for name in parents.heads[k]:
            x = parents.source(k).take(name)
            if plans[k]:
                x = mover.move(name, x, plans[k])
            yield name, x.to(output_dtype(parents.ckpts[k].dtype(name), write))

    def member(tmp: Path, k: int, tensors: Iterator) -> None:
        ckpt = parents.ckpts[k]
        own = {**record, "member": names[k], "head_of": k}
        task = {key: ckpt.config[key] for key in TASK_FIELDS if key in (ckpt.config or {})}
        write_checkpoint(tmp / names[k], itertools.chain(tensors, head(k)), layout="folder",
                         source=parents.ckpts[anchor], config_overrides={**task, **dtype_overrides(ckpt, write)},
                         provenance=own, max_shard_size=write.max_shard_size,
                         card=card_for("folder", own, parents.ckpts, k))

    def fill(tmp: Path) -> None:
        member(tmp, 0, body)
        with open_checkpoint(tmp / names[0]) as first:
            shared = [name for name in first.keys() if name not in set(parents.heads[0])]
            for k in range(1, len(parents.ckpts)):
                member(tmp, k, ((name, first.get(name)) for name in shared))

    write_bundle(output, fill, force=write.force)
    return {name: str(Path(output) / name) for name in names}
