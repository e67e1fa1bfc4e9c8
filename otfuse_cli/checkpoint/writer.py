"""Write checkpoints: atomic, deterministic, sharded safetensors + index, assets copied, provenance.

We serialise safetensors ourselves (the format is a length-prefixed JSON header + raw bytes) because the
``safetensors`` library writes header metadata in hash-map order, which changes from run to run; our
files are byte-identical for identical inputs and load with ``safetensors`` and ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import errno
import functools
import hashlib
import json
import math
import mmap
import os
import re
import secrets
import shutil
import struct
import sys
import warnings

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: staleness falls back to the pid
    fcntl = None
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open

import otfuse_cli
from otfuse_cli import hub, interrupts
from otfuse_cli.checkpoint.reader import (
    PROVENANCE_FILE,
    SAFETENSORS_INDEX,
    ST_DTYPES,
    Checkpoint,
    asset_files,
    open_checkpoint,
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


_HASHES: dict[tuple, str] = {}


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, computed once per run: provenance, plan checks and stats checks all ask for the same
    multi-GB weight files (keyed by identity, size and mtime, so a rewritten file is hashed again)."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if st.st_size:  # hashed through a memory map: no copy into a read buffer (a quarter less CPU)
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, memoryview(m) as view:
                    for start in range(0, len(view), 64 << 20):
                        h.update(view[start:start + (64 << 20)])
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


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
    ins = []  # hashed one file at a time: threads side by side cost a 7B pair 30 more CPU-s and no wall time
    # (its 24 GB do not fit the page cache, so the disk sets the pace)
    for ck in inputs:
        base = ck.folder if ck.folder is not None else ck.path.parent
        ins.append({"path": str(ck.path),
                    "files": {f.relative_to(base).as_posix(): sha256_file(f) for f in ck.files()},
                    **hub.record(ck)})  # a model id: the id and its commit, not the cache's path
    return {"otfuse_version": otfuse_cli.__version__, "command": command,
            "options": _json_safe(options or {}), "inputs": ins}


# ---------------------------------------------------------------- safetensors serialisation

def _prepare(name: object, t: object, seen: set[str], own: bool = True) -> torch.Tensor:
    interrupts.check()  # each tensor written is a unit of work
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
    if not own:  # written at once and dropped: a view costs nothing
        return t
    # A view into a bigger storage (a slice, a tied/shared weight) gets its own copy: the shard buffer
    # then holds exactly its bytes, not the whole parent storage. (Our serialiser has no problem
    # with shared storage itself, unlike safetensors.torch.save_file.)
    if t.storage_offset() or t.untyped_storage().nbytes() != _nbytes(t):
        t = t.clone()
    return t


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _layout(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
    """A safetensors file's header bytes and each tensor's byte offset in its data section. Widest dtypes
    first, then by name (as safetensors does): every tensor stays aligned and the order is fixed."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offsets, offset = {}, 0
    for name, dtype, shape in sorted(entries, key=lambda e: (-e[1].itemsize, e[0])):
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offsets[name] = offset
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offsets


def _write_safetensors(file: Path, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    with _SafetensorsFile(file, [(k, t.dtype, tuple(t.shape)) for k, t in tensors], metadata) as f:
        for name, t in tensors:
            f.put(name, t)


class _SafetensorsFile:
    """One safetensors file whose header is written first, from the planned names, dtypes and shapes; each
    tensor's bytes then go straight to their place as it arrives, in any order, so no shard is buffered."""

    def __init__(self, file: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict):
        head, self.offsets = _layout(entries, metadata)
        self.planned = {name: (dtype, tuple(shape)) for name, dtype, shape in entries}
        self.file, self.base, self.fd = file, len(head), os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.missing = set(self.planned)
        self._pwrite(head, 0)

    def put(self, name: str, t: torch.Tensor) -> None:
        if self.planned.get(name) != (t.dtype, tuple(t.shape)):
            raise ValueError(f"{name}: {t.dtype} {tuple(t.shape)} written where {self.planned.get(name)} was planned")
        self.missing.remove(name)
        if t.numel():
            self._pwrite(t.contiguous().reshape(-1).view(torch.uint8).numpy().data, self.base + self.offsets[name])

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:  # a regular file takes it all at once unless a signal interrupts
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc) -> None:
        os.close(self.fd)
        if kind is None and self.missing:
            raise ValueError(f"{self.file.name}: {len(self.missing)} planned tensors never came, e.g. "
                             f"{min(self.missing)}")


