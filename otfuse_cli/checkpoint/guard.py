"""Outputs never touch inputs: an output path that equals, contains or lies inside any input (checkpoint
files and folders, shards and index, data, plan and stats files) is refused before any work, with or
without --force.

Paths are compared twice: by name with symlinks and '..' resolved, and by file identity (device, inode) for
what exists, which also catches bind mounts, hard links and case-insensitive file systems.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from otfuse_cli.errors import OtfuseError


def _real(path: str | Path) -> Path:
    """Absolute path with symlinks and '..' resolved (also for paths that do not exist yet)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _ancestor_identities(path: Path) -> set[tuple[int, int]]:
    return {i for i in map(_identity, path.parents) if i is not None}


def input_paths(ckpts: Iterable = (), files: Iterable[str | Path | None] = ()) -> list[Path]:
    """Everything a run reads: each checkpoint's path, folder and files (shards, index, config, tokenizer),
    plus other files (data, plans, stats)."""
    paths: list[Path] = []
    for ckpt in ckpts:
        paths.append(Path(ckpt.path))
        if ckpt.folder is not None:
            paths.append(Path(ckpt.folder))
        paths.extend(Path(f) for f in ckpt.files())
    paths.extend(Path(f) for f in files if f)
    return paths


def refuse_overlap(output: str | Path, inputs: Iterable[str | Path], what: str = "output") -> None:
    out = _real(output)
    out_id, out_above = _identity(out), _ancestor_identities(out)
    for given in inputs:
        src = _real(given)
        src_id = _identity(src)
        if out == src or (src_id is not None and src_id == out_id):
            raise OtfuseError(f"{what} {output} is an input ({given}); choose another path")
        if src in out.parents or (src_id is not None and src_id in out_above):
            raise OtfuseError(f"{what} {output} lies inside the input {given}; choose a path outside it")
        if out in src.parents or (out_id is not None and out_id in _ancestor_identities(src)):
            raise OtfuseError(f"{what} {output} contains the input {given}; choose another path")
