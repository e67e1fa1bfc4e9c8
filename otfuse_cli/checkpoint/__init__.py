"""Checkpoint reading (lazy, any supported layout) and writing (atomic, sharded, deterministic)."""

from otfuse_cli.checkpoint.reader import Checkpoint, open_checkpoint
from otfuse_cli.checkpoint.writer import parse_size, provenance, sha256_file, write_checkpoint

__all__ = ["Checkpoint", "open_checkpoint", "parse_size", "provenance", "sha256_file", "write_checkpoint"]
