"""OT solvers for one cost matrix, and the support masses and cost scalings they take. Each is one function
in a registry; the registries' keys are the CLI's choices. POT and SciPy are imported on first use, so the
command line can check its options without loading them."""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np

from otfuse_cli.errors import OtfuseError

# ---------------------------------------------------------------- support masses


def _uniform(features, n: int) -> np.ndarray:
    return np.full(n, 1.0 / n)


def _norm_mass(order: int):
    def mass(features, n: int) -> np.ndarray:
        """Proportional to each unit's feature norm (importance)."""
        if features is None:
            return _uniform(features, n)
        m = features.mass(order) + 1e-12
        return m / m.sum()
    return mass


MARGINALS: dict[str, Callable] = {"uniform": _uniform, "l1": _norm_mass(1), "l2": _norm_mass(2)}


def marginal(features, n: int, kind: str) -> np.ndarray:
    """Support masses of n units; `features` has a mass(order) method (align.cost.Features)."""
    return MARGINALS[kind](features, n)


# ---------------------------------------------------------------- cost scaling (makes --reg relative)

COST_NORMS: dict[str, Callable[[np.ndarray], float]] = {
    "mean": lambda cost: float(cost.mean()),
    "max": lambda cost: float(cost.max()),
    "none": lambda cost: 1.0,
}


def normalize(cost: np.ndarray, how: str) -> np.ndarray:
    scale = COST_NORMS[how](cost)
    return cost / scale if scale > 0 else cost


# ---------------------------------------------------------------- solvers: (cost, a, b, reg) -> (plan, info)
# A plan is a dense (n, m) coupling, or for a hard plan between equal widths with uniform masses the index
# vector src (src[v] = the row sent to column v): the coupling it stands for is 1/n at (src[v], v).


def assignment(cost: np.ndarray) -> np.ndarray:
    """src[v] = the row assigned to column v in a minimum-cost one-to-one matching of a square cost.

    Also the within-unit maps (perm[j] = parent dim moved to anchor dim j). lapx's Jonker-Volgenant solver
    with its float32 kernel: 3-4.5x faster than SciPy from n = 2,048 on the costs two independent models give
    (benchmarks/assignment.py), and the same plans on every size measured there and in the tests.
    Row then column minima are subtracted first: that changes no assignment's rank, and leaves float32 its
    precision for the differences that decide the matching (raw squared distances share a large offset).

    Where every column's least cost is on the diagonal, the identity is optimal without a solve: any matching
    costs at least the sum of the column minima, which the identity attains. Children of one pre-trained
    model are such pairs; a permuted child is not, and is solved."""
    if identity_is_optimal(cost):
        return np.arange(cost.shape[1], dtype=np.int64)
    import lap

    reduced = cost - cost.min(1, keepdims=True)
    reduced -= reduced.min(0, keepdims=True)
    _, rows, cols = lap.lapjvs(reduced, prefer_float32=True)
    src = np.empty(cost.shape[1], dtype=np.int64)
    src[cols] = rows
    return src


def identity_is_optimal(cost: np.ndarray) -> bool:
    """A square cost whose every column is least on the diagonal: no matching costs less than the identity."""
    return cost.shape[0] == cost.shape[1] and bool((np.diagonal(cost) <= cost.min(0)).all())


def exact(cost: np.ndarray, a: np.ndarray, b: np.ndarray, reg: float, max_iter: int = 0) -> tuple[np.ndarray, dict]:
    """Hard plans: linear assignment for equal widths and uniform masses (an index vector), else the
    network simplex (a dense coupling)."""
    n, m = cost.shape
    if n == m and np.allclose(a, 1.0 / n) and np.allclose(b, 1.0 / m):
        return assignment(cost), {"solver": "identity" if identity_is_optimal(cost) else "assignment"}
    import ot

    # The default numItermax (1e5) silently returns non-optimal plans from ~3,000 neurons on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan, log = ot.emd(a, b, cost, numItermax=max(1_000_000, 50 * n * m), log=True)
    if log.get("warning"):
        raise OtfuseError(f"exact OT did not converge on a {n}x{m} problem: {log['warning']}")
    return np.asarray(plan), {"solver": "emd"}


# Sinkhorn's budget: it stops when a marginal is met to SINKHORN_STOP (L2, POT's criterion) or when its
# iterations (--max-iter) run out; a plan whose marginals are then still off by more than SINKHORN_TOL (L1
# over both) did not converge and is refused. Small --reg converges slowly; a too small one never does. Never
# seconds: a clock would cut the solve at another iterate on a busier machine (--time-limit only aborts).
SINKHORN_MAX_ITER = 5000
SINKHORN_CHUNK = 100  # iterations per POT call between --time-limit checks (a multiple of POT's 10-step check)
SINKHORN_STOP = 1e-9
SINKHORN_TOL = 1e-3


def sinkhorn(cost: np.ndarray, a: np.ndarray, b: np.ndarray, reg: float,
             max_iter: int = SINKHORN_MAX_ITER) -> tuple[np.ndarray, dict]:
    """Soft plans: entropic OT in the log domain, stable at small reg where the plain kernel underflows. Run
    in chunks that resume from the last dual potentials (the same iterates as one long run), so that an
    opt-in --time-limit can abort between them."""
    import ot

    from otfuse_cli import deadline

    if not (reg > 0 and np.isfinite(reg)):
        raise OtfuseError(f"--reg must be a positive finite number for the sinkhorn solver, got {reg!r}")
    done, warm = 0, None
    while True:
        deadline.check("solving Sinkhorn")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-convergence is judged below, by the marginals
            plan, log = ot.sinkhorn(a, b, cost, reg, method="sinkhorn_log",
                                    numItermax=min(SINKHORN_CHUNK, max_iter - done), stopThr=SINKHORN_STOP,
                                    log=True, warmstart=warm)
        done += log["niter"] + 1
        warm = (log["log_u"], log["log_v"])
        converged = log["err"] and log["err"][-1] < SINKHORN_STOP
        if converged or done >= max_iter:
            break
    plan = np.asarray(plan)
    if not np.all(np.isfinite(plan)):
        raise OtfuseError(f"sinkhorn diverged at --reg {reg:g}; use a larger --reg (e.g. 0.01)")
    err = float(np.abs(plan.sum(1) - a).sum() + np.abs(plan.sum(0) - b).sum())
    if err > SINKHORN_TOL:
        raise OtfuseError(f"sinkhorn did not converge on a {cost.shape[0]}x{cost.shape[1]} problem within {done} "
                          f"iterations (marginal error {err:.1e}) at --reg {reg:g}; use a larger --reg (e.g. 0.01) "
                          "or --max-iter")
    return plan, {"solver": "sinkhorn", "marginal_error": err, "iterations": done}


SOLVERS: dict[str, Callable[..., tuple[np.ndarray, dict]]] = {"exact": exact, "sinkhorn": sinkhorn}


def solve(cost: np.ndarray, a: np.ndarray, b: np.ndarray, solver: str = "exact",
          reg: float = 0.01, max_iter: int = SINKHORN_MAX_ITER) -> tuple[np.ndarray, dict]:
    """Plan P (n x m) with marginals a, b minimising <P, cost>, plus solver diagnostics."""
    cost = np.asarray(cost, dtype=np.float64)
    if not np.all(np.isfinite(cost)):
        raise OtfuseError("alignment cost contains NaN or Inf (a parent has non-finite weights or activations)")
    if solver not in SOLVERS:
        raise OtfuseError(f"unknown solver {solver!r}; use {' or '.join(SOLVERS)}")
    return SOLVERS[solver](cost, a, b, reg, max_iter)
