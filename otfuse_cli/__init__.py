"""otfuse: fuse neural-network checkpoints with optimal transport.

The library API (what the `otfuse` commands call):

    import otfuse_cli as otf
    otf.fuse(["a/", "b/"], "fused/", options=otf.AlignOptions(solver="sinkhorn", reg=0.02))
    otf.fuse(["sst2/", "mnli/"], "merged/", base="bert/", merge=otf.MergeOptions(merge="ties", density=0.2))
    doc = otf.evaluate({"a": "a/", "fused": "fused/"}, "test.jsonl")

Names load on first use, so `import otfuse_cli` (and the command line's option checks) stays instant.
"""

from importlib import import_module

__version__ = "0.2.0"

_API = {
    "open_checkpoint": "otfuse_cli.checkpoint",
    "build_spec": "otfuse_cli.arch",
    "judge": "otfuse_cli.arch",
    "align": "otfuse_cli.pipeline",
    "fuse": "otfuse_cli.fusion",
    "compress": "otfuse_cli.compression",
    "evaluate": "otfuse_cli.evaluation.document",
    "AlignOptions": "otfuse_cli.options",
    "DataOptions": "otfuse_cli.options",
    "OutputOptions": "otfuse_cli.options",
    "MergeOptions": "otfuse_cli.options",
    "Plan": "otfuse_cli.alignment.transport",
    "load_plans": "otfuse_cli.alignment.plans",
    "OtfuseError": "otfuse_cli.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'otfuse_cli' has no attribute {name!r}")
    value = getattr(import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
