"""Merge rules: how parents already moved into the anchor's basis combine into one tensor. One function per
rule in a registry whose keys are the `--merge` choices; a rule sees one tensor at a time (streaming), with
the statistic it needs (`needs`) for that tensor from every parent, moved into the anchor's basis too.

With `--base`, every rule receives task vectors tau_k = theta_k - theta_base instead of weights, and the
output is theta_base + rule(tau). The rules that exist without a base (average, RegMean, Fisher) are
unchanged by that: each is a weighted mean whose weights sum to one per element or per row, so it commutes
with subtracting a common base. The task-vector rules (task arithmetic, TIES, DARE) need a base.
Rules import torch only when they run, so the command line can list them without loading it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Callable


def needs(statistic: str | None, elementwise: bool = False, task_vectors: bool = False,
          prepare: Callable | None = None, reads: tuple[str, ...] = ()):
    """Declare which statistic (stats.KINDS) a rule reads (None: weights only); whether each output element
    depends only on the same element of its inputs (then it is applied block by block, fusion.py, and never
    allocates whole-tensor temporaries); whether it only makes sense on task vectors (needs --base); and
    `prepare(blocks, tensor)`, a per-tensor pass over every parent's blocks before merging (TIES: thresholds);
    and which of the options "scale", "density", "seed" it reads (the command line refuses the others)."""
    def mark(fn):
        fn.needs, fn.elementwise, fn.task_vectors, fn.prepare = statistic, elementwise, task_vectors, prepare
        fn.reads = reads
        return fn
    return mark


@dataclass(frozen=True)
class Tensor:
    """What a rule knows about the tensor it merges, besides the parents' values (or a block of them)."""

    name: str
    weights: list  # normalised per-parent weights (sum 1)
    options: object  # MergeOptions
    stats: list | None = None  # the rule's statistic per parent (a block of it for an elementwise rule)
    start: int = 0  # index of the block's first element in the flattened tensor
    seed: int = 0  # DARE's drop masks
    state: object = None  # what `prepare` computed for this tensor


@needs(None, elementwise=True)
def average(xs: list, t: Tensor):
    """Weighted average: F = sum_k w_k * T_k(W_k), accumulated from zero (float32, or float64 inputs)."""
    out = xs[0].new_zeros(xs[0].shape)
    for x, w in zip(xs, t.weights):
        out += w * x
    return out


@needs("gram", reads=("alpha",))
def regmean(xs: list, t: Tensor):
    """RegMean (Jin et al., 2023) for a linear map: W = (sum_k G~_k)^-1 sum_k G~_k W_k in (in, out)
    orientation, G~ = alpha*G + (1-alpha)*diag(G), each G_k weighted by w_k. stats[k] = (G_k, input axis).
    Tensors without Grams (biases, norms, embeddings, convolutions) take the weighted average. Input
    dimensions no parent ever saw (zero diagonal) carry no data: their weights are averaged too."""
    if t.stats is None:
        return average(xs, t)
    import torch

    alpha = t.options.regmean_alpha
    axis = t.stats[0][1]
    grams = []
    for (g, _), w in zip(t.stats, t.weights):
        g = g.double()
        grams.append(w * (alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))))
    total = sum(grams)
    seen = torch.diagonal(total) > 1e-12 * max(float(torch.diagonal(total).max()), 1e-300)
    rhs = sum(g @ x.double().movedim(axis, 0) for g, x in zip(grams, xs))  # (in, out)
    out = average(xs, t).double().movedim(axis, 0)
    block = total[seen][:, seen]
    factor, info = torch.linalg.cholesky_ex(block)
    if int(info) != 0:
        from otfuse_cli.errors import OtfuseError

        raise OtfuseError(f"RegMean: the inputs of {t.name} span too few directions to solve for its weights "
                          f"(singular Gram matrix); use --regmean-alpha below 1")
    out[seen] = torch.cholesky_solve(rhs[seen], factor)
    return out.movedim(0, axis).to(xs[0].dtype)


