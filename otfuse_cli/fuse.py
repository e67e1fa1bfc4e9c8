"""Fusion: every parent mapped into the anchor's basis and averaged, F = sum_k w_k T_out^T W_k T_in,
streamed tensor by tensor; plus the orchestration behind `otfuse align` and `otfuse fuse`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from otfuse_cli.align.engine import AlignOptions, align_pair
from otfuse_cli.align.plans import load_plans, save_plans
from otfuse_cli.align.transport import Plan, Transporter
from otfuse_cli.align.weights import TensorSource, WeightFeatures, checked_float
from otfuse_cli.checkpoint import open_checkpoint, provenance, write_checkpoint
from otfuse_cli.errors import OtfuseError
from otfuse_cli.arch import build_spec, check_compatible
from otfuse_cli.arch.model import Spec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_dtype(dtype: str) -> None:
    if dtype != "keep" and dtype not in DTYPES:
        raise OtfuseError(f"unknown --dtype {dtype!r}; use keep, float32, float16 or bfloat16")


def output_dtype(source: torch.dtype, dtype: str) -> torch.dtype:
    """--dtype keep: the input tensor's own dtype."""
    return source if dtype == "keep" else DTYPES[dtype]


def layout_of(ckpt) -> str:
    """Outputs take the input's form: a folder stays a folder, a file stays a file."""
    return "folder" if ckpt.folder is not None else "file"


def refuse_existing(output: str | Path, force: bool) -> None:
    """Fail before any work when the output exists (the writer checks again at the end)."""
    if Path(output).exists() and not force:
        raise OtfuseError(f"{output} exists; use --force to overwrite")


def parse_weights(text: str | None, count: int) -> list[float]:
    if not text:
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise OtfuseError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if len(weights) != count or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise OtfuseError(f"--weights needs {count} non-negative numbers with a positive sum, got {text!r}")
    return [w / sum(weights) for w in weights]


def label(ckpt, k: int) -> str:
    return f"model {k} ({ckpt.path})"


def load_models(paths: list[str], anchor: int) -> tuple[list, list[Spec]]:
    if len(paths) < 2:
        raise OtfuseError("fusion needs at least two models")
    if not 0 <= anchor < len(paths):
        raise OtfuseError(f"--anchor {anchor} is out of range for {len(paths)} models")
    ckpts = [open_checkpoint(p) for p in paths]
    specs = [build_spec(c) for c in ckpts]
    shapes = [{n: tuple(c.shape(n)) for n in c.keys()} for c in ckpts]
    for k, (spec, shape) in enumerate(zip(specs, shapes)):
        if k != anchor:
            check_compatible(specs[anchor], spec, shapes[anchor], shape, label(ckpts[k], k))
    return ckpts, specs


def feature_provider(options: AlignOptions, anchor_spec, spec, anchor_src, parent_src, data_info=None, **data):
    if options.align == "weights":
        return WeightFeatures(anchor_spec, spec, anchor_src, parent_src)
    if options.align == "activations":
        from otfuse_cli.align.activations import activation_provider  # needs runnable models and data
        return activation_provider(anchor_spec, spec, anchor_src, parent_src, **data)
    raise OtfuseError(f"unknown --align {options.align!r}; use weights or activations")


def with_data_info(options: AlignOptions, data: dict) -> dict:
    if options.align != "activations":
        return {}
    if not data.get("data"):
        raise OtfuseError("--align activations needs --data FILE with sample inputs")
    from otfuse_cli.align.activations import data_info

    if not Path(data["data"]).is_file():
        raise OtfuseError(f"data file not found: {data['data']}")
    return {**data, "data_info": data_info(**data)}


def compute_plans(ckpts, specs, anchor: int, options: AlignOptions,
                  on_space: Callable[[str], None] | None = None, **data) -> list[dict[str, Plan]]:
    anchor_src = TensorSource(ckpts[anchor], label(ckpts[anchor], anchor))
    plans: list[dict[str, Plan]] = []
    for k, (ckpt, spec) in enumerate(zip(ckpts, specs)):
        if k == anchor:
            plans.append({})
            continue
        provider = feature_provider(options, specs[anchor], spec, anchor_src,
                                    TensorSource(ckpt, label(ckpt, k)), **data)
        plans.append(align_pair(specs[anchor], spec, provider, options, on_space))
    return plans


def fused_tensors(ckpts, specs, plans, anchor: int, weights: list[float],
                  dtype: str = "keep") -> Iterator[tuple[str, torch.Tensor]]:
    movers = [Transporter(specs[anchor], s) for s in specs]
    for name in ckpts[anchor].keys():
        ref = ckpts[anchor].get(name)
        if not ref.is_floating_point():  # integer buffers (BatchNorm's num_batches_tracked) stay the anchor's
            yield name, ref
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float32)
        for k, ckpt in enumerate(ckpts):
            x = checked_float(ckpt.get(name), label(ckpt, k), name)
            if k != anchor:
                x = movers[k].move(name, x, plans[k])
            if x.shape != acc.shape:
                raise OtfuseError(f"{label(ckpt, k)}: {name} has shape {tuple(x.shape)}, anchor "
                                  f"{tuple(acc.shape)}; use --method ot to fuse different widths")
            acc += weights[k] * x
        yield name, acc.to(output_dtype(ref.dtype, dtype))


