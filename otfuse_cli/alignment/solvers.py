"""OT solvers for one cost matrix, and the support masses and cost scalings they take. Each is one function
in a registry; the registries' keys are the CLI's choices. POT and SciPy are imported on first use, so the
command line can check its options without loading them."""

from __future__ import annotations

import math
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


# Sinkhorn's budget: a solve stops once its plan meets both marginals to SINKHORN_STOP (L1 over both, of a
# total mass of 1) or when its iterations (--max-iter) run out; a plan whose marginals are then still off by
# more than SINKHORN_TOL did not converge and is refused. Never seconds: a clock would cut the solve at another
# iterate on a busier machine (--time-limit only aborts, checked between units of work).
SINKHORN_MAX_ITER = 5000
SINKHORN_CHUNK = 100  # iterations between --time-limit checks
SINKHORN_STOP = 1e-9
SINKHORN_TOL = 1e-3
SINKHORN_WARM = 20  # plain Sinkhorn iterations before Newton steps, and after a Newton step that failed
# epsilon scaling: solve at reg * 2^k, ..., reg * 2, reg, from the largest reg * 2^k <= SCALE_START * the
# cost's span, each stage to SCALE_STOP (after SCALE_WARM plain iterations) and warm-starting the next
SCALE_FACTOR = 2.0
SCALE_START = 0.1
SCALE_STOP = 1e-2
SCALE_WARM = 10
# Newton: a scaling leaving [e^-30, e^30] is folded into its potential; one step moves a potential by at most
# 20 nats (in units of reg); conjugate gradients stop at min(0.1, err^0.75) of the first residual or after
# 500 iterations. Chosen on the problems of tests/test_sinkhorn_speed.py and benchmarks/sinkhorn_speed.py.
_ABSORB = 30.0
_STEP = 20.0
_FORCE = 0.75
_CG_MAX = 500


