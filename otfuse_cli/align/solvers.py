"""OT solvers for one cost matrix: exact (linear assignment or network simplex) and entropic (Sinkhorn)."""

from __future__ import annotations

import warnings

import numpy as np
import ot
from scipy.optimize import linear_sum_assignment

from otfuse_cli.errors import OtfuseError


def marginal(features, n: int, kind: str) -> np.ndarray:
    """Support masses: uniform, or proportional to each unit's feature norm (importance). `features` has a
    mass(order) method (align.cost.Features)."""
    if kind == "uniform" or features is None:
        return np.full(n, 1.0 / n)
    order = {"l1": 1, "l2": 2}.get(kind)
    if order is None:
        raise OtfuseError(f"unknown marginals {kind!r}; use uniform, l1 or l2")
    mass = features.mass(order) + 1e-12
    return mass / mass.sum()


def normalize(cost: np.ndarray, how: str) -> np.ndarray:
    """Cost scaling: makes --reg relative to the cost scale (mean by default) rather than absolute."""
    if how == "none":
        return cost
    if how not in ("mean", "max"):
        raise OtfuseError(f"unknown cost normalisation {how!r}; use mean, max or none")
    scale = float(cost.mean() if how == "mean" else cost.max())
    return cost / scale if scale > 0 else cost


def solve(cost: np.ndarray, a: np.ndarray, b: np.ndarray, solver: str = "exact", reg: float = 0.01) -> tuple[np.ndarray, dict]:
    """Plan P (n x m) with marginals a, b minimising <P, cost>, plus solver diagnostics."""
    cost = np.asarray(cost, dtype=np.float64)
    if not np.all(np.isfinite(cost)):
        raise OtfuseError("alignment cost contains NaN or Inf (a parent has non-finite weights or activations)")
    n, m = cost.shape
    if solver == "exact":
        if n == m and np.allclose(a, 1.0 / n) and np.allclose(b, 1.0 / m):
            rows, cols = linear_sum_assignment(cost)
            plan = np.zeros((n, m))
            plan[rows, cols] = 1.0 / n
            return plan, {"solver": "assignment"}
        # The default numItermax (1e5) silently returns non-optimal plans from ~3,000 neurons on.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan, log = ot.emd(a, b, cost, numItermax=max(1_000_000, 50 * n * m), log=True)
        if log.get("warning"):
            raise OtfuseError(f"exact OT did not converge on a {n}x{m} problem: {log['warning']}")
        return np.asarray(plan), {"solver": "emd"}
    if solver == "sinkhorn":
        if reg <= 0:
            raise OtfuseError("--reg must be positive for the sinkhorn solver")
        with warnings.catch_warnings():  # log domain: stable at small reg where the plain kernel underflows
            warnings.simplefilter("ignore")
            plan = ot.sinkhorn(a, b, cost, reg, method="sinkhorn_log", numItermax=5000, stopThr=1e-9)
        plan = np.asarray(plan)
        if not np.all(np.isfinite(plan)):
            raise OtfuseError("sinkhorn diverged; increase --reg")
        err = float(np.abs(plan.sum(1) - a).sum() + np.abs(plan.sum(0) - b).sum())
        return plan, {"solver": "sinkhorn", "marginal_error": err}
    raise OtfuseError(f"unknown solver {solver!r}; use exact or sinkhorn")


def match(cost: np.ndarray) -> np.ndarray:
    """Hard one-to-one matching for within-unit maps: perm[j] = parent index moved to anchor index j."""
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(cost.shape[1], dtype=np.int64)
    perm[cols] = rows
    return perm
