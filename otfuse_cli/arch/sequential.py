"""Plain MLPs and VGG-style CNNs from bare state dicts: a chain of Linear/Conv layers inferred from names
and shapes, BatchNorm moving with the channels it normalises, and the conv->linear flatten where channel c
owns the block of h*w input columns that follow it."""

from __future__ import annotations

import itertools
import re

from otfuse_cli.errors import OtfuseError
from otfuse_cli.arch.model import Entry, Space, Spec

BN_PARAMS = ("weight", "bias", "running_mean", "running_var")


def natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _prefixes(shapes: dict) -> list[str]:
    seen: dict[str, None] = {}
    for name in shapes:
        seen.setdefault(name.rsplit(".", 1)[0] if "." in name else "", None)
    return list(seen)


def _layers(prefixes: list[str], shapes: dict) -> list[dict] | None:
    """Main layers in order with their BatchNorms; None if shapes do not chain in this order."""
    layers: list[dict] = []
    for p in prefixes:
        w = shapes.get(f"{p}.weight")
        if f"{p}.running_mean" in shapes:
            if not layers or layers[-1]["out"] != shapes[f"{p}.running_mean"][0]:
                return None
            layers[-1]["bns"].append(p)
        elif w is not None and len(w) in (2, 4):
            layers.append({"prefix": p, "kind": "conv" if len(w) == 4 else "linear",
                           "out": w[0], "in": w[1], "bns": []})
        elif w is not None or f"{p}.bias" in shapes:
            raise OtfuseError(f"cannot infer a layer chain: {p!r} is neither Linear, Conv2d nor BatchNorm")
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


def ordered_layers(shapes: dict) -> list[dict]:
    prefixes = sorted(_prefixes(shapes), key=natural_key)
    layers = _layers(prefixes, shapes)
    if layers is None:
        # Named groups sort alphabetically ("classifier" < "features"): try group orders that chain.
        groups: dict[str, list[str]] = {}
        for p in prefixes:
            groups.setdefault(p.split(".")[0], []).append(p)
        if len(groups) <= 6:
            for order in itertools.permutations(groups):
                layers = _layers([p for g in order for p in groups[g]], shapes)
                if layers is not None:
                    break
    if layers is None:
        raise OtfuseError("cannot infer a Linear/Conv chain from tensor names and shapes")
    return layers


def sequential_spec(shapes: dict) -> Spec:
    layers = ordered_layers(shapes)
    spaces = []
    for layer, nxt in zip(layers, layers[1:]):
        p = layer["prefix"]
        entries = [Entry(f"{p}.weight", 0, "out")]
        if f"{p}.bias" in shapes:
            entries.append(Entry(f"{p}.bias", 0, "out"))
        for bn in layer["bns"]:
            entries += [Entry(f"{bn}.{k}", 0, "out") for k in BN_PARAMS if f"{bn}.{k}" in shapes]
        entries.append(Entry(f"{nxt['prefix']}.weight", 1, "in", rep=layer["rep"]))
        kind = "channel" if layer["kind"] == "conv" else "hidden"
        spaces.append(Space(p, kind, layer["out"], entries))
    family = "cnn" if any(layer["kind"] == "conv" for layer in layers) else "mlp"
    return Spec(family, spaces, fixed_note="input features/channels and class outputs")