@needs("fisher", elementwise=True)
def fisher(xs: list, t: Tensor):
    """Fisher-weighted averaging (Matena & Raffel, 2022): theta = sum_k w_k F_k theta_k / sum_k w_k F_k per
    parameter, F the diagonal Fisher; where no parent has information (buffers, unused rows) the average."""
    if t.stats is None:
        return average(xs, t)
    num = sum(w * f.double() * x.double() for f, x, w in zip(t.stats, xs, t.weights))
    den = sum(w * f.double() for f, w in zip(t.stats, t.weights))
    plain = average(xs, t).double()
    informed = den > 1e-30
    return (num / den.clamp_min(1e-300)).where(informed, plain).to(xs[0].dtype)


# ---------------------------------------------------------------- task-vector rules (need --base)

def _summed(xs: list, t: Tensor):
    """sum_k K*w_k tau_k: the plain sum of the task vectors with equal weights (Ilharco et al.'s task
    arithmetic), --weights reweighting it."""
    count = len(xs)
    out = xs[0].new_zeros(xs[0].shape)
    for x, w in zip(xs, t.weights):
        out += count * w * x
    return out


def _elected_mean(xs: list, t: Tensor):
    """TIES' sign election and disjoint mean: the sign of sum_k w_k tau_k per entry, then the weighted mean
    of the entries that are non-zero and agree with it (0 where none does; a zero sum elects no sign)."""
    import torch

    total = xs[0].new_zeros(xs[0].shape)
    for x, w in zip(xs, t.weights):
        total += w * x
    sign = torch.sign(total)
    num, den = torch.zeros_like(total), torch.zeros_like(total)
    for x, w in zip(xs, t.weights):
        agree = (torch.sign(x) == sign) & (x != 0)
        num += torch.where(agree, w * x, 0.0)
        den += torch.where(agree, w, 0.0)
    return torch.where(den > 0, num / den.clamp_min(1e-30), 0.0)


def _dare(xs: list, t: Tensor) -> list:
    """DARE (Yu et al., 2024): each entry of each tau_k kept with probability --density, then divided by it."""
    density = t.options.density
    if density >= 1:
        return xs
    return [x * (keep_mask(t.seed, t.name, k, t.start, x.numel(), density).to(x.device).view(x.shape) / density)
            for k, x in enumerate(xs)]


def _top_magnitude(xs: list, t: Tensor) -> list:
    """TIES' trim: each tau_k keeps the entries whose magnitude is at least its tensor's threshold (the
    --density fraction of largest magnitudes; entries tied with the last one kept are kept too)."""
    return [x.where(x.abs() >= threshold, 0.0) for x, threshold in zip(xs, t.state)]


def _thresholds(blocks: Callable, t: Tensor) -> list[float]:
    """Each parent's magnitude threshold over its whole tensor; blocks(k) yields parent k's float32 blocks."""
    return [magnitude_threshold(lambda k=k: blocks(k), t.options.density) for k in range(len(t.weights))]


@needs(None, elementwise=True, task_vectors=True, reads=("scale",))
def task_arithmetic(xs: list, t: Tensor):
    """Task arithmetic (Ilharco et al., 2023): base + lambda * sum_k tau_k (lambda = --scale)."""
    return t.options.scale * _summed(xs, t)


@needs(None, elementwise=True, task_vectors=True, prepare=_thresholds, reads=("scale", "density"))
def ties(xs: list, t: Tensor):
    """TIES-Merging (Yadav et al., 2023): trim each tau_k to its top --density by magnitude, elect a sign per
    entry by summed mass, take the mean of the agreeing entries, scale by lambda."""
    return t.options.scale * _elected_mean(_top_magnitude(xs, t), t)


@needs(None, elementwise=True, task_vectors=True, reads=("scale", "density", "seed"))
def dare(xs: list, t: Tensor):
    """DARE with task arithmetic: random drop and rescale of each tau_k, then base + lambda * sum."""
    return t.options.scale * _summed(_dare(xs, t), t)


