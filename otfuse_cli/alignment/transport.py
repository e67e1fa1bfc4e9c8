"""Transport plans and how they move tensors: the one place where a plan touches a weight.

A hard plan between equal widths is applied as an exact index permutation (fast, bit-exact); soft or
rectangular plans are applied as matrices normalised per role (see arch/model.py)."""

from __future__ import annotations

from dataclasses import replace

import torch

from otfuse_cli.arch.model import Entry, Spec


# Two plans are the same for refinement when no anchor unit's mixture of parent units moves by more than
# this share of its mass: soft plans shift a little every sweep as their neighbours do and never match
# exactly (a tolerance of 1e-9 ran every sweep); hard plans compare exactly.
SAME_PLAN_TOL = 1e-4


class Plan:
    """Coupling between a parent's units (rows, n) and the anchor's (columns, m). A hard plan between equal
    widths (what exact OT gives with uniform masses) is kept as its index vector alone: dense float64
    couplings for every space of a 7B model take 29 GiB. The dense matrix is built on demand."""

    def __init__(self, coupling: torch.Tensor | None = None, inner: dict[str, torch.Tensor] | None = None,
                 stats: dict | None = None, *, index: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, width: int | None = None,
                 maps: tuple[torch.Tensor, torch.Tensor] | None = None):
        if sum(x is not None for x in (coupling, index, labels, maps)) != 1 or (labels is not None) != (width is not None):
            raise ValueError("a Plan takes one of a coupling, a hard index, labels with their width, or linear maps")
        self._dense = coupling  # (n, m) float64, sums to 1
        # a linear plan (--align cca): (T, T⁻¹), T (m, n) maps the parent's units onto the anchor's, h_a ≈ T h_p;
        # what a unit produces is mixed by T, what reads it by T⁻¹ (exact for a permutation or positive scaling)
        self.maps = None if maps is None else (maps[0].double(), maps[1].double())
        self._index = None if index is None else index.long()  # src[v] = parent unit moved to anchor unit v
        # many-to-one (compress): dst[u] = the anchor unit parent unit u goes to, -1 = dropped; every unit that
        # goes somewhere carries the same mass
        self.labels = None if labels is None else labels.long()
        self.width = width
        self.inner = inner if inner is not None else {}  # channel -> (n, m, d) parent index per anchor dim
        self.stats = stats if stats is not None else {}
        self._checked = index is not None or maps is not None  # a dense coupling: checked for a hard pattern on first ask
        self._identity: bool | None = None

    @classmethod
    def identity(cls, n: int) -> "Plan":
        return cls(index=torch.arange(n))

    @property
    def shape(self) -> tuple[int, int]:
        if self.labels is not None:
            return len(self.labels), self.width
        if self.maps is not None:
            return self.maps[0].shape[1], self.maps[0].shape[0]
        return (len(self._index),) * 2 if self._dense is None else tuple(self._dense.shape)

    @property
    def index(self) -> torch.Tensor | None:
        """The index vector a compact hard plan is kept as (uniform masses); None for a dense coupling, which
        may also be a scaled permutation with other masses (see hard_index)."""
        return self._index if self._dense is None else None

    @property
    def coupling(self) -> torch.Tensor:
        if self._dense is not None:
            return self._dense
        if self.maps is not None:
            raise ValueError("a linear plan has maps, not a coupling")
        if self.labels is not None:
            moved = (self.labels >= 0).nonzero().squeeze(1)
            dense = torch.zeros(self.shape, dtype=torch.float64)
            dense[moved, self.labels[moved]] = 1.0 / max(len(moved), 1)
            return dense
        n = len(self._index)
        dense = torch.zeros(n, n, dtype=torch.float64)
        dense[self._index, torch.arange(n)] = 1.0 / n
        return dense

    def hard_index(self) -> torch.Tensor | None:
        """src[u] = the parent unit moved to anchor unit u, when the plan is a scaled permutation."""
        if not self._checked and self.labels is not None:
            n, m = self.shape
            if n == m and bool((self.labels >= 0).all()) and len(self.labels.unique()) == n:
                self._index = self.labels.argsort()
            self._checked = True
        if not self._checked:
            n, m = self._dense.shape
            nz = self._dense > 0
            if n == m and bool((nz.sum(0) == 1).all()) and bool((nz.sum(1) == 1).all()):
                self._index = self._dense.argmax(0)
            self._checked = True
        return self._index

    def is_identity(self) -> bool:
        """A hard plan that moves nothing (the anchor's own basis): transport can skip it."""
        if self._identity is None:
            src = self.hard_index()
            self._identity = (src is not None and not self.inner and bool((src == torch.arange(len(src))).all()))
        return self._identity

    def moves_nothing(self) -> bool:
        """The identity on units and on every within-unit map (head dims, query heads)."""
        src = self.hard_index()
        if src is None or not bool((src == torch.arange(len(src))).all()):
            return False
        units = torch.arange(len(src))
        return all(bool((m[units, units] == torch.arange(m.shape[-1])).all()) for m in self.inner.values())

    def weights(self, role: str) -> torch.Tensor:
        """(n, m): anchor unit v's slice = sum over parent units u of weights[u, v] x the parent's slice u."""
        if self.maps is not None:
            return self.maps[0].T if role == "out" else self.maps[1]
        c = self.coupling
        if role == "out":  # anchor unit = barycentre of the parent units sent to it
            return c / c.sum(0, keepdim=True).clamp_min(1e-300)
        return c / c.sum(1, keepdim=True).clamp_min(1e-300)  # parent unit's outgoing weight split and summed

    def same_as(self, other: "Plan") -> bool:
        if self.shape != other.shape:
            return False
        if not all(torch.equal(self.inner[k], other.inner[k]) for k in self.inner if k in other.inner):
            return False
        if (self.maps is None) != (other.maps is None):
            return False
        if self.maps is not None:  # maps move by round-off between solves of the same statistics
            return bool((self.maps[0] - other.maps[0]).abs().max() <= SAME_PLAN_TOL * self.maps[0].abs().max())
        mine, theirs = self.hard_index(), other.hard_index()
        if mine is not None and theirs is not None:
            return torch.equal(mine, theirs)
        if self.labels is not None and other.labels is not None:
            return torch.equal(self.labels, other.labels)
        shift = (self.weights("out") - other.weights("out")).abs().sum(0).max()
        return bool(shift <= SAME_PLAN_TOL)


