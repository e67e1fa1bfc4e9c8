"""The Spec data model: which tensor axes share a neuron space.

A space has `size` units. Each entry names a slice of one tensor axis that the space moves; the slice
is laid out as (unit, rep, inner): index = unit*rep*inner + r*inner + i. `rep` repeats a unit's block
(a conv channel owning h*w flattened columns, a KV group owning G query heads), `inner` is a within-unit
dimension moved by the space's per-unit-pair inner map of the entry's channel (e.g. head dims: "qk", "vo").
When `group` names a map, the `rep` blocks of a unit may be reordered too, per unit pair (the query heads
inside a KV group of grouped-query attention); otherwise rep blocks keep their order (a conv channel's h*w
flattened columns).

Roles decide how a (possibly rectangular or soft) plan is normalised on that axis:
  "out"  the axis indexes what the unit produces (weight rows, biases, norm gains, BN statistics,
         embedding columns): an anchor unit gets the barycentre of its parent units (column-stochastic);
  "in"   the axis indexes what the unit feeds (next layer's input columns): a parent unit's outgoing
         weight is split over the anchor units it maps to and summed (row-stochastic).
Axes that no entry covers (classes, vocabulary, positions, image channels) never move.
"""

from __future__ import annotations

from dataclasses import dataclass

from otfuse_cli.errors import OtfuseError

ROLES = ("out", "in")


@dataclass(frozen=True)
class Entry:
    tensor: str
    axis: int
    role: str
    start: int = 0
    rep: int = 1
    inner: int = 1
    channel: str = ""
    group: str = ""  # name of the within-unit map that reorders rep blocks; "" = rep order is fixed

    def span(self, size: int) -> int:
        return size * self.rep * self.inner

    def shape_key(self) -> tuple:
        """What must agree between two models for this entry to be fused (everything but widths)."""
        return (self.tensor, self.axis, self.role, self.rep, self.inner, self.channel, self.group)


@dataclass
class Space:
    name: str
    kind: str
    size: int
    entries: list[Entry]
    fixed_inner: tuple[str, ...] = ()  # channels whose within-unit order must stay (RoPE q/k dims)
    compressible: bool = True
    note: str = ""
    # its units may be mixed by a general invertible linear map (--align cca): produced by one module and read by
    # others, with no norm, softmax or gate acting on them unit by unit
    linear: bool = False

    @property
    def channels(self) -> list[str]:
        return sorted({e.channel for e in self.entries if e.inner > 1})

    @property
    def groups(self) -> dict[str, int]:
        """Within-unit maps that reorder rep blocks -> their length (query heads per KV group)."""
        return {e.group: e.rep for e in self.entries if e.group}


@dataclass
class Spec:
    family: str
    spaces: list[Space]
    fixed_note: str = "class outputs, input features"

    def space(self, name: str) -> Space:
        for s in self.spaces:
            if s.name == name:
                return s
        raise KeyError(name)

    def axis_index(self) -> dict[tuple[str, int], list[tuple[Space, Entry]]]:
        """(tensor, axis) -> the space entries that slice it."""
        index: dict[tuple[str, int], list[tuple[Space, Entry]]] = {}
        for s in self.spaces:
            for e in s.entries:
                index.setdefault((e.tensor, e.axis), []).append((s, e))
        return index

    def to_json(self) -> list[dict]:
        return [
            {
                "name": s.name,
                "kind": s.kind,
                "size": s.size,
                "compressible": s.compressible,
                "entries": [
                    {"tensor": e.tensor, "axis": e.axis, "role": e.role, "start": e.start,
                     "rep": e.rep, "inner": e.inner, "channel": e.channel, "group": e.group}
                    for e in s.entries
                ],
            }
            for s in self.spaces
        ]


def validate(spec: Spec, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every entry names an existing tensor axis, and slices fit and do not overlap."""
    for (tensor, axis), pairs in spec.axis_index().items():
        if tensor not in shapes:
            raise OtfuseError(f"spec error: tensor {tensor!r} of space {pairs[0][0].name!r} is not in the checkpoint")
        shape = shapes[tensor]
        if axis >= len(shape):
            raise OtfuseError(f"spec error: {tensor} has no axis {axis}")
        spans = sorted((e.start, e.start + e.span(s.size), s.name) for s, e in pairs)
        end = 0
        for lo, hi, name in spans:
            if lo < end or hi > shape[axis]:
                raise OtfuseError(
                    f"spec error: space {name!r} slice [{lo}, {hi}) does not fit axis {axis} of {tensor} "
                    f"(length {shape[axis]})")
            end = hi

