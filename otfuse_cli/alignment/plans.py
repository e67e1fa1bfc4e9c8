"""Plan files: safetensors holding every parent's plans (a hard plan as its index vector, a soft one as its
coupling, a linear one as its map and inverse) and inner maps, spaces and options in metadata."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from otfuse_cli import hub, inputs
from otfuse_cli.alignment.transport import Plan
from otfuse_cli.checkpoint.writer import sha256_file, write_tensors
from otfuse_cli.errors import OtfuseError


def save_plans(path: str | Path, plans: list[dict[str, Plan]], meta: dict, *, force: bool = False) -> Path:
    """plans[k] maps model k onto the anchor (the anchor's own entry is empty). Written through the one
    atomic writer: refused if the file exists unless force, never half-written, loaded back first."""
    tensors = {}
    stats = {}
    for k, model_plans in enumerate(plans):
        for space, plan in model_plans.items():
            if plan.index is not None:  # a hard plan is its index vector (n integers, not n² floats)
                tensors[f"{k}/{space}/index"] = plan.index
            elif plan.maps is not None:
                tensors[f"{k}/{space}/map"], tensors[f"{k}/{space}/inverse"] = plan.maps
            else:
                tensors[f"{k}/{space}/coupling"] = plan.coupling
            for channel, perm in plan.inner.items():
                tensors[f"{k}/{space}/inner/{channel}"] = perm
            stats[f"{k}/{space}"] = plan.stats
    metadata = {"otfuse.plans": json.dumps({**meta, "models": len(plans), "stats": stats}, sort_keys=True)}
    return write_tensors(path, tensors, metadata, force=force)


def load_plans(path: str | Path) -> tuple[list[dict[str, Plan]], dict]:
    """Plans and metadata of a plan file, checked against the schema save_plans writes (OtfuseError naming
    the first thing wrong): a hand-edited or foreign file fails here, not deep inside the transport."""
    path = Path(path)
    inputs.check_input(path, "plan file", missing=f"plan file not found: {path}")  # never a FIFO or device
    if problem := inputs.safetensors_problem(path, "plan file"):
        raise OtfuseError(f"{path} is not an otfuse plan file ({problem})")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {})["otfuse.plans"]
    except (SafetensorError, KeyError, ValueError, OSError) as exc:
        raise OtfuseError(f"{path} is not an otfuse plan file ({exc.__class__.__name__})") from None
    meta = inputs.parse_json(raw, f"{path} (its otfuse.plans metadata)")  # size and nesting limited
    models, stats = _plan_meta(meta, path)
    plans: list[dict[str, Plan]] = [{} for _ in range(models)]
    inner, maps = [], {}
    for key, tensor in sorted(tensors.items()):
        m = PLAN_KEY.match(key)
        if m is None or int(m["model"]) >= models:
            raise OtfuseError(f"{path}: unexpected tensor {key!r} (expected MODEL/SPACE/coupling, "
                              f"MODEL/SPACE/index, MODEL/SPACE/map and inverse or MODEL/SPACE/inner/CHANNEL with "
                              f"MODEL < {models})")
        k, space = int(m["model"]), m["space"]
        if m["channel"] is None and space in plans[k]:
            raise OtfuseError(f"{path}: {k}/{space} has both a coupling and an index")
        if m["kind"] == "coupling":
            plans[k][space] = Plan(_coupling(tensor, key, path), stats=stats.get(f"{k}/{space}", {}))
        elif m["kind"] == "index":
            plans[k][space] = Plan(index=_index(tensor, key, path), stats=stats.get(f"{k}/{space}", {}))
        elif m["kind"] in ("map", "inverse"):
            maps.setdefault((k, space), {})[m["kind"]] = _matrix(tensor, key, path)
        else:
            inner.append((k, space, m["channel"], tensor, key))
    for (k, space), pair in maps.items():
        if set(pair) != {"map", "inverse"}:
            raise OtfuseError(f"{path}: {k}/{space} needs both a map and its inverse")
        if space in plans[k]:
            raise OtfuseError(f"{path}: {k}/{space} has both a linear map and a coupling or index")
        t, t_inv = pair["map"], pair["inverse"]
        square = t.shape[0] == t.shape[1] and t_inv.shape == t.shape
        # round-off of a product grows with the factors' sizes (row and column sums bound every entry)
        slack = 1e-9 * float(t.abs().sum(1).max() * t_inv.abs().sum(0).max()) if square else 0.0
        if not square or (t @ t_inv - torch.eye(len(t), dtype=torch.float64)).abs().max() > slack:
            raise OtfuseError(f"{path}: {k}/{space}/inverse is not the inverse of {k}/{space}/map")
        plans[k][space] = Plan(maps=(t, t_inv), stats=stats.get(f"{k}/{space}", {}))
    for k, space, channel, tensor, key in inner:  # after the couplings: each map must fit its coupling's shape
        if space not in plans[k]:
            raise OtfuseError(f"{path}: {key!r} has no plan {k}/{space}/coupling or {k}/{space}/index")
        plans[k][space].inner[channel] = _inner_map(tensor, plans[k][space].shape, key, path)
    return plans, meta


PLAN_KEY = re.compile(r"^(?P<model>\d{1,6})/(?P<space>[^/].*?)/(?P<kind>coupling|index|map|inverse|"
                      r"inner/(?P<channel>[^/]+))$")
MAX_PLAN_MODELS = 10_000  # a bound on the list built from the metadata, far above any real fusion


def _plan_meta(meta, path: Path) -> tuple[int, dict]:
    """(number of models, per-space stats) from the metadata, type-checked."""
    if not isinstance(meta, dict):
        raise OtfuseError(f"{path}: plan metadata must be a JSON object")
    models, stats = meta.get("models"), meta.get("stats", {})
    if isinstance(models, bool) or not isinstance(models, int) or not 1 <= models <= MAX_PLAN_MODELS:
        raise OtfuseError(f"{path}: plan metadata 'models' must be a positive model count, got {models!r}")
    anchor = meta.get("anchor", 0)
    if isinstance(anchor, bool) or not isinstance(anchor, int) or not 0 <= anchor < models:
        raise OtfuseError(f"{path}: plan metadata 'anchor' must be a model index below {models}, got {anchor!r}")
    if not isinstance(stats, dict) or not all(isinstance(v, dict) for v in stats.values()):
        raise OtfuseError(f"{path}: plan metadata 'stats' must map MODEL/SPACE to objects")
    return models, stats


def _coupling(tensor: torch.Tensor, key: str, path: Path) -> torch.Tensor:
    """A coupling is a 2-D matrix of finite, non-negative masses with a positive total."""
    if tensor.dim() != 2 or not tensor.is_floating_point() or 0 in tensor.shape:
        raise OtfuseError(f"{path}: {key!r} must be a non-empty 2-D float matrix, got "
                          f"{tuple(tensor.shape)} {tensor.dtype}")
    c = tensor.double()
    if not torch.isfinite(c).all() or (c < 0).any() or not c.sum() > 0:
        raise OtfuseError(f"{path}: {key!r} must hold finite, non-negative masses with a positive sum")
    return c


def _matrix(tensor: torch.Tensor, key: str, path: Path) -> torch.Tensor:
    """A linear plan's map or inverse: a non-empty square matrix of finite floats."""
    if tensor.dim() != 2 or not tensor.is_floating_point() or 0 in tensor.shape \
            or not torch.isfinite(tensor).all():
        raise OtfuseError(f"{path}: {key!r} must be a non-empty 2-D matrix of finite floats, got "
                          f"{tuple(tensor.shape)} {tensor.dtype}")
    return tensor.double()


def _index(tensor: torch.Tensor, key: str, path: Path) -> torch.Tensor:
    """A hard plan's index is a permutation of 0..n-1."""
    if tensor.dim() != 1 or tensor.is_floating_point() or tensor.dtype == torch.bool or len(tensor) == 0:
        raise OtfuseError(f"{path}: {key!r} must be a non-empty 1-D integer vector, got "
                          f"{tuple(tensor.shape)} {tensor.dtype}")
    if not torch.equal(tensor.sort().values, torch.arange(len(tensor), dtype=tensor.dtype)):
        raise OtfuseError(f"{path}: {key!r} must hold a permutation of 0..{len(tensor) - 1}")
    return tensor.long()


def _inner_map(tensor: torch.Tensor, coupling: tuple[int, int], key: str, path: Path) -> torch.Tensor:
    """An inner map is (n, m, d) integers: for each unit pair a permutation of 0..d-1."""
    if tensor.dim() != 3 or tensor.is_floating_point() or tensor.dtype == torch.bool \
            or tuple(tensor.shape[:2]) != coupling:
        raise OtfuseError(f"{path}: {key!r} must be integer maps of shape {coupling} x d, got "
                          f"{tuple(tensor.shape)} {tensor.dtype}")
    d = tensor.shape[2]
    if not torch.equal(tensor.sort(-1).values, torch.arange(d, dtype=tensor.dtype).expand_as(tensor)):
        raise OtfuseError(f"{path}: {key!r} must hold a permutation of 0..{d - 1} for every unit pair")
    return tensor.long()


# ---------------------------------------------------------------- which inputs a plan was made for

def space_fingerprint(ckpt, spec) -> list[dict]:
    """Per space: name, width and a digest of the (tensor, axis, shape) keys it moves: two checkpoints with the
    same fingerprint can take the same plan, and the first differing space can be named."""
    out = []
    for space in spec.spaces:
        keys = sorted({f"{e.tensor}[{e.axis}]{list(ckpt.shape(e.tensor)) if e.tensor in ckpt else None}"
                       for e in space.entries})
        digest = hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]
        out.append({"name": space.name, "size": space.size, "entries": digest})
    return out