# ---------------------------------------------------------------- atomic placement
#
# Every output is written to a temporary sibling `.NAME.otfuse-tmp-<pid>-*`, loaded back, then moved to NAME
# in one step. A replace (--force) swaps the two names atomically where the OS can (Linux renameat2
# RENAME_EXCHANGE); elsewhere the old output is first set aside as `.NAME.otfuse-old-<pid>-*`. The writer holds
# an flock on each of its scratch entries for as long as it lives, so a later run tells leftovers of a dead
# process (SIGKILL, power loss) from a live writer's files even when that writer runs in another container
# sharing the volume, where its pid means nothing. Only on a file system without locks does the pid decide.

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
# what follows `.NAME.` in a temporary's name: kind, owner pid, random part, optional suffix
_SCRATCH = re.compile(r"otfuse-(?P<kind>tmp|old)-(?P<pid>\d+)-[a-z0-9_]+(\.[a-z0-9]+)?")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _exists_message(target: Path) -> str:
    return f"{target} exists; use --force to overwrite"


def exists_message(target: Path) -> str:
    """For a command's output path, checked before any work: a model that otfuse did not write there is more
    likely a swapped argument (a parent) than an old output to replace, so say that instead of offering
    --force (which would overwrite it)."""
    try:
        with open_checkpoint(target) as ckpt:
            if (ckpt.folder is not None and (ckpt.folder / PROVENANCE_FILE).is_file()) or \
                    {"otfuse", "otfuse.plans"} & set(ckpt.metadata or {}):  # provenance, or a plan file
                return _exists_message(target)  # an earlier output of ours
    except (OtfuseError, OSError):
        return _exists_message(target)
    return f"{target} exists and is a model otfuse did not write; were the arguments swapped? Give a new output path"


def _scratch_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.otfuse-{kind}-{os.getpid()}-"


@functools.lru_cache(maxsize=1)
def _libc_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.5
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2). False where the OS or the file system lacks it, so the caller falls back."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _alive(pid: int) -> bool:
    if pid <= 0 or os.name == "nt":  # os.kill(pid, 0) would signal a group / terminate on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to another user
        return True
    return True


def _open_entry(path: Path) -> int:
    """A read-only descriptor of a scratch entry, file or folder (flock needs one; a folder opens O_DIRECTORY)."""
    return os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and not path.is_symlink() else 0))