def check_plans(plans, specs, anchor: int) -> None:
    if len(plans) != len(specs):
        raise OtfuseError(f"plan file holds {len(plans)} models but {len(specs)} were given")
    for k, spec in enumerate(specs):
        if k == anchor:
            continue
        for sa, sp in zip(specs[anchor].spaces, spec.spaces):
            plan = plans[k].get(sa.name)
            if plan is None or tuple(plan.coupling.shape) != (sp.size, sa.size):
                raise OtfuseError(f"plan file does not match these models (space {sa.name!r})")


def fuse_checkpoints(paths: list[str], output: str, *, anchor: int = 0, weights: str | None = None,
                     method: str = "ot", options: AlignOptions | None = None, plan_file: str | None = None,
                     dtype: str = "keep", max_shard_size: int | str = 5 * 10**9, force: bool = False,
                     command_options: dict | None = None, on_space=None, repair_bn: bool = False,
                     repair_data: str | None = None, **data) -> dict:
    options = options or AlignOptions()
    refuse_existing(output, force)
    if repair_bn and not repair_data:
        raise OtfuseError("--repair-bn needs --data FILE with sample inputs")
    if method not in ("ot", "average"):
        raise OtfuseError(f"unknown --method {method!r}; use ot or average")
    check_dtype(dtype)
    ckpts, specs = load_models(paths, anchor)
    w = parse_weights(weights, len(ckpts))
    if method == "average":
        plans, data = [{} for _ in ckpts], {}
    elif plan_file:
        plans, data = load_plans(plan_file)[0], {}
        check_plans(plans, specs, anchor)
    else:
        data = with_data_info(options, data)
        plans = compute_plans(ckpts, specs, anchor, options, on_space, **data)
    record = provenance("fuse", {**(command_options or {}), "method": method, "anchor": anchor, "weights": w,
                                 "dtype": dtype, "align": options.to_json(), "plan_file": plan_file,
                                 "repair_bn": str(repair_data) if repair_bn else None,
                                 **({"data": data["data_info"]} if data.get("data_info") else {})}, ckpts)
    tensors = fused_tensors(ckpts, specs, plans, anchor, w, dtype)
    if repair_bn:  # needs the whole fused model in memory to run it
        from otfuse_cli.repair import repair_batchnorm

        tensors = repair_batchnorm(dict(tensors), ckpts[anchor], repair_data, seed=data.get("seed", 0),
                                   activation=data.get("activation"))
    out = write_checkpoint(output, tensors, layout=layout_of(ckpts[anchor]),
                           source=ckpts[anchor], provenance=record, max_shard_size=max_shard_size, force=force)
    return {"output": str(out), "family": specs[anchor].family, "method": method, "anchor": anchor,
            "weights": w, "spaces": plan_summary(plans, specs, anchor)}


def plan_summary(plans, specs, anchor: int) -> list[dict]:
    rows = []
    for k, model_plans in enumerate(plans):
        for space in specs[anchor].spaces:
            if space.name in model_plans:
                rows.append({"model": k, "space": space.name, "kind": space.kind, **model_plans[space.name].stats})
    return rows


def align_checkpoints(paths: list[str], output: str, *, anchor: int = 0, options: AlignOptions | None = None,
                      force: bool = False, on_space=None, **data) -> dict:
    options = options or AlignOptions()
    out = Path(output)
    refuse_existing(out, force)
    ckpts, specs = load_models(paths, anchor)
    data = with_data_info(options, data)
    plans = compute_plans(ckpts, specs, anchor, options, on_space, **data)
    meta = {"anchor": anchor, "options": options.to_json(), "inputs": [str(c.path) for c in ckpts],
            "spaces": specs[anchor].to_json(), **({"data": data.get("data_info")} if data.get("data_info") else {})}
    save_plans(out, plans, meta)
    return {"output": str(out), "family": specs[anchor].family, "anchor": anchor,
            "spaces": plan_summary(plans, specs, anchor)}


def aligned_parent(paths: list[str], options: AlignOptions | None = None, **data) -> tuple[dict, dict, object]:
    """(anchor state dict, parent state dict moved into the anchor's basis, anchor checkpoint): the two
    endpoints of the aligned interpolation line."""
    options = options or AlignOptions()
    ckpts, specs = load_models(paths, 0)
    if specs[0].spaces and any(sa.size != sp.size for sa, sp in zip(specs[0].spaces, specs[1].spaces)):
        raise OtfuseError("interpolation needs two models of the same widths")
    data = with_data_info(options, data)
    plans = compute_plans(ckpts, specs, 0, options, None, **data)
    mover = Transporter(specs[0], specs[1])
    moved = {}
    for name in ckpts[1].keys():
        x = ckpts[1].get(name)
        moved[name] = mover.move(name, x.float(), plans[1]).to(x.dtype) if x.is_floating_point() else x
    return ckpts[0].state_dict(), moved, ckpts[0]