class _Kernel:
    """Entropic OT in scaling form on top of dual potentials: the plan is u_i K_ij v_j with
    K_ij = exp((f_i + g_j - C_ij) / reg). Whenever a scaling leaves [e^-30, e^30] it is folded into its
    potential and K is rebuilt from the cost, so K never overflows and underflows only where the plan is
    below e^-640, at any reg: the log domain's stability at the price of matrix-vector products, with no
    matrix-sized temporary per iteration. The rows are met after every update (u = a / K v); the columns'
    sums c, and their L1 error `err`, are what is left to converge.

    Torch float64 on the cost's device (tensor methods only: this module loads without torch): one
    implementation for the CPU and a GPU (--device), whose products are the whole cost of an iteration.

    `work` counts iterations: the first (a log-domain one), then each Sinkhorn iteration, conjugate-gradient
    step and step-length trial, each a product with K and one with K^T. Rebuilding K (a rescale, or folding
    the scalings in) is not counted: it happens at most once per stage or per Newton step."""

    def __init__(self, cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, reg: float):
        self.cost, self.a, self.b, self.reg = cost, a, b, reg
        n, m = cost.shape
        self.block = max(1, (1 << 20) // max(m, n))  # rows per temporary of the blocked passes (8 MB)
        # one Sinkhorn iteration in the log domain from zero potentials: every column of K then holds mass b_j
        # and every row at least a_i * min(b), however small reg is
        self.f = self._transform(cost, cost.new_zeros(m), a)
        self.g = self._transform(cost.T, self.f, b)
        self.K = cost.new_empty(cost.shape)
        self._rebuild()
        self.work = 1

    def _transform(self, cost: torch.Tensor, other: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """reg * (log mass_i - logsumexp_j((other_j - cost_ij) / reg)): the potential that meets one side
        given the other (a c-transform), in row blocks."""
        out = cost.new_empty(cost.shape[0])
        for s in range(0, cost.shape[0], self.block):
            t = other - cost[s:s + self.block]
            t /= self.reg
            top = t.max(1).values
            t -= top[:, None]
            t.exp_()
            out[s:s + self.block] = self.reg * (mass[s:s + self.block].log() - top - t.sum(1).log())
        return out

    def _rebuild(self) -> None:
        """K from the potentials; the scalings start again at 1, the rows met and the columns measured."""
        for s in range(0, self.K.shape[0], self.block):
            k = self.K[s:s + self.block]
            k.copy_(self.cost[s:s + self.block]).neg_().add_(self.g)  # g_j - C_ij, in place
            k += self.f[s:s + self.block, None]
            k /= self.reg
            k.exp_()
        self.u = self.K.new_ones(self.K.shape[0])
        self.v = self.K.new_ones(self.K.shape[1])
        self._rows()

    def _rows(self) -> None:
        """Meet the rows (u = a / K v), then measure the columns: c, and the L1 marginal error."""
        self.u = self.a / (self.K @ self.v)
        self.kt = self.K.T @ self.u
        self.c = self.v * self.kt
        self.err = float((self.c - self.b).abs().sum())

    def _absorb(self) -> None:
        lu, lv = self.u.log(), self.v.log()
        if max(float(lu.abs().max()), float(lv.abs().max())) > _ABSORB:
            self.f += self.reg * lu
            self.g += self.reg * lv
            self._rebuild()

    def rescale(self, reg: float) -> None:
        """Go on at another reg from the current potentials (epsilon scaling's warm start)."""
        self.f += self.reg * self.u.log()
        self.g += self.reg * self.v.log()
        self.reg = reg
        self._rebuild()

    def sinkhorn(self, iterations: int, stop: float) -> None:
        """Plain Sinkhorn iterations (columns, then rows), ending early once err <= stop."""
        for _ in range(iterations):
            if self.err <= stop:
                return
            self.v = self.b / self.kt
            self._rows()
            self.work += 1
            self._absorb()

    def newton(self, budget: int) -> bool:
        """One Newton step on the column potentials with the rows kept met (at most `budget` iterations):
        the Hessian, in units of reg, is H = diag(c) - P^T diag(1/a) P (positive semi-definite, the constant
        vector its null space); H x = b - c is solved by conjugate gradients preconditioned by H's diagonal,
        then v *= exp(t x) for the first t of 1, 1/4, 1/16 (capped at 20 nats) that lowers err. False, with
        nothing changed, if none does."""
        from otfuse_cli import deadline

        K, u, v, c = self.K, self.u, self.v, self.c
        w = u * u / self.a
        diag = v.new_zeros(v.shape)
        for s in range(0, K.shape[0], self.block):
            diag += K[s:s + self.block].square().T @ w[s:s + self.block]
        inv = 1.0 / (c - v * v * diag).maximum(1e-12 * c + 1e-300)
        r = self.b - c
        x, res = r.new_zeros(r.shape), r.clone()
        z = inv * res
        p, rz = z.clone(), float(res @ z)
        goal = min(0.1, self.err ** _FORCE) * math.sqrt(float(r @ r))
        for i in range(min(_CG_MAX, budget - 3)):
            if i and i % SINKHORN_CHUNK == 0:
                deadline.check("solving Sinkhorn")
            hp = c * p - v * (K.T @ (w * (K @ (v * p))))
            self.work += 1
            curv = float(p @ hp)
            if not curv > 0:
                break
            x += (rz / curv) * p
            res -= (rz / curv) * hp
            if math.sqrt(float(res @ res)) <= goal:
                break
            z = inv * res
            rz, rz_old = float(res @ z), rz
            p = z + (rz / rz_old) * p
        x -= x.mean()
        peak = float(x.abs().max())
        if not peak > 0:
            return False
        t = min(1.0, _STEP / peak)
        before = (self.u, self.v, self.kt, self.c, self.err)
        for _ in range(3):
            self.v = v * (t * x).exp()
            self._rows()
            self.work += 1
            if self.err < before[4]:
                self._absorb()
                return True
            t /= 4
        self.u, self.v, self.kt, self.c, self.err = before
        return False

    def plan(self) -> torch.Tensor:
        plan = self.K  # the kernel's memory becomes the plan's
        plan *= self.u[:, None]
        plan *= self.v[None, :]
        return plan


def scaling_schedule(cost, reg: float) -> list[float]:
    """The regs epsilon scaling solves at, largest first, ending at reg (only reg where reg is already at
    least SCALE_START / SCALE_FACTOR of the cost's span)."""
    span = float(cost.max() - cost.min())
    regs = [reg]
    while regs[-1] * SCALE_FACTOR <= SCALE_START * span:
        regs.append(regs[-1] * SCALE_FACTOR)
    return regs[::-1]


def sinkhorn(cost, a: np.ndarray, b: np.ndarray, reg: float,
             max_iter: int = SINKHORN_MAX_ITER) -> tuple[np.ndarray, dict]:
    """Soft plans: the entropic OT plan, argmin <P, cost> - reg * H(P) with marginals a and b (what POT's
    ot.sinkhorn computes, same reg), to an L1 marginal error of SINKHORN_STOP. The cost: numpy (solved on the
    CPU) or a torch tensor, solved on its device; the plan comes back as numpy.

    Stable at any reg (see _Kernel). Fast: epsilon scaling (scaling_schedule), and at each reg a few plain
    Sinkhorn iterations, then Newton steps on the dual (each a conjugate-gradient solve whose iterations
    cost what a Sinkhorn iteration costs); plain iterations take over again whenever a Newton step fails to
    lower the marginal error. Plain Sinkhorn converges linearly at a rate small reg makes slow: on two
    Fashion-MNIST MLPs' first layer (512 units, reg 0.01) 5,000 iterations left an L1 error of 1.4e-6 and
    1e-8 took 89,000; this reaches 1e-9 in a few hundred. Every stopping rule counts iterations (max_iter
    in all, the epsilon-scaling stages included), so the same inputs give the same bytes however busy the
    machine is; --time-limit is checked between units of work and only aborts."""
    import torch

    from otfuse_cli import deadline

    if not (reg > 0 and np.isfinite(reg)):
        raise OtfuseError(f"--reg must be a positive finite number for the sinkhorn solver, got {reg!r}")
    deadline.check("solving Sinkhorn")
    cost = torch.as_tensor(cost).double()
    a, b = (torch.as_tensor(np.asarray(x), dtype=torch.float64, device=cost.device) for x in (a, b))
    regs = scaling_schedule(cost, reg)
    state = _Kernel(cost, a, b, regs[0])
    for stage in regs:
        if stage != state.reg:
            state.rescale(stage)
        last = stage == reg
        stop, plain = (SINKHORN_STOP, SINKHORN_WARM) if last else (SCALE_STOP, SCALE_WARM)
        while state.err > stop and state.work < max_iter and math.isfinite(state.err):
            if plain:
                chunk = min(plain, SINKHORN_CHUNK, max_iter - state.work)
                state.sinkhorn(chunk, stop)
                plain -= chunk
            elif max_iter - state.work < 4 or not state.newton(max_iter - state.work):
                plain = SINKHORN_WARM
            deadline.check("solving Sinkhorn")
    done, plan = state.work, state.plan().cpu().numpy()
    a, b = a.cpu().numpy(), b.cpu().numpy()
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
    """Plan P (n x m) (numpy, on the CPU) with marginals a, b minimising <P, cost>, plus solver diagnostics.
    cost: numpy, or a torch tensor, which Sinkhorn solves on its device and the exact solvers take to the CPU."""
    if isinstance(cost, np.ndarray) or not hasattr(cost, "isfinite"):
        cost = np.asarray(cost, dtype=np.float64)
        finite = bool(np.all(np.isfinite(cost)))
    else:
        cost = cost.double()
        finite = bool(cost.isfinite().all())
    if not finite:
        raise OtfuseError("alignment cost contains NaN or Inf (a parent has non-finite weights or activations)")
    if solver not in SOLVERS:
        raise OtfuseError(f"unknown solver {solver!r}; use {' or '.join(SOLVERS)}")
    if solver != "sinkhorn" and not isinstance(cost, np.ndarray):
        cost = cost.cpu().numpy()
    return SOLVERS[solver](cost, a, b, reg, max_iter)