def _move_slice(y: torch.Tensor, entry: Entry, plan: Plan, n: int, m: int) -> torch.Tensor:
    """y: (..., n*rep*inner) -> (..., m*rep*inner) for one entry."""
    lead, dev = y.shape[:-1], y.device
    y = y.reshape(*lead, n, entry.rep, entry.inner)
    # plans live on the CPU; their indices and weights go where the tensor is (--device: a no-op on the CPU)
    perm = plan.inner[entry.channel].to(dev) if entry.inner > 1 and entry.channel in plan.inner else None
    reps = plan.inner[entry.group].to(dev) if entry.group and entry.group in plan.inner else None
    src = None if (src := plan.hard_index()) is None else src.to(dev)
    if src is None and y.dtype not in (torch.float32, torch.float64):
        y = y.float()  # a soft plan mixes units: in float32 at least, never in the checkpoint's bf16
    if src is not None:
        y = y.index_select(-3, src)
        cols = torch.arange(m, device=dev)
        if reps is not None:  # anchor unit v's rep h <- parent unit src[v]'s rep reps[src[v], v, h]
            idx = reps[src, cols][:, :, None].expand(m, entry.rep, entry.inner)
            y = torch.gather(y, -2, idx.expand(*lead, m, entry.rep, entry.inner))
        if perm is not None:
            idx = perm[src, cols][:, None, :].expand(m, entry.rep, entry.inner)
            y = torch.gather(y, -1, idx.expand(*lead, m, entry.rep, entry.inner))
    elif plan.labels is not None:
        y = _many_to_one(y, entry.role, plan.labels.to(dev), m, reps, perm)
    elif reps is not None:
        y = _soft_grouped(y, plan.weights(entry.role).to(dev, y.dtype), reps, perm)
    else:
        w = plan.weights(entry.role).to(dev, y.dtype)
        if perm is None:
            y = torch.einsum("...nri,nm->...mri", y, w)
        else:
            d = entry.inner
            q = torch.zeros(n, d, m, d, dtype=y.dtype, device=dev)
            uu, vv, jj = torch.meshgrid(*(torch.arange(k, device=dev) for k in (n, m, d)), indexing="ij")
            q[uu, perm, vv, jj] = w[:, :, None].expand(n, m, d)
            y = torch.einsum("...nri,nimj->...mrj", y, q)
    return y.reshape(*lead, m * entry.rep * entry.inner)