@needs(None, elementwise=True, task_vectors=True, reads=("scale", "density", "seed"))
def dare_ties(xs: list, t: Tensor):
    """DARE's random drop and rescale in place of TIES' trim, then TIES' sign election and disjoint mean."""
    return t.options.scale * _elected_mean(_dare(xs, t), t)


@needs("gram", task_vectors=True, reads=("alpha", "scale", "density"))
def regmean_ties(xs: list, t: Tensor):
    """RegMean on TIES' task vectors: each tau_k trimmed to its top --density and cleared where it disagrees
    with the elected sign, then RegMean's least-squares solve for the linear maps; tensors without Grams take
    TIES' disjoint mean. Scaled by lambda."""
    import torch

    if t.state is None:  # a whole tensor is at hand (RegMean is not blockwise): its thresholds directly
        t = replace(t, state=[magnitude_threshold(lambda x=x: [x.reshape(-1)], t.options.density) for x in xs])
    trimmed = _top_magnitude(xs, t)
    if t.stats is None:
        return t.options.scale * _elected_mean(trimmed, t)
    sign = torch.sign(sum(w * x for w, x in zip(t.weights, trimmed)))
    return t.options.scale * regmean([x.where(torch.sign(x) == sign, 0.0) for x in trimmed], t)


@needs("gram", task_vectors=True, reads=("alpha", "scale", "density", "seed"))
def regmean_dare(xs: list, t: Tensor):
    """RegMean on DARE's task vectors (random drop and rescale); tensors without Grams take their weighted
    average. Scaled by lambda."""
    return t.options.scale * regmean(_dare(xs, t), t)


