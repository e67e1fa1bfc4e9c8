"""Plain MLPs and VGG-style CNNs from bare state dicts (no config.json), declared once for fusion (the Spec)
and evaluation (the runnable module): both come from the same inferred layer chain.

Layer chain (`ordered_layers`): Linear (2-D weight) and Conv2d (4-D) layers in natural key order; if the
shapes do not chain that way, orders of the top-level name groups are tried (torchvision's VGG runs
`features.*` before `classifier.*`, which sorts first). A BatchNorm (prefix with running_mean) or LayerNorm
(1-D weight, after a Linear) belongs to the layer before it.

Spec: each hidden layer's outputs are one space; its norm's parameters move with them; at the conv->linear
flatten, channel c owns the block of h*w input columns that follow it.

Module (`build_chain`): each conv (stride 1, padding k//2) + its BatchNorm + activation + MaxPool2d(2); then
flatten and the Linear chain (with its norms), the activation between layers and none after the logits.
With a known input shape (`otfuse.input_shape` metadata) the number of pools is chosen so the flatten size
matches the first Linear (pools after the first p convs); a first Linear whose input equals the last conv's
channels means global average pooling instead. Submodules sit at the saved key prefixes, so
``load_state_dict(strict=True)`` takes the file as it is."""

from __future__ import annotations

import itertools
import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from otfuse_cli.errors import OtfuseError
from otfuse_cli.arch.model import Entry, Space, Spec

NORM_PARAMS = ("weight", "bias", "running_mean", "running_var")

# Tensor-name fragments only transformer checkpoints have -> the family they suggest (first match wins).
TRANSFORMER_NAMES = (("encoder_attn.", "bart"), ("attention.self.query", "bert"), ("attention.attention.query", "vit"),
                     ("attention.q_lin", "distilbert"), ("attn.c_attn", "gpt2"), ("self_attn.q_proj", "llama"),
                     ("encoder.layer.", "bert"))


# Activation alignment (standardize, post_activation), chosen on validation data (benchmarks/merge_rules.py:
# first half of the held-out digits, NLL of the fused model): MLPs match best after the ReLU with z-scores
# (0.370; before it 0.426 z-scored, 0.404 centred), CNNs before it, centred (0.418; z-scored 0.451, after the
# ReLU 0.435). Other families keep z-scored pre-activations (BERT: 0.530 vs 0.558 centred).
ACTIVATION_DEFAULTS = {"mlp": ("zscore", True), "cnn": ("center", False)}

def natural_key(text: str) -> list:
    # "10" after "2", "fc10" after "fc2": digit runs compare as numbers.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def transformer_family(shapes: dict) -> str | None:
    """The transformer family a bare checkpoint's tensor names suggest, if any."""
    return next((family for fragment, family in TRANSFORMER_NAMES if any(fragment in n for n in shapes)), None)


# --------------------------------------------------------------------------- layer chain

def _prefixes(shapes: dict) -> list[str]:
    seen: dict[str, None] = {}
    for name in shapes:
        seen.setdefault(name.rsplit(".", 1)[0] if "." in name else "", None)
    return list(seen)


def _kind(prefix: str, shapes: dict) -> str | None:
    """The layer kind under prefix: conv, linear, bn, ln, unknown (weights of another rank); None: no layer."""
    w = shapes.get(f"{prefix}.weight")
    if f"{prefix}.running_mean" in shapes:
        return "bn"
    if w is not None:
        return {4: "conv", 2: "linear", 1: "ln"}.get(len(w), "unknown")
    return "unknown" if f"{prefix}.bias" in shapes else None


