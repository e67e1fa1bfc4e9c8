"""Spec detection: `model_type` from config.json for Hugging Face folders, names and shapes for bare
state dicts. Families only declare axes; one engine aligns them all."""

from __future__ import annotations

from typing import Callable

from otfuse_cli.errors import OtfuseError
from otfuse_cli.arch.model import Entry, Space, Spec, check_compatible, validate
from otfuse_cli.arch.resnet import is_resnet, resnet_spec
from otfuse_cli.arch.sequential import sequential_spec

# model_type -> builder(config, shapes) -> Spec. Transformer families add themselves in transformers.py.
HF_FAMILIES: dict[str, Callable[[dict, dict], Spec]] = {}

__all__ = ["Entry", "Space", "Spec", "build_spec", "detect_family", "validate", "check_compatible", "HF_FAMILIES"]


def _register_transformers() -> None:
    from otfuse_cli.arch import transformers  # noqa: F401  (fills HF_FAMILIES)


def shapes_of(ckpt) -> dict[str, tuple[int, ...]]:
    return {name: tuple(ckpt.shape(name)) for name in ckpt.keys()}


def build_spec(ckpt) -> Spec:
    shapes = shapes_of(ckpt)
    config = getattr(ckpt, "config", None)
    if config and config.get("model_type"):
        try:
            _register_transformers()
        except ImportError:
            pass
        model_type = config["model_type"]
        if model_type not in HF_FAMILIES:
            raise OtfuseError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(HF_FAMILIES)) or 'none'}, "
                "and bare MLP/CNN/ResNet state dicts")
        spec = HF_FAMILIES[model_type](config, shapes)
    elif is_resnet(shapes):
        spec = resnet_spec(shapes)
    else:
        spec = sequential_spec(shapes)
    validate(spec, shapes)
    return spec


def detect_family(ckpt) -> str:
    return build_spec(ckpt).family