def input_record(ckpt, spec) -> dict:
    """What a plan file remembers of one input: its path, the sha256 of each of its files (as provenance
    records them) and its spaces' fingerprint."""
    base = ckpt.folder if ckpt.folder is not None else ckpt.path.parent
    return {"path": str(ckpt.path), "files": {f.relative_to(base).as_posix(): sha256_file(f) for f in ckpt.files()},
            "spaces": space_fingerprint(ckpt, spec), **hub.record(ckpt)}


def check_plan_inputs(meta: dict, ckpts: list, specs: list, anchor: int, path: str | Path) -> None:
    """Refuse a plan made for other inputs, another order or another anchor, naming the model that differs.
    Fingerprints first (a clearer message for another architecture), then the file hashes."""
    recorded = meta.get("inputs")
    if not isinstance(recorded, list) or not all(isinstance(r, dict) and isinstance(r.get("files"), dict)
                                                 for r in recorded):
        raise OtfuseError(f"{path} does not record its inputs' hashes (written by an older otfuse); "
                          "recompute it with `otfuse align`")
    if len(recorded) != len(ckpts):
        raise OtfuseError(f"plan file {path} was made for {len(recorded)} models, {len(ckpts)} were given")
    if meta.get("anchor", 0) != anchor:
        raise OtfuseError(f"plan file {path} was made with --anchor {meta.get('anchor', 0)}, not --anchor {anchor}")
    current = [input_record(c, s) for c, s in zip(ckpts, specs)]
    for k, (rec, cur) in enumerate(zip(recorded, current)):
        if rec.get("files") == cur["files"]:
            continue
        name = f"model {k} ({cur['path']})"
        other = [j for j, r in enumerate(recorded) if r.get("files") == cur["files"]]
        if other:
            raise OtfuseError(f"plan file {path} was made for the models in another order: {name} is its model "
                              f"{other[0]} ({recorded[other[0]].get('path')}); give them in the plan's order")
        if rec.get("spaces") != cur["spaces"]:
            space = next((c["name"] for r, c in zip(rec.get("spaces") or [], cur["spaces"]) if r != c),
                         "the space list")
            raise OtfuseError(f"plan file {path} does not fit {name}: its layout differs in {space!r}")
        raise OtfuseError(f"plan file {path} was made for other weights: {name} differs from its "
                          f"model {k} ({rec.get('path')}); recompute the plan with `otfuse align`")
