"""otfuse: fuse neural-network checkpoints with optimal transport."""

__version__ = "0.1.0"