def _hold(path: Path) -> int | None:
    """An open descriptor of path holding an exclusive flock (released when it is closed or the process dies);
    None where the file system or OS has no locks."""
    if fcntl is None:
        return None
    fd = _open_entry(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while a recover() probing this entry holds it
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return None
        raise
    return fd


def _still_named(fd: int | None, path: Path) -> bool:
    """The locked entry is still the one at path (a recover() did not remove it before the lock was taken)."""
    if fd is None:
        return True
    try:
        here, held = os.lstat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


@contextlib.contextmanager
def _probe(entry: Path, pid: int):
    """Yields whether entry is a dead writer's leftover; while the caller acts on a yes, the probe's shared
    lock keeps a writer that is just creating an entry of that name from taking it (it then picks a new name)."""
    if fcntl is None:
        yield not _alive(pid)
        return
    fd = None
    try:
        fd = _open_entry(entry)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        stale = True
    except (BlockingIOError, FileNotFoundError):  # a live writer holds it, wherever it runs; or gone meanwhile
        stale = False
    except OSError:  # no locks here, or not ours to open: the pid decides
        stale = not _alive(pid)
    try:
        yield stale
    finally:
        if fd is not None:
            os.close(fd)


def recover(target: str | Path) -> None:
    """Tidy what dead processes left next to target: their temporaries are removed, and an old output that
    a replace had set aside when it was killed comes back to target if target is missing."""
    target = Path(target)
    prefix = f".{target.name}."
    try:
        names = sorted(n for n in os.listdir(target.parent) if n.startswith(prefix))
    except OSError:  # no parent folder yet: nothing to tidy
        return
    for name in names:
        m = _SCRATCH.fullmatch(name[len(prefix):])
        if m is None:
            continue
        entry = target.parent / name
        with _probe(entry, int(m["pid"])) as stale:
            if not stale:
                continue
            if m["kind"] == "old" and not _exists(target):
                os.rename(entry, target)
            else:
                _remove(entry)


def _check_target(target: Path, force: bool) -> None:
    if _exists(target) and not force:
        raise OtfuseError(_exists_message(target))


@contextlib.contextmanager
def _temporary(target: Path, folder: bool, suffix: str = ""):
    """A pid-tagged temporary file or folder next to target; removed if anything fails before it is placed."""
    # The name is chosen before the entry exists, so an interrupt at any point, even right after it is
    # created, finds it below. (An entry already there with our pid and this random part could only be a dead
    # process's leftover.)
    lock = None
    try:
        while True:
            tmp = target.parent / (_scratch_prefix(target, "tmp") + secrets.token_hex(4) + suffix)
            if folder:
                os.mkdir(tmp, 0o700)
            else:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            lock = _hold(tmp)
            if _still_named(lock, tmp):
                break
            os.close(lock)  # another run's recover() took it for a leftover before the lock: a new name
            lock = None
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _place(tmp: Path, target: Path, force: bool) -> None:
    """Move the finished temporary to target. A replace never leaves target missing or half-written."""
    interrupts.check()  # the last moment a pending interrupt can still leave nothing behind
    if not _exists(target):
        try:  # NOREPLACE: a target that appeared meanwhile (a concurrent run) is not clobbered
            if not _renameat2(tmp, target, _RENAME_NOREPLACE):
                os.rename(tmp, target)
        except FileExistsError:
            raise OtfuseError(_exists_message(target)) from None
        return
    if not force:
        raise OtfuseError(_exists_message(target))
    if not tmp.is_dir() and not target.is_dir():
        os.replace(tmp, target)  # a file replacing a file: atomic everywhere
    elif _renameat2(tmp, target, _RENAME_EXCHANGE):
        _remove(tmp)  # now holds the old output; if killed here, the next run removes it as stale
    else:
        _keep_then_swap(tmp, target)


def _keep_then_swap(tmp: Path, target: Path) -> None:
    """Without an atomic exchange: set the old output aside, move the new one in, drop the old. A process
    killed between the two renames leaves `.NAME.otfuse-old-<pid>-*`, which recover() puts back."""
    old = target.with_name(_scratch_prefix(target, "old") + secrets.token_hex(4))
    lock = _hold(target)  # moves with it: while this run lives, nobody takes the set-aside output for a leftover
    try:
        os.rename(target, old)  # fails as a whole (e.g. EBUSY on a mount point): nothing is left behind
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        _remove(old)
    finally:
        if lock is not None:
            os.close(lock)


def _load_back(tmp: Path, target: Path, count: int) -> None:
    """Open the written checkpoint as a reader would (every safetensors header, the index, config.json also
    with transformers' AutoConfig; no tensor data), so an output its own loader would refuse is never
    published."""
    try:
        with open_checkpoint(tmp) as ckpt:  # closed again: no memory map outlives the check
            if len(ckpt) != count:
                raise OtfuseError(f"it holds {len(ckpt)} tensors, {count} were written")
            if ckpt.folder is not None and "model_type" in (ckpt.config or {}):
                _check_hf_config(tmp)
    except OtfuseError as e:
        raise _unloadable(tmp, target, str(e)) from None


def _load_back_tensors(tmp: Path, target: Path, count: int) -> None:
    """A plain safetensors file (plans): its header parses and lists every tensor written."""
    try:
        with safe_open(str(tmp), framework="pt") as f:
            found = len(list(f.keys()))
    except Exception as e:  # SafetensorError: the header does not parse
        raise _unloadable(tmp, target, f"not a valid safetensors file ({e})") from None
    if found != count:
        raise _unloadable(tmp, target, f"it holds {found} tensors, {count} were written")


def _unloadable(tmp: Path, target: Path, reason: str) -> OtfuseError:
    reason = reason.replace(str(tmp), target.name)  # the user knows the output's name, not the temporary's
    return OtfuseError(f"the output would not load, nothing written: {reason}")


def _check_hf_config(folder: Path) -> None:
    # Only configs that name a model_type: without one, AutoConfig guesses from the folder name.
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warnings would break the one-line error contract
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # ValueError, TypeError, KeyError...: transformers would refuse it the same way
        raise OtfuseError(f"config.json: {' '.join(str(e).split())}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


# ---------------------------------------------------------------- public API

def write_file(target: str | Path, write: Callable[[Path], None], *, force: bool = False,
               check: Callable[[Path], None] | None = None, suffix: str = "") -> Path:
    """Write one file atomically under the --force rule: ``write(tmp)`` fills a temporary sibling,
    ``check(tmp)`` may refuse it (OtfuseError), then it takes target's place in one step."""
    target = Path(target)
    try:
        recover(target)
        if target.is_dir():
            raise OtfuseError(f"{target} is a folder; give a file name")
        _check_target(target, force)
        if not target.parent.is_dir():
            raise OtfuseError(f"cannot write {target}: {target.parent} is not an existing folder")
        with _temporary(target, folder=False, suffix=suffix) as tmp:
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            if check is not None:
                check(tmp)
            _place(tmp, target, force)
    except OSError as e:  # unwritable folder, disk full...: the temporary is already gone
        raise OtfuseError(f"cannot write {target}: {e.strerror or e}") from None
    return target


def write_bundle(target: str | Path, fill: Callable[[Path], None], *, force: bool = False) -> Path:
    """A folder of several outputs (one model per parent, each written by write_checkpoint inside it),
    published in one step under the --force rule: fill(tmp) writes them into a temporary sibling folder."""
    target = Path(target)
    try:
        recover(target)
        _check_target(target, force)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _temporary(target, folder=True) as tmp:
            fill(tmp)
            os.chmod(tmp, 0o777 & ~_umask())
            _place(tmp, target, force)
    except OSError as e:
        raise OtfuseError(f"cannot write {target}: {e.strerror or e}") from None
    return target


def write_tensors(target: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                  *, force: bool = False) -> Path:
    """One deterministic .safetensors file with the given header metadata (plan files), written atomically."""
    seen: set[str] = set()
    items = [(k, _prepare(k, v, seen)) for k, v in tensors.items()]  # none is fine: metadata only
    return write_file(target, lambda tmp: _write_safetensors(tmp, items, dict(metadata or {})), force=force,
                      check=lambda tmp: _load_back_tensors(tmp, Path(target), len(items)), suffix=".safetensors")


def write_checkpoint(target: str | Path, tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor], *,
                     layout: str, source: Checkpoint | None = None, config_overrides: dict | None = None,
                     provenance: dict | None = None, max_shard_size: int | str = 5 * 10**9,
                     force: bool = False, card: str | None = None, planned: list | None = None) -> Path:
    """Write tensors to ``target`` atomically and return the target path.

    layout "file": one .safetensors file at target (no sharding). layout "folder": ``model.safetensors`` or
    ``model-0000i-of-0000N.safetensors`` shards + ``model.safetensors.index.json``, the source's config
    (with ``config_overrides`` applied; ignored when the source has no config.json) and tokenizer/asset
    files, and ``otfuse.json``; ``card`` (folder only) becomes README.md in place of the source's. Tensors may
    come from a generator: a shard's worth is buffered at a time, or nothing at all when ``planned`` lists
    every tensor's (name, dtype, shape) beforehand (each is then written as it comes; the files are the same).
    The output is loaded back (headers, index, config) before it is published.
    """
    if layout not in ("file", "folder"):
        raise ValueError(f"layout must be 'file' or 'folder', not {layout!r}")
    try:
        return _write(Path(target), tensors, layout, source, config_overrides, provenance, max_shard_size, force,
                      card, planned)
    except OSError as e:  # unwritable target, disk full...: the temp output is already gone
        raise OtfuseError(f"cannot write {target}: {e.strerror or e}") from None


def _write(target: Path, tensors, layout: str, source: Checkpoint | None, config_overrides: dict | None,
           provenance: dict | None, max_shard_size: int | str, force: bool, card: str | None = None,
           planned: list | None = None) -> Path:
    max_shard_size = parse_size(max_shard_size)
    recover(target)
    _check_target(target, force)  # fail before doing any work
    target.parent.mkdir(parents=True, exist_ok=True)
    items = tensors.items() if isinstance(tensors, dict) else tensors
    metadata = {"format": "pt"}
    if source is not None:  # how to rebuild a bare model (architecture, activation, input shape) travels along
        metadata.update({k: v for k, v in (source.metadata or {}).items() if k.startswith("otfuse.")})
    if provenance is not None:
        metadata["otfuse"] = json.dumps(provenance, sort_keys=True, separators=(",", ":"))
    seen: set[str] = set()

    if layout == "file" and planned is not None:
        return write_file(target, lambda tmp: _write_planned_shards(tmp, items, metadata, None, seen, planned, tmp),
                          force=force, check=lambda tmp: _load_back(tmp, target, len(seen)), suffix=".safetensors")
    if layout == "file":
        buf = [(k, _prepare(k, v, seen)) for k, v in items]
        if not buf:
            raise OtfuseError("no tensors to write")
        return write_file(target, lambda tmp: _write_safetensors(tmp, buf, metadata), force=force,
                          check=lambda tmp: _load_back(tmp, target, len(buf)), suffix=".safetensors")

    with _temporary(target, folder=True) as tmp:
        shards = _write_shards(tmp, items, metadata, max_shard_size, seen, planned)
        for f in shards:
            os.chmod(f, 0o666 & ~_umask())
        if source is not None and source.folder is not None:
            _copy_assets(source, tmp, config_overrides)
        if card is not None:  # the output's own card replaces the copied one (otfuse_cli.card quotes that)
            (tmp / "README.md").write_text(card, encoding="utf-8")
        if provenance is not None:
            (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, sort_keys=True, indent=2) + "\n",
                                               encoding="utf-8")
        os.chmod(tmp, 0o777 & ~_umask())
        _load_back(tmp, target, len(seen))
        _place(tmp, target, force)
    return target


