"""Weight-based unit features (no data): each unit's slice of every tensor of its space, with the
tensor's other axes first moved into the anchor's basis by the plans solved so far."""

from __future__ import annotations

import math

import torch

from otfuse_cli.alignment.cost import FeaturePair
from otfuse_cli.alignment.transport import Transporter
from otfuse_cli.errors import OtfuseError
from otfuse_cli.arch.model import Entry, Spec


# float32 bytes of a checkpoint below which its float32 copies are kept for the refinement sweeps. Re-reading
# from the memory map costs a conversion per tensor and sweep (about 1 s per sweep at 125M parameters); the
# copies of two 125M models would cost 1 GB, most of the 1.5 x model + 1 GB budget.
CACHE_LIMIT = 256 * 2**20


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in x: its min and max are finite (NaN propagates through both). One fused reduction,
    14x faster than isfinite(x).all() on a bf16 embedding, which builds a boolean copy first."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(x: torch.Tensor, label: str, name: str) -> None:
    """Refuse NaN/Inf so they are reported, not propagated."""
    if not all_finite(x):
        raise OtfuseError(f"{label}: tensor {name} contains NaN or Inf")


def checked_float(x: torch.Tensor, label: str, name: str) -> torch.Tensor:
    """float32 copy of a floating tensor (float64 stays float64), refusing NaN/Inf."""
    check_finite(x, label, name)
    return as_float(x)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """float32 copy of a floating tensor; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def float32_bytes(ckpt) -> int:
    """What float32 copies of all of a checkpoint's tensors would take (from the headers)."""
    return 4 * sum(math.prod(ckpt.shape(name)) for name in ckpt.keys())


class TensorSource:
    """float32 view of a checkpoint's tensors, read lazily; each tensor is checked for NaN/Inf once, on its
    first read. Small checkpoints are cached (refinement reads every tensor several times); large ones are
    re-read from the memory-mapped file each time, so alignment never holds two large models in memory."""

    def __init__(self, ckpt, label: str, cache: bool | None = None):
        self.ckpt, self.label, self.cache, self.checked = ckpt, label, {}, set()
        self.caching = cache if cache is not None else float32_bytes(ckpt) <= CACHE_LIMIT

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.cache:
            x = self._read(name)
            if not self.caching:
                return x
            self.cache[name] = x
        return self.cache[name]

    def take(self, name: str, raw: bool = False) -> torch.Tensor:
        """The tensor for its last use (merging): a cached copy is handed over and dropped from the cache.
        raw: in the checkpoint's own dtype when not cached (still checked), for a merge that converts it."""
        return self.cache.pop(name) if name in self.cache else self._read(name, raw)

    def _read(self, name: str, raw: bool = False) -> torch.Tensor:
        x = self.ckpt.get(name)
        if not x.is_floating_point():
            return x
        if name not in self.checked:
            check_finite(x, self.label, name)
            self.checked.add(name)
        return x if raw else as_float(x)


class OnDevice:
    """A TensorSource's tensors on `device` (--device for the weights route): what the features, cross terms
    and costs are computed from. A source that caches keeps its copies there too, so refinement sweeps do not
    move every tensor again; on the CPU it is the source itself."""

    def __init__(self, source: TensorSource, device: torch.device):
        self.source, self.device, self.cache = source, device, {}
        self.label = source.label

    def __call__(self, name: str) -> torch.Tensor:
        if name in self.cache:
            return self.cache[name]
        x = self.source(name).to(self.device)
        if self.source.caching:
            self.cache[name] = x
        return x


def on_device(source: TensorSource, device: torch.device):
    return source if device.type == "cpu" else OnDevice(source, device)


def unit_slices(x: torch.Tensor, entry: Entry, size: int) -> torch.Tensor:
    """(size, rep, inner, rest) view of the units of `entry` in tensor x."""
    y = x.narrow(entry.axis, entry.start, entry.span(size)).movedim(entry.axis, 0)
    return y.reshape(size, entry.rep, entry.inner, -1)


# A BatchNorm's running mean and variance (buffers measured on data, not parameters) and whether they enter a
# unit's weight features. They stay out (as in Re-Basin): benchmarks/bn_features.py measured both choices
# on validation data (three kinds of BatchNorm CNN; out gained 0.8 points on their mean, in two of the three).
NORM_STATISTICS = (".running_mean", ".running_var")
NORM_STATISTICS_IN_FEATURES = False


class WeightFeatures:
    def __init__(self, anchor_spec: Spec, parent_spec: Spec, anchor: TensorSource, parent: TensorSource,
                 sketch: int | None = None, l1: bool = True):
        self.anchor_spec, self.parent_spec, self.sketch, self.l1 = anchor_spec, parent_spec, sketch, l1
        self.anchor, self.parent = anchor, parent
        self.transporter = Transporter(anchor_spec, parent_spec)

    def neighbours(self, k: int) -> set[str]:
        """The other spaces whose plans move the tensors of space k (what its refinement features read)."""
        space = self.anchor_spec.spaces[k]
        return set().union(*(self.transporter.spaces_of(e.tensor) for e in space.entries)) - {space.name}

    def features(self, k: int, plans: dict, first_pass: bool, fold: bool = True) -> FeaturePair:
        sa, sp = self.anchor_spec.spaces[k], self.parent_spec.spaces[k]
        pairs = list(zip(sp.entries, sa.entries))
        ready = [(ep, ea) for ep, ea in pairs if self.transporter.spaces_of(ep.tensor) - {sa.name} <= set(plans)]
        if first_pass and ready:
            pairs = ready  # only entries whose other axes are already aligned carry signal
        if not NORM_STATISTICS_IN_FEATURES:
            pairs = [(ep, ea) for ep, ea in pairs if not ep.tensor.endswith(NORM_STATISTICS)]
        pair = FeaturePair(fold, self.sketch if fold else None, self.l1)
        for ep, ea in pairs:
            xp = self.transporter.move(ep.tensor, self.parent(ep.tensor), plans, skip=sa.name)
            xa = self.anchor(ea.tensor)
            up, ua = unit_slices(xp, ep, sp.size), unit_slices(xa, ea, sa.size)
            if up.shape[1:] != ua.shape[1:]:
                continue  # an unaligned axis of another width: no comparable signal yet
            pair.add(ep, up, ea, ua)
        return pair
