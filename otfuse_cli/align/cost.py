"""Cost matrices between a parent's units and the anchor's, from per-unit features.

Features come grouped by channel: "" holds plain per-unit vectors (n, D); a head channel holds
(n, d, D) per within-unit dimension. Unit cost = plain cost + for each channel the cost of the best
within-unit matching (computed for every unit pair, which also yields the inner maps)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from otfuse_cli.align.solvers import match
from otfuse_cli.errors import OtfuseError

METRICS = ("sqeuclidean", "cosine")


@dataclass
class Features:
    plain: list[torch.Tensor] = field(default_factory=list)  # each (n, D)
    channels: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # each (n, d, D)

    def add(self, entry, x: torch.Tensor) -> None:
        """x: (units, inner, D) slices of one entry; within-unit dims go to the entry's channel."""
        if entry.inner > 1:
            self.channels.setdefault(entry.channel, []).append(x)
        else:
            self.plain.append(x.reshape(x.shape[0], -1))

    def empty(self) -> bool:
        return not self.plain and not self.channels

    def parts(self) -> list[torch.Tensor]:
        return list(self.plain) + [x.reshape(x.shape[0], -1) for xs in self.channels.values() for x in xs]

    def flat(self) -> np.ndarray:
        return torch.cat(self.parts(), 1).double().cpu().numpy()

    def mass(self, order: int) -> np.ndarray:
        """Per-unit L1 or L2 norm of all features, accumulated entry by entry (no concatenated copy)."""
        total = sum(x.double().abs().pow(order).sum(1) for x in self.parts())
        return total.pow(1.0 / order).cpu().numpy()


def pairwise(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """Cost between rows of x (..., n, D) and rows of y (..., m, D)."""
    x, y = x.double(), y.double()
    if metric == "sqeuclidean":
        return (torch.cdist(x, y) ** 2).clamp_min(0)
    if metric == "cosine":
        xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        yn = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return 1.0 - xn @ yn.transpose(-1, -2)
    raise OtfuseError(f"unknown ground metric {metric!r}; use {' or '.join(METRICS)}")


def plain_cost(xs: list[torch.Tensor], ys: list[torch.Tensor], metric: str) -> torch.Tensor:
    """pairwise() over the concatenation of the entries, accumulated one entry at a time in float64, so a
    residual stream touching every tensor never needs a concatenated copy of the model."""
    if metric not in METRICS:
        raise OtfuseError(f"unknown ground metric {metric!r}; use {' or '.join(METRICS)}")
    dot = nx = ny = 0
    for x, y in zip(xs, ys):
        x, y = x.double(), y.double()
        dot = dot + x @ y.T
        nx, ny = nx + (x * x).sum(1), ny + (y * y).sum(1)
    if metric == "sqeuclidean":
        return (nx[:, None] + ny[None, :] - 2 * dot).clamp_min(0)
    return 1.0 - dot / (nx.sqrt()[:, None] * ny.sqrt()[None, :]).clamp_min(1e-24)


def unit_cost(parent: Features, anchor: Features, metric: str, fixed_inner: tuple[str, ...] = ()):
    """(cost (n, m) numpy, inner maps {channel: (n, m, d) LongTensor})."""
    cost = None
    if parent.plain:
        cost = plain_cost(parent.plain, anchor.plain, metric)
    inner = {}
    for channel, xs in parent.channels.items():
        xp = torch.cat(xs, -1)  # (n, d, D)
        xa = torch.cat(anchor.channels[channel], -1)  # (m, d, D)
        n, m, d = xp.shape[0], xa.shape[0], xp.shape[1]
        dims = pairwise(xp[:, None], xa[None, :], metric)  # (n, m, d, d)
        if channel in fixed_inner:  # e.g. RoPE pairs: within-head order must stay
            c = dims.diagonal(dim1=-2, dim2=-1).sum(-1)
        else:
            perms = np.empty((n, m, d), dtype=np.int64)
            flat = dims.cpu().numpy()
            for u in range(n):
                for v in range(m):
                    perms[u, v] = match(flat[u, v])
            perm_t = torch.from_numpy(perms).to(dims.device)
            c = dims.gather(2, perm_t.unsqueeze(2)).squeeze(2).sum(-1)  # sum_j dims[u, v, perm[j], j]
            inner[channel] = perm_t.cpu()
        cost = c if cost is None else cost + c
    return cost.cpu().numpy(), inner