def _layers(prefixes: list[str], shapes: dict) -> list[dict] | None:
    """Main layers in this order with their norms; None if the shapes do not chain in this order."""
    layers: list[dict] = []
    for p in prefixes:
        kind = _kind(p, shapes)
        if kind in ("conv", "linear"):
            w = shapes[f"{p}.weight"]
            layers.append({"prefix": p, "kind": kind, "out": w[0], "in": w[1], "norms": []})
        elif kind in ("bn", "ln"):
            # a norm normalises the outputs of the layer before it (LayerNorm: the features of a Linear)
            params = [k for k in NORM_PARAMS if f"{p}.{k}" in shapes]
            if any(len(shapes[f"{p}.{k}"]) != 1 for k in params):
                raise OtfuseError(f"norm layer {p!r}: its parameters must be vectors, got shapes "
                                  f"{ {k: shapes[f'{p}.{k}'] for k in params} }")
            size = shapes[f"{p}.running_mean" if kind == "bn" else f"{p}.weight"][0]
            if not layers or layers[-1]["out"] != size or (kind == "ln" and layers[-1]["kind"] != "linear"):
                return None
            layers[-1]["norms"].append(p)
        elif kind == "unknown":
            return None
    if not layers:
        return None
    for prev, nxt in zip(layers, layers[1:]):
        if nxt["kind"] == "conv" and prev["kind"] == "linear":
            return None
        if nxt["in"] == prev["out"]:
            prev["rep"] = 1
        elif prev["kind"] == "conv" and nxt["kind"] == "linear" and nxt["in"] % prev["out"] == 0:
            prev["rep"] = nxt["in"] // prev["out"]  # flatten: channel c owns h*w columns
        else:
            return None
    return layers


def _orders(prefixes: list[str]):
    """Natural key order, then the other orders of the top-level name groups (at most 6 groups: 720 orders)."""
    yield prefixes
    groups: dict[str, list[str]] = {}
    for p in prefixes:
        groups.setdefault(p.split(".")[0], []).append(p)
    if len(groups) <= 6:
        for order in itertools.islice(itertools.permutations(groups), 1, None):
            yield [p for g in order for p in groups[g]]


def _why_no_chain(prefixes: list[str], shapes: dict) -> str:
    family = transformer_family(shapes)
    if family:
        return (f"this looks like a {family} checkpoint without its config.json; pass the Hugging Face folder "
                "(config.json next to the weights)")
    if all("." not in n and n not in ("weight", "bias") for n in shapes):  # x, y, input_ids: data files
        names = ", ".join(sorted(shapes)[:4])
        return (f"its tensors ({names}) have no module names: a data file rather than a model? Check the order "
                "of the arguments")
    bare = next((n for n in shapes if "." not in n), None)
    if bare is not None:
        return (f"tensor {bare!r} has no module prefix (bare state dicts need names like '0.weight'; "
                "Hugging Face models need their config.json)")
    odd = next((p for p in prefixes if _kind(p, shapes) == "unknown"), None)
    if odd is not None:
        found = {n.rsplit(".", 1)[1]: s for n, s in shapes.items() if n.rsplit(".", 1)[0] == odd}
        return (f"layer {odd!r} {found} is neither Linear, Conv2d, BatchNorm nor LayerNorm "
                "(Hugging Face models need their config.json)")
    return "cannot infer a Linear/Conv chain from tensor names and shapes (a layer's inputs must match the outputs before)"


def ordered_layers(shapes: dict) -> list[dict]:
    """The layer chain: [{"prefix", "kind" (conv|linear), "out", "in", "norms" (prefixes), "rep"}] in run order;
    "rep" (all but the last) is how many input columns of the next layer each output unit feeds."""
    prefixes = sorted(_prefixes(shapes), key=natural_key)
    for order in _orders(prefixes):
        layers = _layers(order, shapes)
        if layers is not None:
            return layers
    raise OtfuseError(_why_no_chain(prefixes, shapes))


def _family(layers: list[dict]) -> str:
    return "cnn" if any(layer["kind"] == "conv" for layer in layers) else "mlp"


def sequential_spec(shapes: dict) -> Spec:
    layers = ordered_layers(shapes)
    spaces = []
    for layer, nxt in zip(layers, layers[1:]):
        p = layer["prefix"]
        produced = [f"{p}.weight", f"{p}.bias"] + [f"{n}.{k}" for n in layer["norms"] for k in NORM_PARAMS]
        entries = [Entry(t, 0, "out") for t in produced if t in shapes]
        entries.append(Entry(f"{nxt['prefix']}.weight", 1, "in", rep=layer["rep"]))
        kind = "channel" if layer["kind"] == "conv" else "hidden"
        # a BatchNorm/LayerNorm normalises each unit on its own: a linear map across units does not pass it
        spaces.append(Space(p, kind, layer["out"], entries, linear=not layer["norms"]))
    return Spec(_family(layers), spaces, fixed_note="input features/channels and class outputs")


# --------------------------------------------------------------------------- runnable module

