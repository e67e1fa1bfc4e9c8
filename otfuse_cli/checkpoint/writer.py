"""Write checkpoints: atomic, deterministic, sharded safetensors + index, assets copied, provenance.

We serialise safetensors ourselves (the format is a length-prefixed JSON header + raw bytes) because the
``safetensors`` library writes header metadata in hash-map order, which changes from run to run; our
files are byte-identical for identical inputs and load with ``safetensors`` and ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

import otfuse_cli
from otfuse_cli.checkpoint.reader import (
    PROVENANCE_FILE,
    SAFETENSORS_INDEX,
    ST_DTYPES,
    Checkpoint,
    asset_files,
)
from otfuse_cli.errors import OtfuseError

_TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5*10**9, '200KB', '10MiB', '123' (bytes). Case-insensitive."""
    if isinstance(text, int):
        value, unit = text, ""
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise OtfuseError(f"invalid size {text!r} (examples: 5GB, 200MB, 500KB, 1GiB, 123)")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise OtfuseError(f"invalid size {text!r}: must be positive")
    return size


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_safe(obj):
    """Options as plain JSON (paths, dtypes, tuples, enums, dataclasses -> str/list/dict)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, enum.Enum):
        return _json_safe(obj.value)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_json_safe(v) for v in obj), key=str)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _json_safe(dataclasses.asdict(obj))
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    return str(obj)


def provenance(command: str, options: dict, inputs: list[Checkpoint]) -> dict:
    """What made a checkpoint: tool version, command, options, and the sha256 of every input file."""
    ins = []
    for ck in inputs:
        base = ck.folder if ck.folder is not None else ck.path.parent
        ins.append({"path": str(ck.path),
                    "files": {f.relative_to(base).as_posix(): sha256_file(f) for f in ck.files()}})
    return {"otfuse_version": otfuse_cli.__version__, "command": command,
            "options": _json_safe(options or {}), "inputs": ins}


# ---------------------------------------------------------------- safetensors serialisation

def _prepare(name: object, t: object, seen: set[str]) -> torch.Tensor:
    if not isinstance(name, str) or not name:
        raise OtfuseError(f"invalid tensor name {name!r}")
    if name in seen:
        raise OtfuseError(f"tensor {name!r} given twice")
    if not isinstance(t, torch.Tensor):
        raise OtfuseError(f"{name!r} is not a tensor ({type(t).__name__})")
    if t.dtype not in _TORCH_TO_ST:
        raise OtfuseError(f"tensor {name!r} has a dtype safetensors cannot store: {t.dtype}")
    seen.add(name)
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    # A view into a bigger storage (a slice, a tied/shared weight) gets its own copy: the shard buffer
    # then holds exactly its bytes, not the whole parent storage. (Our serialiser has no problem
    # with shared storage itself, unlike safetensors.torch.save_file.)
    if t.storage_offset() or t.untyped_storage().nbytes() != _nbytes(t):
        t = t.clone()
    return t


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _write_safetensors(file: Path, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    # Widest dtypes first, then by name (as safetensors does): every tensor stays aligned, order is fixed.
    items = sorted(tensors, key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name, t in items:
        header[name] = {"dtype": _TORCH_TO_ST[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + _nbytes(t)]}
        offset += _nbytes(t)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)


# ---------------------------------------------------------------- atomic placement

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _place(tmp: Path, target: Path, force: bool) -> None:
    """Move the finished temp output to target; with force, the old target goes only once the new is in."""
    if not (target.exists() or target.is_symlink()):
        os.replace(tmp, target)  # replace() on a file; a fresh name for a folder
        return
    if not force:
        raise OtfuseError(f"{target} exists; use --force to overwrite")
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.otfuse-old-", dir=target.parent))
    aside = old / "old"
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)  # put the old one back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _check_target(target: Path, force: bool) -> None:
    if (target.exists() or target.is_symlink()) and not force:
        raise OtfuseError(f"{target} exists; use --force to overwrite")


# ---------------------------------------------------------------- public API

def write_checkpoint(target: str | Path, tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor], *,
                     layout: str, source: Checkpoint | None = None, config_overrides: dict | None = None,
                     provenance: dict | None = None, max_shard_size: int | str = 5 * 10**9,
                     force: bool = False) -> Path:
    """Write tensors to ``target`` atomically and return the target path.

    layout "file": one .safetensors file at target (no sharding). layout "folder": ``model.safetensors`` or
    ``model-0000i-of-0000N.safetensors`` shards + ``model.safetensors.index.json``, the source's config
    (with ``config_overrides`` applied; ignored when the source has no config.json) and tokenizer/asset
    files, and ``otfuse.json``. Tensors may come from a generator: a shard's worth is buffered at a time.
    """
    if layout not in ("file", "folder"):
        raise ValueError(f"layout must be 'file' or 'folder', not {layout!r}")
    try:
        return _write(Path(target), tensors, layout, source, config_overrides, provenance, max_shard_size, force)
    except OSError as e:  # unwritable target, disk full...: the temp output is already gone
        raise OtfuseError(f"cannot write {target}: {e.strerror or e}") from None


def _write(target: Path, tensors, layout: str, source: Checkpoint | None, config_overrides: dict | None,
           provenance: dict | None, max_shard_size: int | str, force: bool) -> Path:
    max_shard_size = parse_size(max_shard_size)
    _check_target(target, force)  # fail before doing any work
    target.parent.mkdir(parents=True, exist_ok=True)
    items = tensors.items() if isinstance(tensors, dict) else tensors
    metadata = {"format": "pt"}
    if source is not None:  # how to rebuild a bare model (architecture, activation, input shape) travels along
        metadata.update({k: v for k, v in (source.metadata or {}).items() if k.startswith("otfuse.")})
    if provenance is not None:
        metadata["otfuse"] = json.dumps(provenance, sort_keys=True, separators=(",", ":"))
    mode = 0o666 & ~_umask()

    if layout == "file":
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.otfuse-tmp-", suffix=".safetensors", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            seen: set[str] = set()
            buf = [(k, _prepare(k, v, seen)) for k, v in items]
            if not buf:
                raise OtfuseError("no tensors to write")
            _write_safetensors(tmp, buf, metadata)
            os.chmod(tmp, mode)
            _place(tmp, target, force)
        except BaseException:
            _remove(tmp)
            raise
        return target

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.otfuse-tmp-", dir=target.parent))
    try:
        shards = _write_shards(tmp, items, metadata, max_shard_size)
        for f in shards:
            os.chmod(f, mode)
        if source is not None and source.folder is not None:
            _copy_assets(source, tmp, config_overrides)
        if provenance is not None:
            (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, sort_keys=True, indent=2) + "\n",
                                               encoding="utf-8")
        os.chmod(tmp, 0o777 & ~_umask())
        _place(tmp, target, force)
    except BaseException:
        _remove(tmp)
        raise
    return target


def _write_shards(tmp: Path, items: Iterable, metadata: dict[str, str], max_shard_size: int) -> list[Path]:
    seen: set[str] = set()
    buf: list[tuple[str, torch.Tensor]] = []
    size = 0
    written: list[tuple[Path, list[tuple[str, int]]]] = []  # (file, [(name, nbytes)])

    def flush():
        nonlocal buf, size
        f = tmp / f"shard-{len(written) + 1:05d}.safetensors"  # final name needs N, known only at the end
        _write_safetensors(f, buf, metadata)
        written.append((f, [(k, _nbytes(t)) for k, t in buf]))
        buf, size = [], 0

    for name, t in items:
        t = _prepare(name, t, seen)
        if buf and size + _nbytes(t) > max_shard_size:
            flush()
        buf.append((name, t))
        size += _nbytes(t)
    if buf:
        flush()
    if not written:
        raise OtfuseError("no tensors to write")

    n = len(written)
    if n == 1:
        final = tmp / "model.safetensors"
        os.rename(written[0][0], final)
        return [final]
    weight_map: dict[str, str] = {}
    total = 0
    files = []
    for i, (f, entries) in enumerate(written, 1):
        final = tmp / f"model-{i:05d}-of-{n:05d}.safetensors"
        os.rename(f, final)
        files.append(final)
        for k, nb in entries:
            weight_map[k] = final.name
            total += nb
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return files


def _copy_assets(source: Checkpoint, tmp: Path, overrides: dict | None) -> None:
    """Copy config/tokenizer/other small files; config.json keeps its key order, overrides applied."""
    folder = source.folder
    for f in asset_files(folder):
        rel = f.relative_to(folder)
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel.as_posix() == "config.json" and overrides:
            cfg = dict(source.config or {})
            cfg.update(overrides)
            dest.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(f, dest)
