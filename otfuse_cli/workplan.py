"""The plan of work of a fusion, from the checkpoints' headers alone (`--dry-run`): every space with its
widths and features, the floating-point work of its costs, how many times it may be solved, and an estimate
of the run's peak memory — printed before a single weight is read, so a user can see what a 7B pair asks
of the machine.

The estimates follow the code's own paths (alignment/cost.py, weights.py, fusion.py): plain features are
folded into a float64 cross term entry by entry, head channels are kept whole, one float64 cost per space
is live at a time plus its reduced copy for the solver, small checkpoints are cached as float32, and the
output is written tensor by tensor. benchmarks/scale.py measures the real peaks beside them."""

from __future__ import annotations

import math

from otfuse_cli.alignment.weights import CACHE_LIMIT, float32_bytes
from otfuse_cli.options import AlignOptions

F32, F64 = 4, 8


def _numel(ckpt, name: str) -> int:
    return math.prod(ckpt.shape(name)) if name in ckpt else 0


# A solve's work in GFLOP-equivalents (what float32 products, 182 GFLOP/s on the 2-core benchmark machine,
# compute in the same time). lapjvs on costs between independent random Llamas took 3.06 s at n = 5,632 (3.1 x
# n·m·min(n, m)) and 8.5 s at n = 11,008 with sketched costs (1.2 x): 2 x is the estimate. POT's log-domain
# Sinkhorn: about 2e4 x n·m (its usual thousand iterations of two float64 log-sum-exps).
SOLVE_WORK = {"exact": lambda n, m: 2.0 * n * m * min(n, m), "sinkhorn": lambda n, m: 2e4 * n * m}


def solve_gflops(n: int, m: int, solver: str) -> float:
    return SOLVE_WORK[solver](n, m) / 1e9


def space_work(anchor_ckpt, anchor_space, parent_space, sweeps: int, sketch: int | None = None,
               solver: str = "exact") -> dict:
    """One space: widths, feature columns per unit (plain and per head dim), cost FLOPs and the solver's
    work per solve, and the float64 bytes its cost step holds at once."""
    n, m = parent_space.size, anchor_space.size
    plain = heads = weighted = 0
    largest, rep = 0, 1
    for entry in anchor_space.entries:
        numel = _numel(anchor_ckpt, entry.tensor)
        largest = max(largest, numel)
        per_unit = numel // max(1, m)
        if entry.inner > 1 or entry.group:
            heads += per_unit // entry.inner
            # a grouped entry (a GQA group's query heads, reorderable) keeps its G rep blocks as rows: its gram
            # is (n·G·d) x (m·G·d) over per_unit / (G·d) columns, G times a plain head channel's products
            grouped = entry.rep if entry.group else 1
            weighted += per_unit // entry.inner * grouped
            rep = max(rep, grouped)
        else:
            plain += per_unit
    d = max((e.inner for e in anchor_space.entries), default=1)
    # with --sketch D the plain columns are hashed (additions) into D buckets: one (n, D) x (D, m) product
    flops = 2 * n * m * (min(plain, sketch) if sketch else plain) + 2 * (n * d) * (m * d) * weighted
    # cross term + cost + normalised cost + the solver's reduced copy; head grams (n·G·d)x(m·G·d); one entry's
    # float64 features on both sides and its moved float32 copy
    live = F64 * (4 * n * m + (n * rep * d) * (m * rep * d) * (2 if heads else 0)) + (2 * F64 + F32) * largest
    return {"space": anchor_space.name, "kind": anchor_space.kind, "width": [n, m], "plain_features": plain,
            "head_features": heads, "head_dim": d if heads else 0, "solves": 1 + sweeps,
            "cost_gflops": flops / 1e9, "solve_gflops": solve_gflops(n, m, solver), "live_bytes": live}


def plan_of_work(parents, options: AlignOptions, merges: bool) -> dict:
    """Spaces, work and memory of fusing `parents` (pipeline.Parents) with `options`, from headers only.
    merges: whether a model is merged and written (`fuse`), or only plans (`align`)."""
    anchor = parents.anchor
    ckpt = parents.ckpts[anchor]
    spec = parents.specs[anchor]
    others = [k for k in range(len(parents.ckpts)) if k != anchor]
    sweeps = options.sweeps if options.align == "weights" else 0
    pairs = zip(spec.spaces, parents.specs[others[0]].spaces)
    sketch = options.sketch if options.align == "weights" else None
    spaces = [] if options.align == "none" else [space_work(ckpt, sa, sp, sweeps, sketch, options.solver)
                                                 for sa, sp in pairs]
    sizes = [c.size_on_disk() for c in parents.ckpts]
    f32 = [float32_bytes(c) for c in parents.ckpts]
    params = f32[anchor] // F32
    largest = max((_numel(ckpt, name) for name in ckpt.keys()), default=0)
    cache = sum(b for b in f32 if b <= CACHE_LIMIT) if spaces else 0
    # merging streams tensor by tensor: each parent's moved copy of the largest tensor (its own dtype, at most
    # float32) and the output tensor; the writer holds nothing once a tensor is written
    merge_live = 0 if not merges else F32 * largest * (len(parents.ckpts) + 1)
    align_live = max((s["live_bytes"] for s in spaces), default=0)
    # each barycentric round aligns every parent, the anchor too, to a reference written like the anchor
    from otfuse_cli.pipeline import barycentric_rounds

    rounds = barycentric_rounds(parents, options)  # at most: children of one model skip them
    alignments = len(others) + (rounds * len(parents.ckpts) if spaces else 0)
    total_flops = sum(s["cost_gflops"] * s["solves"] for s in spaces) * alignments
    total_solves = sum(s["solve_gflops"] * s["solves"] for s in spaces) * alignments
    return {"family": spec.family, "models": len(parents.ckpts), "anchor": anchor, "align": options.align,
            "parameters": params, "read_bytes": sum(sizes), "most_solves_per_space": 1 + sweeps if spaces else 0,
            "cost_gflops": total_flops, "solve_gflops": total_solves,
            "pair_alignments": alignments, "scratch_bytes": sizes[anchor] if rounds and spaces else 0,
            "peak_bytes_estimate": cache + max(align_live, merge_live),
            "float32_cache_bytes": cache, "spaces": spaces}
