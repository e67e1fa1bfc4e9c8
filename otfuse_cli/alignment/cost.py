"""Cost matrices between a parent's units and the anchor's, from per-unit features.

Features come grouped by channel: "" holds plain per-unit vectors (n, D); a head channel holds
(n, d, D) per within-unit dimension. Unit cost = plain cost + for each channel the cost of the best
within-unit matching (computed for every unit pair, which also yields the inner maps)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from otfuse_cli.alignment.metrics import METRICS
from otfuse_cli.alignment.solvers import assignment


@dataclass
class Features:
    plain: list[torch.Tensor] = field(default_factory=list)  # each (n, D)
    channels: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # each (n, d, D)
    grouped: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # each (n, G, d, D): reorderable reps

    def add(self, entry, x: torch.Tensor) -> None:
        """x: (units, rep, inner, D) slices of one entry; within-unit dims go to the entry's channel, and rep
        blocks stay apart where the entry's group map may reorder them."""
        if entry.group or entry.inner > 1:
            kept = self.grouped if entry.group else self.channels
            kept.setdefault(entry.channel, []).append(channel_view(entry, x))
        else:
            self.plain.append(x.reshape(x.shape[0], -1))

    folded: dict[int, torch.Tensor] = field(default_factory=dict)  # order -> per-unit sum |x|^order (folded)

    def fold(self, x: torch.Tensor, l1: bool) -> torch.Tensor:
        """Count plain features x (n, D) that were folded into a pair's cross term (see FeaturePair): only
        their per-unit squared L2 sums stay (and L1 sums when l1 support masses need them), in float64.
        Returns x's own per-unit squared norms."""
        squares = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64) ** 2  # float32 squares overflow
        parts = [(2, squares)]
        if l1:
            parts.append((1, x.abs().sum(1, dtype=torch.float64)))
        for order, part in parts:
            self.folded[order] = self.folded[order] + part if order in self.folded else part
        return squares

    def empty(self) -> bool:
        return not self.plain and not self.channels and not self.grouped and not self.folded

    def has_channels(self) -> bool:
        return bool(self.channels or self.grouped)

    def parts(self) -> list[torch.Tensor]:
        return list(self.plain) + [x.reshape(x.shape[0], -1) for xs in (*self.channels.values(),
                                                                          *self.grouped.values()) for x in xs]

    def flat(self) -> np.ndarray:
        return torch.cat(self.parts(), 1).double().cpu().numpy()

    def mass(self, order: int) -> np.ndarray:
        """Per-unit L1 or L2 norm of all features, accumulated entry by entry (no concatenated copy)."""
        if self.folded and order not in self.folded:
            raise ValueError(f"L{order} norms were not kept when these features were folded")
        total = sum((x.double().abs().pow(order).sum(1) for x in self.parts()), self.folded.get(order, 0))
        return total.pow(1.0 / order).cpu().numpy()


