"""Outputs never touch inputs: an output path that equals, contains or lies inside any input (checkpoint
files and folders, data, plan and stats files) is refused before any work, with or without --force."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from otfuse_cli.errors import OtfuseError


def _real(path: str | Path) -> Path:
    """Absolute path with symlinks and '..' resolved (also for paths that do not exist yet)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def input_paths(ckpts: Iterable = (), files: Iterable[str | Path | None] = ()) -> list[Path]:
    """Everything a run reads: each checkpoint's path, folder and files (shards, config, tokenizer), plus
    other files (data, plans, stats)."""
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
    for given in inputs:
        src = _real(given)
        if out == src:
            raise OtfuseError(f"{what} {output} is an input ({given}); choose another path")
        if src in out.parents:
            raise OtfuseError(f"{what} {output} lies inside the input {given}; choose a path outside it")
        if out in src.parents:
            raise OtfuseError(f"{what} {output} contains the input {given}; choose another path")