def image_batch(x: torch.Tensor, input_shape: tuple[int, ...] | None) -> torch.Tensor:
    """(N, C, H, W) convnet input from image batches, greyscale (N, H, W) or flat rows (via input_shape)."""
    if x.dim() == 4:
        return x
    if x.dim() == 3:
        return x.unsqueeze(1)
    if input_shape is not None and len(input_shape) == 3:
        return x.reshape(x.shape[0], *input_shape)
    raise OtfuseError(f"a convnet needs (N, C, H, W) inputs, got shape {tuple(x.shape)} "
                      "and no otfuse.input_shape metadata to unflatten it")


class _Chain(nn.Module):
    """Layers at their saved key prefixes, run in ``steps`` order (prefix names and functional ops)."""

    def __init__(self, input_shape: tuple[int, ...] | None, is_conv: bool, num_outputs: int):
        super().__init__()
        self.input_shape = input_shape
        self.is_conv = is_conv
        self.num_outputs = num_outputs
        self.steps: list[str | Callable] = []

    def extra_repr(self) -> str:
        return "steps: " + " -> ".join(s if isinstance(s, str) else s.__name__.strip("_") for s in self.steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = image_batch(x, self.input_shape) if self.is_conv else x.flatten(1)
        for step in self.steps:
            x = self.get_submodule(step)(x) if isinstance(step, str) else step(x)
        return x


def _maxpool2(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2)


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


def _global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _place(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Register module at a dotted path, creating plain containers on the way (so keys match exactly)."""
    *parents, last = dotted.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(last, module)


def _module(prefix: str, after: str, shapes: dict) -> nn.Module:
    """An untrained module shaped like the tensors under prefix; `after`: the kind of layer a norm follows."""
    kind, w, bias = _kind(prefix, shapes), shapes.get(f"{prefix}.weight"), f"{prefix}.bias" in shapes
    if kind == "conv":
        kh, kw = w[2:]
        return nn.Conv2d(w[1], w[0], (kh, kw), padding=(kh // 2, kw // 2), bias=bias)
    if kind == "linear":
        return nn.Linear(w[1], w[0], bias=bias)
    if kind == "bn":
        norm = nn.BatchNorm2d if after == "conv" else nn.BatchNorm1d
        return norm(shapes[f"{prefix}.running_mean"][0], affine=w is not None)
    return nn.LayerNorm(w[0], bias=bias)


def _choose_pools(convs: list[dict], first_linear: dict, input_shape) -> tuple[list[bool], bool]:
    """(max-pool after conv i?, global average pool before the Linear chain?)."""
    n, channels, features = len(convs), convs[-1]["out"], first_linear["in"]
    if input_shape is None or len(input_shape) != 3:
        return [True] * n, features == channels
    _, h, w = input_shape
    for p in range(n, -1, -1):
        if channels * (h >> p) * (w >> p) == features:
            return [i < p for i in range(n)], False
    if features == channels:
        return [True] * n, True
    raise OtfuseError(f"cannot rebuild the convnet: first Linear takes {features} inputs, but {channels} channels "
                      f"of a {h}x{w} input give {channels * (h >> n) * (w >> n)} after {n} max-pools")


def build_chain(shapes: dict, act: Callable, input_shape: tuple[int, ...] | None) -> tuple[nn.Module, str]:
    """(module with untrained weights and the saved key layout, family) for an MLP or VGG-style CNN."""
    layers = ordered_layers(shapes)
    if layers[-1]["kind"] != "linear":
        raise OtfuseError("cannot rebuild the model: no Linear (2-D) weight for the output layer")
    convs = [layer for layer in layers if layer["kind"] == "conv"]  # convs come first: none follows a Linear
    chain = _Chain(input_shape, is_conv=bool(convs), num_outputs=layers[-1]["out"])
    pools, global_pool = _choose_pools(convs, layers[len(convs)], input_shape) if convs else ([], False)
    for i, layer in enumerate(layers):
        for prefix in (layer["prefix"], *layer["norms"]):
            _place(chain, prefix, _module(prefix, layer["kind"], shapes))
            chain.steps.append(prefix)
        if i == len(layers) - 1:
            break  # logits: no activation after the output layer
        chain.steps.append(act)
        if layer["kind"] == "conv":
            if pools[i]:
                chain.steps.append(_maxpool2)
            if layers[i + 1]["kind"] == "linear":
                chain.steps.append(_global_avg_pool if global_pool else _flatten)
    return chain, _family(layers)