class FeaturePair:
    """A parent's and the anchor's features of one space, built entry by entry. With fold, plain per-unit
    entries go straight into the cost's sufficient statistics (the cross term x·yᵀ here, each side's norms
    in its Features), so the residual stream, which touches every tensor of the model, holds one tensor's
    features at a time instead of two float32 copies of the model. Head channels are kept whole (their
    cost matches dims within units).

    With sketch D, folded entries are hashed instead into D signed buckets per unit (a CountSketch, seeded
    by the entry's tensor and axis, so both sides hash a column alike) and the cross term is one (n, D) x
    (D, m) product at the end: O(width x D) instead of O(width x model columns). The cost then uses the
    sketches' own norms, so a distance is the sketch of the difference vector (unbiased, relative error
    about sqrt(2/D)); marginals keep the exact norms.

    The cross term is a float32 product (float64 checkpoints stay float64) summed into float64 per entry:
    half the time of float64, and hidden permutations are still recovered exactly (tests/test_oracle.py,
    benchmarks/scale.py --recovery); norms are summed in float64."""

    def __init__(self, fold: bool = True, sketch: int | None = None, l1: bool = True, covariance: bool = False):
        self.parent, self.anchor, self.fold, self.sketch, self.l1 = Features(), Features(), fold, sketch, l1
        self.dot: torch.Tensor | None = None  # (n, m) float64: sum of folded entries' x @ y.T
        # with covariance (--align cca), float64 sums of each side's rows and their Gram: [x @ x.T, y @ y.T],
        # [sum x, sum y], and the count of rows; with dot, every covariance of the two sides' units
        self.covariance = covariance
        self.auto: list[torch.Tensor] | None = None
        self.sums: list[torch.Tensor] | None = None
        self.count = 0
        self.sketches: list[torch.Tensor] | None = None  # [(n, D), (m, D)] float64 with sketch
        self.grams: dict[tuple[str, str], tuple] = {}  # head channels with fold: see channel_grams

    def add(self, ep, xp: torch.Tensor, ea, xa: torch.Tensor) -> None:
        """xp, xa: (units, rep, inner, D) slices of one entry. Adding the same entries again with more
        columns (activation rows batch by batch) accumulates: every statistic kept is a sum over columns."""
        if not self.fold:
            self.parent.add(ep, xp)
            self.anchor.add(ea, xa)
            return
        if ep.group or ep.inner > 1:  # head channels: the gram of every dim against every dim is enough
            self.parent.fold(xp.reshape(len(xp), -1), self.l1)
            self.anchor.fold(xa.reshape(len(xa), -1), self.l1)
            key, (x, inner), (y, _) = _channel_key(ep), _channel_rows(ep, xp), _channel_rows(ea, xa)
            g = gram(x, y)
            old = self.grams.get(key)
            self.grams[key] = (*g, inner) if old is None else (*(a.add_(b) for a, b in zip(old, g)), inner)
            return
        dtype = torch.float64 if torch.float64 in (xp.dtype, xa.dtype) or self.covariance else torch.float32
        x, y = xp.reshape(len(xp), -1).to(dtype), xa.reshape(len(xa), -1).to(dtype)
        x_sq, y_sq = self.parent.fold(x, self.l1), self.anchor.fold(y, self.l1)
        if self.covariance:  # float64 throughout: a covariance's small eigenvalues are what CCA inverts
            auto, sums = [x @ x.T, y @ y.T], [x.sum(1), y.sum(1)]
            self.auto = auto if self.auto is None else [a.add_(b) for a, b in zip(self.auto, auto)]
            self.sums = sums if self.sums is None else [a.add_(b) for a, b in zip(self.sums, sums)]
            self.count += x.shape[1]
        if self.sketch:
            bucket, sign = (t.to(x.device) for t in _hash(ea, x.shape[1], self.sketch))
            if self.sketches is None:
                self.sketches = [x.new_zeros(len(x), self.sketch, dtype=torch.float64),
                                 y.new_zeros(len(y), self.sketch, dtype=torch.float64)]
            self.sketches[0].index_add_(1, bucket, x.double() * sign)
            self.sketches[1].index_add_(1, bucket, y.double() * sign)
        else:
            cross = cross_term(x, y, x_sq, y_sq)
            self.dot = cross if self.dot is None else self.dot.add_(cross)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(cross term, parent squared norms, anchor squared norms) of the folded entries, or None."""
        if self.sketches is not None:
            xs, ys = self.sketches
            x_sq, y_sq = (xs * xs).sum(1), (ys * ys).sum(1)
            return cross_term(xs.float(), ys.float(), x_sq, y_sq), x_sq, y_sq
        if self.dot is None:
            return None
        return self.dot, self.parent.folded[2], self.anchor.folded[2]

    def empty(self) -> bool:
        return self.parent.empty()


def _channel_key(entry) -> tuple[str, str]:
    return ("grouped" if entry.group else "channel", entry.channel)


def channel_view(entry, x: torch.Tensor) -> torch.Tensor:
    """A head channel's (units, rep, inner, D) slices as they are kept: (n, G, d, D) when the entry's group
    map may reorder its rep blocks, else (n, d, rep·D) with the rep blocks side by side."""
    return x if entry.group else x.transpose(1, 2).reshape(len(x), x.shape[2], -1)


def _channel_rows(entry, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(units, rep, inner, D) -> one row per within-unit dim, and the per-unit shape of those rows."""
    view = channel_view(entry, x)
    return view.reshape(-1, view.shape[-1]), tuple(view.shape[1:-1])


