"""The architecture registry: which family a checkpoint is (`model_type` from config.json for Hugging Face
folders; names and shapes for bare state dicts) and its Spec. Each family is declared once, in its own
file (transformers.py, sequential.py, resnet.py); one engine aligns them all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from otfuse_cli.errors import OtfuseError
from otfuse_cli.arch.compat import check_compatible, judge
from otfuse_cli.arch.model import Entry, Space, Spec, validate
from otfuse_cli.arch.resnet import build_resnet, is_resnet, resnet_spec
from otfuse_cli.arch.sequential import ACTIVATION_DEFAULTS, build_chain, sequential_spec
from otfuse_cli.arch.transformers import FAMILIES, Family, build

# model_type -> its declaration; an explicit table, not one filled as an import side effect
HF_FAMILIES: dict[str, Family] = {t: family for family in FAMILIES for t in family.model_types}


@dataclass(frozen=True)
class BareFamily:
    """A family of state dicts without config.json: recognised, described and rebuilt from names and shapes."""

    name: str
    matches: Callable[[dict], bool]
    spec: Callable[[dict], Spec]
    build: Callable  # (shapes, activation function, input shape) -> (nn.Module, kind)


# tried in order; the layer chain (MLP / VGG-style CNN) takes whatever is left
BARE_FAMILIES = (BareFamily("resnet", is_resnet, resnet_spec, build_resnet),
                 BareFamily("chain", lambda shapes: True, sequential_spec, build_chain))


def bare_family(shapes: dict) -> BareFamily:
    return next(f for f in BARE_FAMILIES if f.matches(shapes))


__all__ = ["Entry", "Space", "Spec", "build_spec", "detect_family", "validate", "check_compatible", "judge",
           "HF_FAMILIES", "hf_family",
           "BARE_FAMILIES", "bare_family"]


def shapes_of(ckpt) -> dict[str, tuple[int, ...]]:
    return {name: tuple(ckpt.shape(name)) for name in ckpt.keys()}


def build_spec(ckpt) -> Spec:
    shapes = shapes_of(ckpt)
    config = getattr(ckpt, "config", None)
    family = hf_family(ckpt)
    if family is not None:
        spec = build(family, config, shapes)
    else:
        try:
            spec = bare_family(shapes).spec(shapes)
        except OtfuseError as e:  # name the file: with several models, which one is it?
            raise OtfuseError(f"{ckpt.path}: {e}") from None
    for tensor in {e.tensor for s in spec.spaces for e in s.entries}:
        if not ckpt.dtype(tensor).is_floating_point:  # an integer weight would pass through unmerged
            raise OtfuseError(f"tensor {tensor!r} is {str(ckpt.dtype(tensor)).removeprefix('torch.')}; "
                              "weights must be floating point")
    validate(spec, shapes)
    return spec


def hf_family(ckpt) -> Family | None:
    """The declaration of a Hugging Face checkpoint's family; None for bare state dicts."""
    config = getattr(ckpt, "config", None)
    if not config or not config.get("model_type"):
        return None
    model_type = config["model_type"]
    if not isinstance(model_type, str) or model_type not in HF_FAMILIES:
        raise OtfuseError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(HF_FAMILIES))}, "
                          "and bare MLP/CNN/ResNet state dicts")
    return HF_FAMILIES[model_type]


def activation_defaults(family: str) -> tuple[str, bool]:
    """(standardize, post_activation) for activation alignment of this family when the user says nothing."""
    return ACTIVATION_DEFAULTS.get(family, ("zscore", False))


def detect_family(ckpt) -> str:
    return build_spec(ckpt).family
