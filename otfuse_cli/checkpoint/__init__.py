"""Checkpoint reading (lazy, any supported layout, LoRA adapters merged on read) and writing (atomic, sharded,
deterministic)."""

from otfuse_cli.checkpoint.adapter import AdapterCheckpoint, open_adapter
from otfuse_cli.checkpoint.reader import Checkpoint, open_checkpoint
from otfuse_cli.checkpoint.writer import parse_size, provenance, sha256_file, write_checkpoint

__all__ = ["AdapterCheckpoint", "Checkpoint", "open_adapter", "open_checkpoint", "parse_size", "provenance",
           "sha256_file", "write_checkpoint"]