def _many_to_one(y: torch.Tensor, role: str, dst: torch.Tensor, m: int, reps: torch.Tensor | None,
                 perm: torch.Tensor | None) -> torch.Tensor:
    """A labels plan without its n x m matrix: each parent unit's reps and dims put in its anchor unit's
    order, then summed per anchor unit (input side) or averaged ("out": the barycentre of the members)."""
    moved = (dst >= 0).nonzero().squeeze(1)
    y, dst = y.index_select(-3, moved), dst[moved]
    lead, (n, rep, inner) = y.shape[:-3], y.shape[-3:]
    if reps is not None:
        idx = reps[moved, dst][:, :, None].expand(n, rep, inner)
        y = torch.gather(y, -2, idx.expand(*lead, n, rep, inner))
    if perm is not None:
        idx = perm[moved, dst][:, None, :].expand(n, rep, inner)
        y = torch.gather(y, -1, idx.expand(*lead, n, rep, inner))
    out = y.new_zeros(*lead, m, rep, inner).index_add_(-3, dst, y)
    if role == "out":
        out /= torch.bincount(dst, minlength=m).clamp_min(1).to(y.dtype)[:, None, None]
    return out


def _soft_grouped(y: torch.Tensor, w: torch.Tensor, reps: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Soft plan with reorderable reps: anchor unit v = sum_u w[u, v] * parent unit u with its reps and dims
    put in v's order; one pair at a time (KV groups are few), only where the plan moves mass."""
    n, m = w.shape
    out = y.new_zeros(*y.shape[:-3], m, *y.shape[-2:])
    for u, v in w.nonzero().tolist():
        block = y[..., u, :, :].index_select(-2, reps[u, v])
        if perm is not None:
            block = block.index_select(-1, perm[u, v])
        out[..., v, :, :] += w[u, v] * block
    return out


class Transporter:
    """Moves a parent's tensors into the anchor's basis, axis by axis, given per-space plans."""

    def __init__(self, anchor: Spec, parent: Spec):
        self.axes: dict[str, list[tuple[int, list[tuple[str, Entry, Entry, int, int]]]]] = {}
        grouped: dict[tuple[str, int], list] = {}
        for sa, sp in zip(anchor.spaces, parent.spaces):
            for ea, ep in zip(sa.entries, sp.entries):
                grouped.setdefault((ea.tensor, ea.axis), []).append((sa.name, ep, ea, sp.size, sa.size))
        for (tensor, axis), items in grouped.items():
            items.sort(key=lambda it: it[2].start)
            self.axes.setdefault(tensor, []).append((axis, items))

    def spaces_of(self, tensor: str) -> set[str]:
        return {it[0] for _, items in self.axes.get(tensor, []) for it in items}

    def move(self, name: str, x: torch.Tensor, plans: dict[str, Plan], skip: str | None = None) -> torch.Tensor:
        """Transport every axis of `name` whose space has a plan (a space named `skip` stays put)."""
        for axis, items in self.axes.get(name, []):
            x = self._move_axis(x, axis, items, plans, skip)
        return x

    def move_like(self, name: str, axis: int, x: torch.Tensor, plans: dict[str, Plan],
                  sides: tuple[int, ...] = (0,)) -> torch.Tensor:
        """Move the `sides` axes of x the way axis `axis` of tensor `name` moves, as unit statistics (the
        "out" role: an anchor unit's value is the barycentre of its parent units'). For a Gram matrix of the
        inputs that a weight's input axis reads, sides=(0, 1); for a per-unit mean, sides=(0,)."""
        items = [(space, replace(ep, role="out"), ea, n, m) for ax, its in self.axes.get(name, []) if ax == axis
                 for space, ep, ea, n, m in its]
        for side in sides:
            x = self._move_axis(x, side, items, plans)
        return x

    @staticmethod
    def _move_axis(x: torch.Tensor, axis: int, items: list, plans: dict[str, Plan], skip: str | None = None):
        if not any(it[0] != skip and it[0] in plans for it in items):
            return x
        y = x.movedim(axis, -1)
        pieces, pos = [], 0
        for space, ep, ea, n, m in items:
            if ep.start > pos:  # untouched gap, e.g. a slice of another role
                pieces.append(y[..., pos:ep.start])
            chunk = y[..., ep.start:ep.start + ep.span(n)]
            if space != skip and space in plans and not plans[space].is_identity():
                chunk = _move_slice(chunk, ep, plans[space], n, m)
            pieces.append(chunk)
            pos = ep.start + ep.span(n)
        if pos < y.shape[-1]:
            pieces.append(y[..., pos:])
        return torch.cat(pieces, dim=-1).movedim(-1, axis)