def gram(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x @ yᵀ, |x|², |y|²) over the last axis: what a metric needs. Float64: head costs of activations have
    large norms, and a float32 cross term left matched heads a cost of 1e-3 where float64 gives 0
    (tests/test_activations.py, MiniLM recovery)."""
    x, y = x.double(), y.double()
    return x @ y.transpose(-1, -2), (x * x).sum(-1), (y * y).sum(-1)


def channel_grams(parent: Features, anchor: Features) -> dict[tuple[str, str], tuple]:
    """{("channel" or "grouped", channel): (dot, |x|², |y|², per-unit shape)} of features kept whole."""
    grams = {}
    for kind, xs_of, ys_of in (("channel", parent.channels, anchor.channels),
                               ("grouped", parent.grouped, anchor.grouped)):
        for channel, xs in xs_of.items():
            x, y = torch.cat(xs, -1), torch.cat(ys_of[channel], -1)  # (n, d, D) or (n, G, d, D)
            inner = tuple(x.shape[1:-1])
            grams[(kind, channel)] = (*gram(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])), inner)
    return grams


def _hash(entry, columns: int, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The CountSketch of one entry's columns: a bucket and a sign per column, the same for every model."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{entry.tensor}|{entry.axis}|{entry.start}".encode()))
    bucket = torch.randint(buckets, (columns,), generator=gen)
    sign = torch.randint(2, (columns,), generator=gen, dtype=torch.float64) * 2 - 1
    return bucket, sign


# Largest |x|·|y| whose float32 dot product is computed without overflow: float32's max (3.4e38) with room
# for the rounding of the partial sums.
FLOAT32_SAFE_DOT = 1e37


def cross_term(x: torch.Tensor, y: torch.Tensor, x_sq: torch.Tensor, y_sq: torch.Tensor) -> torch.Tensor:
    """x @ yᵀ over the last axis as float64, computed as a float32 product (twice float64's speed; float64
    inputs stay float64). x_sq, y_sq: the rows' squared norms in float64. Every partial sum of a dot
    product is bounded by |x_i|·|y_j| (Cauchy-Schwarz), so the norms tell beforehand whether float32 can
    overflow; extreme but finite weights take the float64 product instead. (A scan of the product for
    Inf cost 6.6% of a 1.1B sweep.)"""
    if torch.float64 in (x.dtype, y.dtype):
        return x.double() @ y.double().transpose(-1, -2)
    if len(x) and len(y) and not float(x_sq.max()) * float(y_sq.max()) < FLOAT32_SAFE_DOT ** 2:
        return x.double() @ y.double().transpose(-1, -2)  # also where a norm is Inf or NaN
    return (x.float() @ y.float().transpose(-1, -2)).double()


def plain_cost(parent: Features, anchor: Features, metric: str, folded: tuple | None = None) -> torch.Tensor:
    """The metric over the concatenation of the plain entries (the folded ones as FeaturePair.folded()'s cross
    term and norms), accumulated one entry at a time in float64."""
    dot, nx, ny = folded if folded is not None else (0, 0, 0)
    for x, y in zip(parent.plain, anchor.plain):
        g = gram(x, y)
        dot, nx, ny = dot + g[0], nx + g[1], ny + g[2]
    return METRICS[metric](dot, nx, ny)


def unit_cost(parent: Features, anchor: Features, metric: str, fixed_inner: tuple[str, ...] = (),
              group: str = "query", folded: tuple | None = None, grams: dict | None = None):
    """(cost (n, m) float64 on the features' device, inner maps {channel or group: (n, m, d) LongTensor, on the
    CPU, where the within-unit maps are solved}). folded: the plain entries a
    FeaturePair folded (FeaturePair.folded()); grams: its head channels (FeaturePair.grams), added to those
    of the features kept whole."""
    cost = None
    if parent.plain or folded is not None:
        cost = plain_cost(parent, anchor, metric, folded)
    grams = {**channel_grams(parent, anchor), **(grams or {})}
    inner = {}
    if any(kind == "grouped" for kind, _ in grams):
        c, inner = grouped_cost(grams, metric, fixed_inner, group)
        c = c.to(cost.device) if cost is not None else c
        return c if cost is None else cost + c, inner
    for (_, channel), g in grams.items():
        dims = _dims(g, metric)  # (n, m, d, d)
        n, m, d = dims.shape[:3]
        if channel in fixed_inner:  # e.g. RoPE pairs: within-head order must stay
            c = dims.diagonal(dim1=-2, dim2=-1).sum(-1)
        else:
            perms = np.empty((n, m, d), dtype=np.int64)
            flat = dims.cpu().numpy()
            for u in range(n):
                for v in range(m):
                    perms[u, v] = assignment(flat[u, v])
            perm_t = torch.from_numpy(perms).to(dims.device)
            c = dims.gather(2, perm_t.unsqueeze(2)).squeeze(2).sum(-1)  # sum_j dims[u, v, perm[j], j]
            inner[channel] = perm_t.cpu()
        cost = c if cost is None else cost + c
    return cost, inner


def _dims(g: tuple, metric: str) -> torch.Tensor:
    """A channel's gram (channel_grams) as the cost of parent unit u's dim i against anchor unit v's dim j:
    (n, m, d, d), or (n, m, G, G, d, d) with rep blocks. From one (n·d, D) x (D, m·d) product: broadcasting
    (n, 1, d, D) against (1, m, d, D) would copy both sides n·m times (35 GB per attention layer at 32 KV
    heads)."""
    dot, nx, ny, inner = g
    size = int(np.prod(inner))
    n, m = len(nx) // size, len(ny) // size
    flat = METRICS[metric](dot, nx, ny)
    if len(inner) == 1:
        return flat.reshape(n, size, m, size).transpose(1, 2)
    reps, d = inner
    return flat.reshape(n, reps, d, m, reps, d).permute(0, 3, 1, 4, 2, 5)


def grouped_cost(grams: dict, metric: str, fixed_inner: tuple[str, ...], group: str, rounds: int = 10):
    """Head cost when the rep blocks of a unit (the query heads of a KV group) may be reordered as well as
    the dims inside each head. For every unit pair, alternate: the dim maps given the rep order, then the
    rep order given the dim maps (each an exact assignment), until neither changes. The dim maps start from
    the entries without reps (K for q/k, V for v/o), which do not depend on the rep order."""
    channels = sorted({c for _, c in grams})
    single = {c: _dims(g, metric) for (kind, c), g in grams.items() if kind == "channel"}
    multi = {c: _dims(g, metric) for (kind, c), g in grams.items() if kind == "grouped"}
    some = next(iter(multi.values()))
    n, m, g, _, d, _ = some.shape
    eye_g, eye_d = np.arange(g), np.arange(d)
    s_np = {c: x.cpu().numpy() for c, x in single.items()}
    m_np = {c: x.cpu().numpy() for c, x in multi.items()}
    cost = np.zeros((n, m))
    maps = {c: np.empty((n, m, d), dtype=np.int64) for c in channels if c not in fixed_inner}
    reps = np.empty((n, m, g), dtype=np.int64)
    for u in range(n):
        for v in range(m):
            sigma = {}
            for c in channels:  # dims first, from the rep-free entries (or the identity rep order)
                start = s_np[c][u, v] if c in s_np else m_np[c][u, v][eye_g, eye_g].sum(0)
                sigma[c] = eye_d if c in fixed_inner else assignment(start)
            pi = eye_g
            for _ in range(rounds):
                # rep order: C[p, h] = sum_c sum_j dims_c[p, h, sigma_c(j), j]
                rep_cost = sum(x[u, v][:, :, sigma[c], eye_d].sum(-1) for c, x in m_np.items())
                new_pi = assignment(rep_cost)
                new_sigma = {}
                for c in channels:
                    if c in fixed_inner:
                        new_sigma[c] = eye_d
                        continue
                    dims = s_np[c][u, v].copy() if c in s_np else np.zeros((d, d))
                    if c in m_np:
                        dims += m_np[c][u, v][new_pi, eye_g].sum(0)
                    new_sigma[c] = assignment(dims)
                stable = np.array_equal(new_pi, pi) and all(np.array_equal(new_sigma[c], sigma[c]) for c in channels)
                pi, sigma = new_pi, new_sigma
                if stable:
                    break
            total = sum(s_np[c][u, v][sigma[c], eye_d].sum() for c in s_np)
            total += sum(x[u, v][pi, eye_g][:, sigma[c], eye_d].sum() for c, x in m_np.items())
            cost[u, v] = total
            reps[u, v] = pi
            for c in maps:
                maps[c][u, v] = sigma[c]
    inner = {c: torch.from_numpy(p) for c, p in maps.items()}
    inner[group] = torch.from_numpy(reps)
    return torch.from_numpy(cost), inner
