"""The one alignment engine: walks a Spec's spaces in order, builds each cost from a feature provider
(weights or activations), solves OT, breaks ties between identical units by the provider's tie features
(ties.py), and refines over all spaces until no plan changes (bounded)."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from otfuse_cli import deadline
from otfuse_cli.alignment.cost import unit_cost
from otfuse_cli.alignment.linear import canonical_map, covariances
from otfuse_cli.alignment.solvers import marginal, normalize, solve
from otfuse_cli.alignment.ties import break_ties, tie_classes
from otfuse_cli.alignment.transport import Plan
from otfuse_cli.errors import OtfuseError
from otfuse_cli.arch.model import Spec
from otfuse_cli.options import AlignOptions


def plan_stats(cost: np.ndarray, plan: np.ndarray, info: dict) -> dict:
    """plan: a dense coupling, or a hard plan's index vector (see solvers)."""
    n, m = cost.shape
    stats = {"width": [n, m], **info}
    if plan.ndim == 1:
        cols = np.arange(m)
        stats.update(cost_after=float(cost[plan, cols].sum() / n), cost_before=float(np.trace(cost) / n),
                     stay=float((plan == cols).mean()), entropy=0.0)
        return stats
    stats["cost_after"] = float((plan * cost).sum())
    if n == m:
        stats["cost_before"] = float(np.trace(cost) / n)
        stats["stay"] = float((plan.argmax(0) == np.arange(m)).mean())
    rows = plan / np.maximum(plan.sum(1, keepdims=True), 1e-300)
    stats["entropy"] = max(0.0, float(-(rows * np.log(np.maximum(rows, 1e-300))).sum(1).mean()))
    return stats


def refinement_sweeps(provider, options: AlignOptions) -> int:
    """The most refinement sweeps align_pair makes (it stops early once no plan changes)."""
    return options.sweeps if getattr(provider, "needs_refinement", True) else 0


def identity_probe_applies(provider, options: AlignOptions) -> bool:
    """Whether align_pair first tries the identity as the answer: exact assignments (the certificate in
    solvers.assignment decides without a solve) on weight features, which refine over all spaces."""
    return options.solver == "exact" and options.marginals == "uniform" and getattr(provider, "needs_refinement", True)


