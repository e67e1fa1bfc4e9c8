"""Plan files: safetensors holding every parent's couplings and inner maps, spaces and options in metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from otfuse_cli.alignment.transport import Plan
from otfuse_cli.errors import OtfuseError


def save_plans(path: str | Path, plans: list[dict[str, Plan]], meta: dict) -> None:
    """plans[k] maps model k onto the anchor (the anchor's own entry is empty)."""
    tensors = {}
    stats = {}
    for k, model_plans in enumerate(plans):
        for space, plan in model_plans.items():
            tensors[f"{k}/{space}/coupling"] = plan.coupling.contiguous()
            for channel, perm in plan.inner.items():
                tensors[f"{k}/{space}/inner/{channel}"] = perm.contiguous()
            stats[f"{k}/{space}"] = plan.stats
    metadata = {"otfuse.plans": json.dumps({**meta, "models": len(plans), "stats": stats}, sort_keys=True)}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_plans(path: str | Path) -> tuple[list[dict[str, Plan]], dict]:
    path = Path(path)
    if not path.is_file():
        raise OtfuseError(f"plan file not found: {path}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["otfuse.plans"])
    except (SafetensorError, KeyError, ValueError, OSError) as exc:
        raise OtfuseError(f"{path} is not an otfuse plan file ({exc.__class__.__name__})") from None
    plans: list[dict[str, Plan]] = [{} for _ in range(meta["models"])]
    for key, tensor in sorted(tensors.items()):
        k, rest = key.split("/", 1)
        space, kind = rest.rsplit("/coupling", 1)[0], "coupling" if rest.endswith("/coupling") else "inner"
        if kind == "coupling":
            plans[int(k)].setdefault(space, Plan(tensor.double()))
            plans[int(k)][space].coupling = tensor.double()
            plans[int(k)][space].stats = meta["stats"].get(f"{k}/{space}", {})
        else:
            space, channel = rest.split("/inner/")
            plans[int(k)].setdefault(space, Plan(torch.zeros(0))).inner[channel] = tensor
    return plans, meta
