"""Summaries of checkpoints and layout comparison between them (library code: returns dicts, prints nothing)."""

from __future__ import annotations

from collections import Counter

from otfuse_cli import hub
from otfuse_cli.checkpoint import Checkpoint


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_type(ckpt: Checkpoint) -> str:
    """config.json's model_type, else the spec family detector (optional room, may fail), else 'unknown'."""
    if ckpt.config and ckpt.config.get("model_type"):
        return str(ckpt.config["model_type"])
    try:
        from otfuse_cli.arch import detect_family

        family = detect_family(ckpt)
    except Exception:  # ImportError, or the detector does not recognise this checkpoint
        return "unknown"
    if family is None:
        return "unknown"
    return family if isinstance(family, str) else str(getattr(family, "name", family))


def summarize(ckpt: Checkpoint) -> dict:
    keys = ckpt.keys()
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "model_type": model_type(ckpt),
        "architectures": (ckpt.config or {}).get("architectures"),
        "num_parameters": ckpt.num_parameters(),
        "dtypes": dict(sorted(Counter(dtype_name(ckpt.dtype(k)) for k in keys).items())),
        "size_bytes": ckpt.size_on_disk(),
        "num_tensors": len(keys),
        "tensors": [{"name": k, "shape": list(ckpt.shape(k)), "dtype": dtype_name(ckpt.dtype(k))} for k in keys],
        **hub.record(ckpt),  # a Hugging Face model id: the id as given, model_id and the snapshot's commit
    }


def compare(ckpts: list[Checkpoint], allow_config_mismatch: bool = False) -> dict:
    """Compare checkpoints against model 0.

    compatible / heterogeneous / verdict / reason come from the one judgement fuse uses
    (otfuse_cli.arch.compat.judge); the name, shape and dtype differences are listed for information only.
    """
    from otfuse_cli.arch.compat import judge

    base = set(ckpts[0].keys()) if ckpts else set()
    missing: dict[int, list[str]] = {}
    extra: dict[int, list[str]] = {}
    for i, ck in enumerate(ckpts[1:], 1):
        names = set(ck.keys())
        if base - names:
            missing[i] = sorted(base - names)
        if names - base:
            extra[i] = sorted(names - base)
    common = sorted(set.intersection(*(set(c.keys()) for c in ckpts))) if ckpts else []
    shape_mismatch, rank_mismatch, dtype_mismatch = [], [], []
    for name in common:
        shapes = [list(c.shape(name)) for c in ckpts]
        if any(s != shapes[0] for s in shapes):
            entry = {"name": name, "shapes": shapes}
            shape_mismatch.append(entry)
            if any(len(s) != len(shapes[0]) for s in shapes):
                rank_mismatch.append(entry)
        dtypes = [dtype_name(c.dtype(name)) for c in ckpts]
        if any(d != dtypes[0] for d in dtypes):
            dtype_mismatch.append({"name": name, "dtypes": dtypes})  # informational: math runs in float32
    verdict = judge(ckpts, allow_config_mismatch)
    return {
        "compatible": verdict["compatible"],
        "heterogeneous": verdict["heterogeneous"],
        "missing": missing,
        "extra": extra,
        "shape_mismatch": shape_mismatch,
        "rank_mismatch": [e["name"] for e in rank_mismatch],
        "dtype_mismatch": dtype_mismatch,
        "verdict": verdict["verdict"],
        "reason": verdict["reason"],
    }
