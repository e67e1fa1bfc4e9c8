"""What align, fuse and compress share: open and check the parents, pick the feature provider, compute the
plans, and decide the output's form, dtype and provenance. `align` (the plan-file command) lives here too:
it is this pipeline with nothing after it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from otfuse_cli.alignment.engine import align_pair
from otfuse_cli.alignment.plans import save_plans
from otfuse_cli.alignment.transport import Plan, Transporter
from otfuse_cli.alignment.weights import TensorSource, WeightFeatures
from otfuse_cli.arch.compat import check_models, label, width_differences
from otfuse_cli.arch.model import Spec
from otfuse_cli.checkpoint import open_checkpoint, parse_size
from otfuse_cli.checkpoint.guard import input_paths, refuse_overlap
from otfuse_cli.errors import OtfuseError
from otfuse_cli.options import AlignOptions, DataOptions, OutputOptions

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Parents:
    """Opened checkpoints, their Specs (checked against the anchor's) and which one is the anchor."""

    ckpts: list
    specs: list[Spec]
    anchor: int

    def label(self, k: int) -> str:
        return label(self.ckpts[k], k)

    def source(self, k: int) -> TensorSource:
        return TensorSource(self.ckpts[k], self.label(k))


def open_parents(paths: list[str], anchor: int = 0) -> Parents:
    if len(paths) < 2:
        raise OtfuseError("fusion needs at least two models")
    if not 0 <= anchor < len(paths):
        raise OtfuseError(f"--anchor {anchor} is out of range for {len(paths)} models")
    ckpts = [open_checkpoint(p) for p in paths]
    return Parents(ckpts, check_models(ckpts, anchor), anchor)


# ---------------------------------------------------------------- features and plans

def _weight_provider(anchor_spec, spec, anchor_src, parent_src, data: DataOptions):
    return WeightFeatures(anchor_spec, spec, anchor_src, parent_src)


def _activation_provider(anchor_spec, spec, anchor_src, parent_src, data: DataOptions):
    from otfuse_cli.alignment.activations import ActivationFeatures  # needs runnable models and data

    return ActivationFeatures(anchor_spec, spec, anchor_src, parent_src, data)


# --align choice -> provider(anchor spec, parent spec, anchor tensors, parent tensors, data options);
# "none" needs no features (compute_plans returns no plans)
PROVIDERS: dict[str, Callable] = {"weights": _weight_provider, "activations": _activation_provider}


def feature_provider(options: AlignOptions, data: DataOptions, anchor_spec, spec, anchor_src, parent_src):
    return PROVIDERS[options.align](anchor_spec, spec, anchor_src, parent_src, data)


def data_record(options: AlignOptions, data: DataOptions) -> dict | None:
    """For activation plans: check the data file exists and describe it (hash, sampling) for provenance."""
    if options.align != "activations":
        return None
    if not data.data:
        raise OtfuseError("--align activations needs --data FILE with sample inputs")
    if not Path(data.data).is_file():
        raise OtfuseError(f"data file not found: {data.data}")
    from otfuse_cli.alignment.activations import data_info

    return data_info(data)


def compute_plans(parents: Parents, options: AlignOptions, data: DataOptions,
                  on_space: Callable[[str], None] | None = None) -> list[dict[str, Plan]]:
    """plans[k] maps parent k onto the anchor, one Plan per space (the anchor's own entry is empty)."""
    if options.align == "none":  # vanilla merging: every parent taken in its own basis
        return [{} for _ in parents.ckpts]
    anchor_src = parents.source(parents.anchor)
    plans: list[dict[str, Plan]] = []
    for k, spec in enumerate(parents.specs):
        if k == parents.anchor:
            plans.append({})
            continue
        provider = feature_provider(options, data, parents.specs[parents.anchor], spec, anchor_src, parents.source(k))
        plans.append(align_pair(parents.specs[parents.anchor], spec, provider, options, on_space))
    return plans


def plan_summary(plans: list[dict[str, Plan]], specs: list[Spec], anchor: int) -> list[dict]:
    rows = []
    for k, model_plans in enumerate(plans):
        for space in specs[anchor].spaces:
            if space.name in model_plans:
                rows.append({"model": k, "space": space.name, "kind": space.kind, **model_plans[space.name].stats})
    return rows


# ---------------------------------------------------------------- outputs

def check_output(output: str | Path, write: OutputOptions) -> None:
    """Fail before any work when the output exists (the writer checks again at the end) or its options are bad."""
    parse_size(write.max_shard_size)
    from otfuse_cli.checkpoint.writer import recover

    recover(Path(output))  # a replace interrupted by a kill is put back before "exists" is judged
    if Path(output).exists() and not write.force:
        raise OtfuseError(f"{output} exists; use --force to overwrite")


def output_dtype(source: torch.dtype, write: OutputOptions) -> torch.dtype:
    """--dtype keep: the input tensor's own dtype."""
    return source if write.dtype == "keep" else TORCH_DTYPES[write.dtype]


def dtype_overrides(ckpt, write: OutputOptions) -> dict:
    """config.json's dtype follows --dtype, so `from_pretrained(dtype="auto")` loads what was written (the key
    the source uses: "dtype" in transformers 5, "torch_dtype" before)."""
    if write.dtype == "keep" or not ckpt.config:
        return {}
    keys = [k for k in ("dtype", "torch_dtype") if k in ckpt.config] or ["dtype"]
    return {k: write.dtype for k in keys}


def check_shard_size(ckpt, write: OutputOptions) -> None:
    """--max-shard-size only shapes folder outputs; given for a file output it would be silently ignored."""
    if ckpt.folder is None and parse_size(write.max_shard_size) != parse_size(OutputOptions().max_shard_size):
        raise OtfuseError("--max-shard-size applies to folder outputs; this output is a single .safetensors file")


def layout_of(ckpt) -> str:
    """Outputs take the input's form: a folder stays a folder, a file stays a file."""
    return "folder" if ckpt.folder is not None else "file"


# ---------------------------------------------------------------- the align command and interpolation

def align(models: list[str], output: str, *, options: AlignOptions = AlignOptions(),
          data: DataOptions = DataOptions(), anchor: int = 0, force: bool = False,
          on_space: Callable[[str], None] | None = None) -> dict:
    """Compute the plans mapping every model onto the anchor and write them to a plan file."""
    out = Path(output)
    check_output(out, OutputOptions(force=force))
    parents = open_parents(models, anchor)
    refuse_overlap(out, input_paths(parents.ckpts, [data.data if options.align == "activations" else None]))
    if data.data and options.align != "activations":
        raise OtfuseError("--data is read by --align activations; plans by weights need no data")
    data = data.for_family(parents.specs[anchor].family)
    info = data_record(options, data)
    plans = compute_plans(parents, options, data, on_space)
    meta = {"anchor": anchor, "options": options.to_json(), "inputs": [str(c.path) for c in parents.ckpts],
            "spaces": parents.specs[anchor].to_json(), **({"data": info} if info else {})}
    save_plans(out, plans, meta, force=force)
    return {"output": str(out), "family": parents.specs[anchor].family, "anchor": anchor,
            "spaces": plan_summary(plans, parents.specs, anchor)}


def aligned_parent(models: list[str], options: AlignOptions = AlignOptions(),
                   data: DataOptions = DataOptions()) -> tuple[dict, dict, object]:
    """(anchor state dict, parent state dict moved into the anchor's basis, anchor checkpoint): the two
    endpoints of the aligned interpolation line."""
    parents = open_parents(models, 0)
    data = data.for_family(parents.specs[0].family)
    if differ := width_differences(parents.specs):
        raise OtfuseError(f"interpolation needs two models of the same widths; widths differ in {', '.join(differ)}")
    data_record(options, data)
    plans = compute_plans(parents, options, data)
    mover = Transporter(parents.specs[0], parents.specs[1])
    moved = {}
    for name in parents.ckpts[1].keys():
        x = parents.ckpts[1].get(name)
        moved[name] = mover.move(name, x.float(), plans[1]).to(x.dtype) if x.is_floating_point() else x
    return parents.ckpts[0].state_dict(), moved, parents.ckpts[0]