# ---------------------------------------------------------------- DARE's masks and TIES' thresholds

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def _key(seed: int, name: str, k: int) -> int:
    """64-bit key of one parent's tensor: masks differ between tensors and parents, repeat for a seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}\0{k}".encode()).digest()[:8], "little")


def keep_mask(seed: int, name: str, k: int, start: int, count: int, density: float):
    """Bernoulli(density) keep mask (float32 0/1) of elements start..start+count of parent k's tensor `name`.
    Element i's draw is a counter-based hash (SplitMix64) of (key, i): the same whatever the block size,
    thread count or torch version."""
    import numpy as np
    import torch

    with np.errstate(over="ignore"):
        z = (np.arange(start, start + count, dtype=np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN)
        z += np.uint64(_key(seed, name, k))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    uniform = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1), 53 random bits
    return torch.from_numpy(uniform < density).to(torch.float32)


def magnitude_threshold(blocks: Callable, density: float) -> float:
    """The smallest magnitude among the ceil(density * n) largest |x| of the blocks `blocks()` yields (float32
    tensors), exact, streamed: never a copy of the whole tensor.

    A strided sample of every block brackets the answer [lo, hi]; one more pass counts the magnitudes above hi,
    at hi and at lo, and keeps those strictly inside (about 1% of the tensor, at most BAND_CAP), where the
    exact one is picked. Magnitudes that repeat (zeros of an untouched layer, bf16 steps) are counted, not
    kept. Should the bracket miss or overflow, an exact radix selection on the float32 bits takes over."""
    import math

    import torch

    sample, total = [], 0
    for block in blocks():
        block = block.reshape(-1)
        sample.append(block[::max(1, block.numel() // 4096)].abs())
        total += block.numel()
    if total == 0:
        return 0.0
    rank = max(1, math.ceil(density * total))  # the rank-th largest, counting from 1
    if rank >= total:
        return 0.0  # keep everything
    sample = torch.sort(torch.cat(sample), descending=True).values
    # the sample's rank (a binomial count) is within 6 sd of its expectation but for a chance of 1e-9
    where, spread = rank / total * len(sample), 6 * math.sqrt(len(sample) * density * (1 - density)) + 2
    hi = float(sample[int(where - spread)]) if where - spread >= 0 else math.inf
    lo = float(sample[min(len(sample) - 1, int(where + spread))])
    above = at_hi = at_lo = kept = 0
    inside = []
    for block in blocks():
        mags = block.reshape(-1).abs()
        above += int((mags > hi).sum())
        at_hi += int((mags == hi).sum())
        at_lo += int((mags == lo).sum()) if lo != hi else 0
        inner = mags[(mags > lo) & (mags < hi)]
        kept += inner.numel()
        if kept > BAND_CAP:
            return _radix_threshold(blocks, rank)
        inside.append(inner)
    inside = torch.cat(inside)
    for count, pick in ((above, None), (at_hi, lambda r: hi), (inside.numel(),
                                                               lambda r: float(torch.topk(inside, r).values[-1])),
                        (at_lo, lambda r: lo)):
        if rank <= count:
            return _radix_threshold(blocks, rank) if pick is None else pick(rank)
        rank -= count
    return _radix_threshold(blocks, rank + above + at_hi + inside.numel() + at_lo)


BAND_CAP = 1 << 22  # magnitudes kept inside the bracket (16 MiB); more means the sample misled: radix instead


def _radix_threshold(blocks: Callable, rank: int) -> float:
    """The rank-th largest magnitude by two histogram passes over the float32 bit patterns (non-negative floats
    order like their bits): the high 16 bits, then the low 16 bits inside the bucket that holds it."""
    import torch

    def histogram(select: Callable):
        counts = torch.zeros(1 << 16, dtype=torch.int64)
        for block in blocks():
            bits = block.abs().to(torch.float32).reshape(-1).view(torch.int32)
            counts += torch.bincount(select(bits), minlength=1 << 16).cpu()  # blocks may be on --device
        return counts

    above = torch.flip(histogram(lambda bits: bits >> 16), [0]).cumsum(0)  # entries at or above each bucket
    top = (1 << 16) - 1 - int(torch.nonzero(above >= rank)[0])
    before = int(above[(1 << 16) - 2 - top]) if top < (1 << 16) - 1 else 0  # entries in higher buckets
    within = torch.flip(histogram(lambda bits: bits[(bits >> 16) == top] & 0xFFFF), [0]).cumsum(0)
    bottom = (1 << 16) - 1 - int(torch.nonzero(within >= rank - before)[0])
    return float(torch.tensor([(top << 16) | bottom], dtype=torch.int32).view(torch.float32))


# --scale and --density when not given, per rule: the points study 9 chose on validation (benchmarks/STUDIES.md;
# two SmolLM2 children; the grid: lambda 0.5 or 1, density 0.2 or 0.5), except DARE-TIES' lambda: study 9 tried
# only 1, where every density was far worse than the base, and study 8's validation (four MiniLM children)
# put 0.7 above 1 (66.3 against 63.8). The studies disagree on TIES' density (8: 0.6; 9: 0.2): kept at 9's.
# The RegMean variants' are unvalidated.
DEFAULTS: dict[str, dict[str, float]] = {
    "task-arithmetic": {"scale": 0.5},
    "ties": {"scale": 1.0, "density": 0.2},
    "dare": {"scale": 0.5, "density": 0.5},
    "dare-ties": {"scale": 0.7, "density": 0.5},
    "regmean-ties": {"scale": 1.0, "density": 0.2},
    "regmean-dare": {"scale": 1.0, "density": 0.5},
}

# rule(parents' aligned float32 tensors (task vectors with --base; a block of their elements for an
# elementwise rule), Tensor)
MERGES: dict[str, Callable] = {"average": average, "regmean": regmean, "fisher": fisher,
                               "task-arithmetic": task_arithmetic, "ties": ties, "dare": dare,
                               "dare-ties": dare_ties, "regmean-ties": regmean_ties, "regmean-dare": regmean_dare}