def align_pair(anchor: Spec, parent: Spec, provider, options: AlignOptions,
               on_space: Callable[[str], None] | None = None,
               on_refine: Callable[[str], None] | None = None,
               timings: dict[str, float] | None = None) -> dict[str, Plan]:
    """Plans mapping `parent` onto `anchor`, one per space, by name. on_space(name) follows each space's
    first solve, on_refine(name) each re-solve during refinement (for progress reporting). timings, when
    given, accumulates wall seconds per step (kept out of the plans' stats, which plan files store: they are
    reported, never used in a decision).

    Children of one pre-trained model share its basis: first, every space is solved with the identity taken
    for all the others (refinement's own features). If each answer is the identity, the identity is a fixed
    point of the refinement, which is where the first pass plus one confirming sweep would end, at half the
    feature cost; at the first space that moves (a permuted child, other initialisations) the ordinary first
    pass starts instead."""
    plans: dict[str, Plan] = {}
    timings = {} if timings is None else timings
    clock = [time.perf_counter()]

    def lap(step: str) -> None:
        now = time.perf_counter()
        timings[step] = timings.get(step, 0.0) + now - clock[0]
        clock[0] = now

    # Units with identical features (activations of units dead on every sample) tie: their matching is
    # redone by the provider's tie_features (ties.py), first with the plans solved so far, then, once every
    # space has a plan, with all of them until no tie's matching changes (a dead unit's incoming weights
    # may all be alike where its outgoing ones are not).
    tied: dict[int, tuple] = {}

    def tie_cost(k: int, first_pass: bool) -> np.ndarray:
        pair = provider.tie_features(k, plans, first_pass)
        if pair.empty():
            n, m = parent.spaces[k].size, anchor.spaces[k].size
            return np.zeros((n, m))
        return unit_cost(pair.parent, pair.anchor, options.metric, anchor.spaces[k].fixed_inner,
                         folded=pair.folded(), grams=pair.grams)[0].cpu().numpy()

    def linear_plan(k: int, pair) -> Plan:
        if pair.count < 2:
            raise OtfuseError(f"space {anchor.spaces[k].name!r} has {pair.count} activation row(s); a covariance "
                              "needs at least two (more --samples or --max-tokens)")
        t, t_inv, stats = canonical_map(*covariances(pair, provider.unit_scales(k)), options.ridge)
        lap("solver")
        return Plan(maps=(t, t_inv), stats=stats)

    def solve_space(k: int, first_pass: bool) -> Plan:
        sa, sp = anchor.spaces[k], parent.spaces[k]
        deadline.check(f"aligning space {sa.name}")
        clock[0] = time.perf_counter()
        pair = provider.features(k, plans, first_pass)
        lap("features and cross terms")
        fp, fa = pair.parent, pair.anchor
        if pair.empty():
            if sp.size != sa.size:
                raise OtfuseError(f"space {sa.name!r} has no features to align widths {sp.size} and {sa.size}")
            return Plan.identity(sa.size)
        if options.align == "cca" and sa.linear:
            return linear_plan(k, pair)
        cost, inner = unit_cost(fp, fa, options.metric, sa.fixed_inner, folded=pair.folded(), grams=pair.grams)
        a = marginal(fp, sp.size, options.marginals)
        b = marginal(fa, sa.size, options.marginals)
        cost_n = normalize(cost, options.cost_norm)
        lap("costs")
        # Sinkhorn solves on the cost's device; the exact solvers take it to the CPU (lapjvs, POT's simplex)
        plan, info = solve(cost_n, a, b, options.solver, options.reg, options.max_iter)
        cost = cost.cpu().numpy()
        lap("solver")
        if plan.ndim == 1 and hasattr(provider, "tie_features"):
            classes = tie_classes(cost)
            if classes[0] or classes[1]:
                tied[k] = classes
                plan = break_ties(plan, classes, tie_cost(k, first_pass))
                lap("ties")
        stats = plan_stats(cost, plan, info)
        if plan.ndim == 1:
            return Plan(index=torch.from_numpy(plan), inner=inner, stats=stats)
        return Plan(torch.from_numpy(plan), inner, stats)

    sweeps = refinement_sweeps(provider, options)
    if sweeps and identity_probe_applies(provider, options):
        plans.update({space.name: Plan.identity(space.size) for space in anchor.spaces})
        probed = {}
        # the residual stream touches every tensor: parents from other initialisations fail on a cheap space first
        for k in sorted(range(len(anchor.spaces)), key=lambda k: anchor.spaces[k].kind == "residual"):
            plan = solve_space(k, False)
            if not plan.moves_nothing():
                break
            probed[anchor.spaces[k].name] = plan
        else:  # every space's plan, given the identity everywhere else, is the identity: a fixed point
            plans.update(probed)
            for space in anchor.spaces:
                plans[space.name].stats["sweeps"] = 1
                if on_space:
                    on_space(space.name)
            return plans
        plans.clear()
    for k, space in enumerate(anchor.spaces):
        plans[space.name] = solve_space(k, True)
        if on_space:
            on_space(space.name)
    for _ in range(options.sweeps if tied else 0):
        changed = False
        for k, classes in tied.items():
            old = plans[anchor.spaces[k].name]
            src = break_ties(old.index.numpy(), classes, tie_cost(k, False))
            if not np.array_equal(src, old.index.numpy()):
                changed = True
                stats = {**old.stats, "stay": float((src == np.arange(len(src))).mean())}  # its cost is the same
                plans[anchor.spaces[k].name] = Plan(index=torch.from_numpy(src), inner=old.inner, stats=stats)
        if not changed:
            break
    # A space's refinement cost reads only its neighbours' plans: once it has been re-solved, it is solved
    # again only after one of them changed (the same inputs give the same plan).
    neighbours = [provider.neighbours(k) if hasattr(provider, "neighbours") else None
                  for k in range(len(anchor.spaces))]
    version = {space.name: 0 for space in anchor.spaces}
    read: dict[str, dict[str, int]] = {}  # space -> its neighbours' versions when it was last re-solved
    for sweep in range(sweeps):
        changed = False
        for k, space in enumerate(anchor.spaces):
            inputs = None if neighbours[k] is None else {n: version[n] for n in neighbours[k]}
            if inputs is None or read.get(space.name) != inputs:
                new = solve_space(k, False)
                read[space.name] = inputs
                if not new.same_as(plans[space.name]):
                    changed = True
                    version[space.name] += 1
                plans[space.name] = new
            if on_refine:
                on_refine(space.name)
        if not changed:
            break
    for plan in plans.values():
        plan.stats["sweeps"] = sweep + 1 if sweeps else 0
    return plans
