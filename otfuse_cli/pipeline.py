"""What align, fuse and compress share: open and check the parents, pick the feature provider, compute the
plans, and decide the output's form, dtype and provenance. `align` (the plan-file command) lives here too:
it is this pipeline with nothing after it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from otfuse_cli import deadline, distributed
from otfuse_cli.alignment.engine import align_pair, refinement_sweeps
from otfuse_cli.alignment.plans import input_record, save_plans
from otfuse_cli.alignment.transport import Plan, Transporter
from otfuse_cli.alignment.weights import TensorSource, WeightFeatures
from otfuse_cli.arch.compat import check_models, head_tensors, heads_differ, label, width_differences
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
    sources: dict = field(default_factory=dict, repr=False)  # k -> TensorSource, shared by alignment and merging
    heads: list[list[str]] | None = None  # each parent's own task-head tensors when they are kept apart

    def label(self, k: int) -> str:
        return label(self.ckpts[k], k)

    def source(self, k: int) -> TensorSource:
        """One source per parent for the whole fusion: each tensor is checked for NaN/Inf once."""
        if k not in self.sources:
            self.sources[k] = TensorSource(self.ckpts[k], self.label(k))
        return self.sources[k]


def open_parents(paths: list[str], anchor: int = 0, allow_config_mismatch: bool = False,
                 heads: str = "merge", base: str | None = None) -> Parents:
    """heads: "merge" fuses the task heads with the rest; "keep" leaves each parent its own (out of the
    alignment and the merge); "auto" keeps them when the parents' heads or label names differ. base: LoRA
    adapter folders among the parents are read over it (their common pre-trained model)."""
    if len(paths) < 2:
        raise OtfuseError("fusion needs at least two models")
    if not 0 <= anchor < len(paths):
        raise OtfuseError(f"--anchor {anchor} is out of range for {len(paths)} models")
    ckpts = [open_checkpoint(p, base) for p in paths]
    keep = heads == "keep" or (heads == "auto" and heads_differ(ckpts, anchor))
    specs = check_models(ckpts, anchor, allow_config_mismatch, keep_heads=keep)
    seen: dict[Path, int] = {}
    for k, ckpt in enumerate(ckpts):  # said once the models are known to fuse: an error stays one line
        if (where := Path(ckpt.path).resolve()) in seen:
            from otfuse_cli.report import note_line

            note_line(f"model {k} and model {seen[where]} are the same checkpoint ({ckpt.path}); a model fused with "
                      "itself is itself")
        seen.setdefault(where, k)
    return Parents(ckpts, specs, anchor, heads=[head_tensors(c) for c in ckpts] if keep else None)


# ---------------------------------------------------------------- features and plans

def weights_route_device(data: DataOptions) -> torch.device:
    """Where the weights route computes (its features and costs, and the merge of every tensor). auto stays
    on the CPU until benchmarks/gpu_check.py has compared this route on a GPU: only an explicit --device
    moves it."""
    from otfuse_cli.runnable import resolve_device

    return torch.device("cpu") if data.device == "auto" else resolve_device(data.device)


def _weight_provider(anchor_spec, spec, anchor_src, parent_src, data: DataOptions, on_batch=None, sketch=None,
                     l1=True):
    """Features, cross terms and costs on --device (the tensors moved there as they are read); Sinkhorn solves
    there too, the exact solvers take each cost to the CPU (solvers.solve)."""
    from otfuse_cli.alignment.weights import on_device

    device = weights_route_device(data)
    if device.type != "cpu":
        from otfuse_cli.report import timing_line

        timing_line(f"weights route on {device}: features, cross terms, costs and Sinkhorn there; the exact "
                    "solvers (lapjvs, POT's simplex) take each cost to the CPU")
    return WeightFeatures(anchor_spec, spec, on_device(anchor_src, device), on_device(parent_src, device),
                          sketch=sketch, l1=l1)


def _activation_provider(anchor_spec, spec, anchor_src, parent_src, data: DataOptions, on_batch=None, sketch=None,
                         l1=True, covariance=False):
    from otfuse_cli.alignment.activations import ActivationFeatures  # needs runnable models and data

    return ActivationFeatures(anchor_spec, spec, anchor_src, parent_src, data, on_batch=on_batch, l1=l1,
                              covariance=covariance)


# --align choice -> provider(anchor spec, parent spec, anchor tensors, parent tensors, data options);
# "none" needs no features (compute_plans returns no plans). cca reads the activations' covariances too.
PROVIDERS: dict[str, Callable] = {"weights": _weight_provider, "activations": _activation_provider,
                                  "cca": partial(_activation_provider, covariance=True)}


def feature_provider(options: AlignOptions, data: DataOptions, anchor_spec, spec, anchor_src, parent_src,
                     on_batch=None):
    return PROVIDERS[options.align](anchor_spec, spec, anchor_src, parent_src, data, on_batch=on_batch,
                                    sketch=options.sketch, l1=options.marginals == "l1")


def check_data(options: AlignOptions, data: DataOptions) -> None:
    """For activation plans: --data is given and is a regular file (a FIFO or device would block its reader) or
    a dataset whose split exists (data.check_source)."""
    if not options.reads_data:
        return
    if not data.data:
        raise OtfuseError(f"--align {options.align} needs --data FILE with sample inputs")
    from otfuse_cli.data import check_source

    check_source(data.data, data.split)


def data_record(options: AlignOptions, data: DataOptions) -> dict | None:
    """For activation plans: describe the data file (hash, sampling) for provenance. Called once the plans are
    computed, so the data has been read and accepted first: hashing an 8 GiB sparse "jsonl" mapped all of it
    (and took most of a minute) before its reader refused the first line."""
    check_data(options, data)
    if not options.reads_data:
        return None
    from otfuse_cli.alignment.activations import data_info

    return data_info(data)


def compute_plans(parents: Parents, options: AlignOptions, data: DataOptions,
                  on_space: Callable[[str], None] | None = None,
                  weights: list[float] | None = None) -> list[dict[str, Plan]]:
    """plans[k] maps parent k onto the anchor, one Plan per space (the anchor's own entry is empty). With
    barycentric rounds (options.rounds_for), every parent's plans (the anchor's too) then map it onto the mean of
    the parents (weighted by `weights`, default equal), which keeps the anchor's basis and widths.

    on_space(name) follows each space's first solve. When it is a report.Progress (it has .task), it gets
    real totals instead: batches x models for activations, spaces x parents for the first pass, spaces x
    sweeps x parents for refinement."""
    if options.align == "none":  # vanilla merging: every parent taken in its own basis
        return [{} for _ in parents.ckpts]
    from otfuse_cli.arch.transformers import alignment_note
    from otfuse_cli.report import note_line, start, timing_line

    anchor_spec = parents.specs[parents.anchor]
    if note := alignment_note(anchor_spec.family):
        note_line(f"{anchor_spec.family}: {note}")
    if options.align == "cca":
        check_linear_spaces(parents)
    anchor_src = parents.source(parents.anchor)
    others = [k for k in range(len(parents.specs)) if k != parents.anchor]
    spaces = len(anchor_spec.spaces)
    width = {space.name: space.size for space in anchor_spec.spaces}  # shown with each space: where time goes
    tracked = hasattr(on_space, "task")
    on_batch = _batch_counter(start(on_space, "activations"), len(parents.ckpts) - 1) \
        if tracked and options.reads_data else None
    work = space_estimates(parents, options) if tracked else None  # bars and ETAs move by estimated work
    space_pass = sum(work.values()) if work else None  # one pass over one parent's spaces
    per_pass = space_pass and space_pass * len(others)
    first = start(on_space, "aligning", spaces * len(others), per_pass)
    refine = None  # created once the provider says whether it refines
    plans: list[dict[str, Plan]] = []
    timings: dict[str, float] = {}
    for k, spec in enumerate(parents.specs):
        if k == parents.anchor:
            plans.append({})
            continue
        provider = feature_provider(options, data, anchor_spec, spec, anchor_src, parents.source(k), on_batch)
        sweeps = refinement_sweeps(provider, options)
        if tracked and sweeps and refine is None:
            refine = start(on_space, "refining", spaces * sweeps * len(others), per_pass and per_pass * sweeps)
        solves = [0]

        def refined(name: str, k=k) -> None:
            solves[0] += 1
            refine.advance(detail=f"{name} ({width[name]} wide, model {k}, sweep "
                                  f"{(solves[0] - 1) // spaces + 1}/{sweeps})", work=work and work[name])

        plans.append(align_pair(anchor_spec, spec, provider, options,
                                (lambda name, k=k: first.advance(detail=f"{name} ({width[name]} wide, model {k})",
                                                                 work=work and work[name]))
                                if tracked
                                else on_space, refined if refine is not None else None, timings))
        if refine is not None and solves[0] < spaces * sweeps:  # converged early: the rest is not needed
            left = spaces * sweeps - solves[0]
            refine.advance(left, detail=f"model {k} converged", work=space_pass and space_pass * left / spaces)
    rounds = barycentric_rounds(parents, options)
    # parents that already share the anchor's basis (children of one model) would be aligned to their own mean
    # in it again: no round can move a plan, and each would write a scratch model per parent
    if rounds and not all(p.moves_nothing() for model in plans for p in model.values()):
        plans = _barycentric(parents, plans, options, data, weights, on_space, timings, rounds)
    timing_line("alignment: " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in timings.items()))
    if all(p.moves_nothing() for model in plans for p in model.values()):
        note_line("every plan is the identity: the parents share the anchor's basis (fine-tunes of one model "
                  "do); where each unit's cost to its own counterpart is the least in its column, no matching "
                  "can beat the identity and no assignment is solved")
    anchor_src.__dict__.pop("_activations", None)  # the anchor's recorded activations: not needed to merge
    return plans


def check_linear_spaces(parents: Parents) -> None:
    """--align cca maps the spaces that take a general linear map (Space.linear) and permutes the rest: refused
    where no space takes one or widths differ, said in a note where only some do."""
    from otfuse_cli.report import note_line

    anchor_spec = parents.specs[parents.anchor]
    linear = [k for k, space in enumerate(anchor_spec.spaces) if space.linear]
    if not linear:
        raise OtfuseError(f"--align cca: no space of this {anchor_spec.family} model takes a general linear map "
                          "(a norm, softmax heads or a gate acts on each unit of every one); use --align activations")
    for spec in parents.specs:
        for k in linear:
            if spec.spaces[k].size != anchor_spec.spaces[k].size:
                raise OtfuseError(f"--align cca: space {anchor_spec.spaces[k].name!r} is {spec.spaces[k].size} wide "
                                  f"in one model and {anchor_spec.spaces[k].size} in the anchor; a linear map between "
                                  "widths has no inverse (use --align activations)")
    if len(linear) < len(anchor_spec.spaces):
        why = {"residual": "norms act on each unit", "heads": "softmax attention", "ffn": "a gate multiplies units",
               "channel": "a norm acts on each unit", "hidden": "a norm acts on each unit"}
        others = sorted({f"{s.kind}: {why.get(s.kind, 'not declared to take one')}" for s in anchor_spec.spaces
                         if not s.linear})
        note_line(f"--align cca: linear maps for {len(linear)} of {len(anchor_spec.spaces)} spaces; the other "
                  f"{len(anchor_spec.spaces) - len(linear)} ({'; '.join(others)}) are permuted by the same "
                  "activations")


def space_estimates(parents: Parents, options: AlignOptions) -> dict[str, float] | None:
    """Each space's estimated work per solve (cost products + solver, GFLOP-equivalents; workplan.py) for weights
    alignment, whose costs follow from the headers; None for activations (their work is in the batches)."""
    if options.align != "weights":
        return None
    from otfuse_cli.workplan import space_work

    anchor = parents.anchor
    other = next(k for k in range(len(parents.specs)) if k != anchor)
    work = {}
    for sa, sp in zip(parents.specs[anchor].spaces, parents.specs[other].spaces):
        w = space_work(parents.ckpts[anchor], sa, sp, 0, options.sketch, options.solver)
        work[sa.name] = w["cost_gflops"] + w["solve_gflops"] + 1e-6  # never zero
    return work


def barycentric_rounds(parents: Parents, options: AlignOptions) -> int:
    """The barycentric rounds this fusion asks for (options.rounds_for its parent count). Parents keeping their
    own task heads have no one fused model to align to: none unless asked for (barycentric_plans then says
    why it cannot)."""
    return 0 if parents.heads is not None and options.rounds is None else options.rounds_for(len(parents.ckpts))


def resolved(parents: Parents, options: AlignOptions) -> AlignOptions:
    """options with the rounds written out, so provenance and plan files record what ran, not "default"."""
    return options if options.align == "none" else replace(options, rounds=barycentric_rounds(parents, options))


def _barycentric(parents: Parents, plans, options: AlignOptions, data: DataOptions, weights, on_space,
                 timings: dict, rounds: int) -> list[dict[str, Plan]]:
    from otfuse_cli.alignment.barycentre import barycentric_plans
    from otfuse_cli.report import note_line, start

    weights = weights or [1.0 / len(parents.ckpts)] * len(parents.ckpts)
    task = start(on_space, "barycentre", rounds)
    anchor_spec = parents.specs[parents.anchor]

    def provider_for(reference, k):
        return feature_provider(options, data, anchor_spec, parents.specs[k], reference, parents.source(k))

    def on_round(r: int, changed: bool) -> None:
        task.advance(rounds - r + 1 if not changed else 1,
                     detail=f"round {r}: {'plans moved' if changed else 'no plan moved'}")

    plans, history = barycentric_plans(parents, plans, weights, rounds, provider_for, options, timings,
                                       on_round)
    settled = not any(history[-1]["changed"])
    costs = " -> ".join(f"{sum(h['cost']):.4g}" for h in history)
    note_line(f"barycentre: {len(history)} round(s), "
              f"{'no plan moved in the last' if settled else 'plans still moving after the last (raise --rounds)'}; "
              f"summed matching cost by round {costs}")
    return plans


def _batch_counter(task, parents: int) -> Callable[[str, int, int], None]:
    """on_batch(detail, done, total) of each parent's activation provider (its forward passes: done of
    total) -> one task over all of them; parents not yet started are counted like the current one."""
    state = {"base": 0, "last": 0, "started": 0}

    def on_batch(detail: str, done: int, total: int) -> None:
        if done == 1:  # the next provider's first forward pass
            state["base"] += state["last"]
            state["started"] += 1
        state["last"] = total
        task.set_total(state["base"] + total * (parents - state["started"] + 1))
        task.advance(1, detail=detail)
    return on_batch


def plan_summary(plans: list[dict[str, Plan]], specs: list[Spec], anchor: int) -> list[dict]:
    rows = []
    for k, model_plans in enumerate(plans):
        for space in specs[anchor].spaces:
            if space.name in model_plans:
                rows.append({"model": k, "space": space.name, "kind": space.kind, **model_plans[space.name].stats})
    return rows


# ---------------------------------------------------------------- outputs

# The writer's temporaries and set-aside outputs are siblings named `.NAME.otfuse-tmp-<pid>-<8 hex>.safetensors`:
# 41 bytes around NAME with a 7-digit pid (Linux's largest); 48 leaves a margin.
SCRATCH_ROOM = 48


def check_output_name(output: str | Path, flag: str = "-o") -> None:
    """The output path as a name, before any work: not empty, not `.` or `..`, valid UTF-8 (safetensors and the
    JSON provenance cannot hold other bytes: an `out\xff` used to fail only after the whole run), and short
    enough for the file system, temporaries included (a 300-byte name was an ENAMETOOLONG traceback)."""
    import os

    text = os.fspath(output)
    if not isinstance(text, str) or not text.strip():
        raise OtfuseError(f"{flag} needs a path, got {text!r}")
    try:
        raw = os.fsencode(text)
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise OtfuseError(f"{flag} {ascii(text)[1:-1]}: the name is not valid UTF-8 text; choose a UTF-8 name") \
            from None
    if b"\0" in raw:
        raise OtfuseError(f"{flag} {text!r}: a path cannot hold a NUL byte")
    path = Path(text)
    if path.name in ("", ".", ".."):
        raise OtfuseError(f"{flag} {text}: give the output its own name (not the folder {text} itself)")
    where = next((p for p in (path.absolute(), *path.absolute().parents) if os.path.exists(p)), Path("/"))
    try:
        name_max = os.pathconf(where, "PC_NAME_MAX")
        path_max = os.pathconf(where, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in path.parts:
        size = len(os.fsencode(part))
        room = SCRATCH_ROOM if part == path.parts[-1] else 0
        if size + room > name_max:
            raise OtfuseError(f"{flag}: the name {part[:40]}... is {size} bytes; this file system takes names of at "
                              f"most {name_max} bytes" + (f", and the output's temporaries add {room}: use at most "
                                                          f"{name_max - room}" if room else ""))
    if len(os.fsencode(str(path.absolute()))) + SCRATCH_ROOM > path_max:
        raise OtfuseError(f"{flag}: the path is longer than this file system allows ({path_max} bytes, temporaries "
                          "included)")


def check_output(output: str | Path, write: OutputOptions, file_only: bool = False) -> None:
    """Fail before any work when the output's name cannot be written, the output exists (the writer checks
    again at the end), its path asks for a form we cannot write (file_only: plan files) or its options are
    bad."""
    check_output_name(output)
    parse_size(write.max_shard_size)
    from otfuse_cli.checkpoint.writer import recover

    recover(Path(output))  # a replace interrupted by a kill is put back before "exists" is judged
    if Path(output).exists() and not write.force:
        from otfuse_cli.checkpoint.writer import exists_message

        raise OtfuseError(exists_message(Path(output)))
    layout = requested_layout(output)  # refuses pickle suffixes before any work
    if file_only and layout != "file":
        raise OtfuseError(f"-o {output}: this output is one safetensors file; give a path ending in .safetensors")


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


def check_shard_size(layout: str, write: OutputOptions) -> None:
    """--max-shard-size only shapes folder outputs; given for a file output it would be silently ignored."""
    if layout == "file" and parse_size(write.max_shard_size) != parse_size(OutputOptions().max_shard_size):
        raise OtfuseError("--max-shard-size applies to folder outputs; this output is a single .safetensors file")


TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def requested_layout(output: str | Path) -> str:
    """The output's form from its path alone, the same for fuse, compress and align: a .safetensors suffix is
    a file, anything else (or a trailing slash) a folder. Pickle suffixes are refused: the bytes written are
    safetensors, which torch.load cannot read."""
    path = Path(output)
    if path.suffix.lower() in TORCH_SUFFIXES:
        raise OtfuseError(f"-o {output}: otfuse writes safetensors, not torch pickles; use -o "
                          f"{path.with_suffix('.safetensors')} (load it with safetensors.torch.load_file) or "
                          f"-o {path.with_suffix('')}/ for a model folder")
    is_file = path.suffix.lower() == ".safetensors" and not str(output).endswith(("/", "\\"))
    return "file" if is_file else "folder"


def layout_of(ckpt, output: str | Path) -> str:
    """The output's form (requested_layout) checked against the source's: a file becomes a folder holding
    model.safetensors (nothing is lost), and an asset-free folder becomes a file; a folder with config or
    tokenizer files would lose them in one file, so that is refused with the way to get a folder."""
    layout = requested_layout(output)
    if layout == "file" and ckpt.folder is not None:
        from otfuse_cli.checkpoint.reader import asset_files

        if assets := asset_files(ckpt.folder):
            names = ", ".join(f.name for f in assets[:3]) + (", ..." if len(assets) > 3 else "")
            raise OtfuseError(f"-o {output}: {ckpt.folder} is a model folder ({names}) that one .safetensors file "
                              f"cannot hold; give a folder path such as -o {Path(output).with_suffix('')}/")
    return layout


# ---------------------------------------------------------------- the align command and interpolation

def align(models: list[str], output: str, *, options: AlignOptions = AlignOptions(),
          data: DataOptions = DataOptions(), anchor: int = 0, force: bool = False,
          on_space: Callable[[str], None] | None = None, allow_config_mismatch: bool = False) -> dict:
    """Compute the plans mapping every model onto the anchor and write them to a plan file."""
    deadline.start(options.time_limit)
    out = Path(output)
    check_output(out, OutputOptions(force=force), file_only=True)
    parents = open_parents(models, anchor, allow_config_mismatch, heads="auto")
    refuse_overlap(out, input_paths(parents.ckpts, [data.data if options.reads_data else None]))
    if data.data and not options.reads_data:
        raise OtfuseError("--data is read by --align activations or cca; plans by weights need no data")
    data = data.for_family(parents.specs[anchor].family)
    check_data(options, data)
    options = resolved(parents, options)
    plans = compute_plans(parents, options, data, on_space)
    info = data_record(options, data)
    # every input's file hashes and spaces' fingerprint: fuse --plan checks them (check_plan_inputs)
    meta = {"anchor": anchor, "options": options.to_json(),
            "inputs": [input_record(c, s) for c, s in zip(parents.ckpts, parents.specs)],
            "spaces": parents.specs[anchor].to_json(), **({"data": info} if info else {})}
    if distributed.is_writer():  # rank 0 of a torchrun launch writes; every rank holds the same plans
        save_plans(out, plans, meta, force=force)
    return {"output": str(out), "family": parents.specs[anchor].family, "anchor": anchor,
            "spaces": plan_summary(plans, parents.specs, anchor)}


def aligned_parent(models: list[str], options: AlignOptions = AlignOptions(),
                   data: DataOptions = DataOptions(), on_space=None,
                   allow_config_mismatch: bool = False) -> tuple[dict, dict, object]:
    """(anchor state dict, parent state dict moved into the anchor's basis, anchor checkpoint): the two
    endpoints of the aligned interpolation line."""
    deadline.start(options.time_limit)
    parents = open_parents(models, 0, allow_config_mismatch)
    data = data.for_family(parents.specs[0].family)
    if differ := width_differences(parents.specs):
        raise OtfuseError(f"interpolation needs two models of the same widths; widths differ in {', '.join(differ)}")
    check_data(options, data)
    plans = compute_plans(parents, options, data, on_space)
    ends = []
    for k in (0, 1):  # with --rounds both ends are moved onto their barycentre
        mover = Transporter(parents.specs[0], parents.specs[k])
        moved = {}
        for name in parents.ckpts[k].keys():
            x = parents.ckpts[k].get(name)
            moved[name] = mover.move(name, x.float(), plans[k]).to(x.dtype) if x.is_floating_point() and plans[k] \
                else x
        ends.append(moved)
    return ends[0], ends[1], parents.ckpts[0]