def _write_shards(tmp: Path, items: Iterable, metadata: dict[str, str], max_shard_size: int, seen: set[str],
                  planned: list | None = None) -> list[Path]:
    if planned is not None:
        return _write_planned_shards(tmp, items, metadata, max_shard_size, seen, planned)
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
        if _starts_shard(bool(buf), size, _nbytes(t), max_shard_size):
            flush()
        buf.append((name, t))
        size += _nbytes(t)
    if buf:
        flush()
    if not written:
        raise OtfuseError("no tensors to write")
    files = [tmp / name for name in _shard_names(len(written))]
    for (f, _), final in zip(written, files):
        os.rename(f, final)
    _write_index(tmp, files, [entries for _, entries in written])
    return files


def _write_planned_shards(tmp: Path, items: Iterable, metadata: dict[str, str], max_shard_size: int | None,
                          seen: set[str], planned: list[tuple[str, torch.dtype, tuple[int, ...]]],
                          single: Path | None = None) -> list[Path]:
    """Shards laid out from the planned (name, dtype, shape) list before any tensor exists, by the same rule as
    the buffered path (byte-identical files); each tensor is written to its shard as it comes and dropped.
    max_shard_size None: one file, `single`."""
    groups: list[list] = []
    size = 0
    for entry in planned:
        nbytes = math.prod(entry[2]) * entry[1].itemsize
        if not groups or _starts_shard(bool(groups[-1]), size, nbytes, max_shard_size):
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += nbytes
    if not planned:
        raise OtfuseError("no tensors to write")
    files = [single] if single is not None else [tmp / name for name in _shard_names(len(groups))]
    with contextlib.ExitStack() as stack:
        where = {}
        for f, group in zip(files, groups):
            out = stack.enter_context(_SafetensorsFile(f, group, metadata))
            where.update({name: out for name, _, _ in group})
        for name, t in items:
            t = _prepare(name, t, seen, own=False)
            if name not in where:
                raise ValueError(f"{name} was not planned")
            where[name].put(name, t)
            del t  # freed before the next one is made
    if single is not None:
        return files
    _write_index(tmp, files, [[(name, math.prod(shape) * dtype.itemsize) for name, dtype, shape in group]
                              for group in groups])
    return files


def _starts_shard(filled: bool, size: int, nbytes: int, max_shard_size: int | None) -> bool:
    """The rule both shard writers follow: a tensor that would take a shard holding something (size bytes)
    past the limit starts the next shard; a tensor larger than the limit gets a shard of its own."""
    return filled and max_shard_size is not None and size + nbytes > max_shard_size


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _write_index(tmp: Path, files: list[Path], entries: list[list[tuple[str, int]]]) -> None:
    """model.safetensors.index.json for more than one shard: which file holds each tensor, and the total size."""
    if len(files) == 1:
        return
    weight_map = {name: f.name for f, group in zip(files, entries) for name, _ in group}
    total = sum(nbytes for group in entries for _, nbytes in group)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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
