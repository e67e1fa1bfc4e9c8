"""Compression: the n units of a space transported onto k < n, behind `otfuse compress`.

OT clustering is the free-support barycentre of a space's units with uniform masses and k support
points: k-means on per-unit features (k-medoids on the head cost for attention heads, whose within-head
dims must be matched). The plan P (n x k), P[i, c] = 1/n for unit i in cluster c, then goes through the
same Transporter as fusion: "out" entries become the cluster mean (barycentre of incoming weights,
biases, norm and BN parameters), "in" entries the sum of outgoing weights, so identical units merge
without changing the function. Pruning keeps k units instead (the largest incoming-weight norm, the largest
activation importance on --data (merging/importance.py), or random); dropped units get zero rows and
contribute nothing. `--repair` afterwards: without data, merged units' incoming rows are scaled to their
members' mean norm (merging/variance.py); with --data, REPAIR or BatchNorm statistics for bare nets, a
least-squares refit of the readers for Hugging Face models (merging/repair.py, merging/refit.py).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import replace

import torch

from otfuse_cli.alignment.cost import Features, unit_cost
from otfuse_cli.alignment.transport import Plan, Transporter
from otfuse_cli.alignment.weights import TensorSource, WeightFeatures, checked_float, unit_slices
from otfuse_cli.card import card_for
from otfuse_cli.checkpoint import open_checkpoint, provenance, write_checkpoint
from otfuse_cli.checkpoint.guard import input_paths, refuse_overlap
from otfuse_cli import report
from otfuse_cli import deadline
from otfuse_cli.errors import OtfuseError
from otfuse_cli.fusion import check_finite_output
from otfuse_cli.options import AlignOptions, DataOptions, OutputOptions
from otfuse_cli.pipeline import (check_data, check_output, check_shard_size, data_record, dtype_overrides,
                                 feature_provider, layout_of, output_dtype)
from otfuse_cli.arch import build_spec, hf_family
from otfuse_cli.arch.transformers import Family
from otfuse_cli.arch.model import Space, Spec

METHODS = ("ot", "magnitude", "importance", "random")
COMPRESSIBLE = ("hidden", "channel", "ffn", "heads")
SKIP_REASONS = {
    "residual": "shared by every layer and normalised by LayerNorm/RMSNorm; not compressed",
    "stage": "shared by every block of a ResNet stage through its skip connections; not compressed",
    "dense": "task-head space (pooler, classifier or LM transform); not compressed",
}
DERIVED_HEAD_DIM = "this family derives head size from hidden_size; heads cannot be compressed"


# ---------------------------------------------------------------- which spaces shrink, to what

def blocked(space: Space, family: Family | None) -> str | None:
    """Why this space cannot be compressed, or None."""
    if space.kind not in COMPRESSIBLE:
        return SKIP_REASONS.get(space.kind, f"{space.kind} space; not compressible")
    if not space.compressible:
        return space.note or "not compressible"
    if space.kind == "heads" and family is not None and not family.compress_heads:
        return DERIVED_HEAD_DIM
    if space.size < 2:
        return "width 1 cannot shrink"
    return None


def _choices(spec: Spec, family: Family | None) -> str:
    ok = [s for s in spec.spaces if blocked(s, family) is None]
    if not ok:
        return "none"
    kinds = list(dict.fromkeys(s.kind for s in ok))
    names = [s.name for s in ok]
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return f"{', '.join(kinds)} (spaces {shown})"


def _parse_widths(widths) -> list[tuple[str, int]]:
    if isinstance(widths, dict):  # a recipe's mapping {ffn: 64}: whole numbers only (YAML may give "abc" or 1.5)
        bad = next(((k, v) for k, v in widths.items() if isinstance(v, bool) or not isinstance(v, int)), None)
        if bad is not None:
            raise OtfuseError(f"widths: {bad[0]} must be a whole number of units, got {bad[1]!r}")
        return [(str(k), v) for k, v in widths.items()]
    out = []
    for item in widths:
        key, sep, value = str(item).partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            out.append((key.strip(), int(value)))
        except ValueError:
            raise OtfuseError(f"--width takes KIND=N or SPACE=N (e.g. ffn=1536), got {item!r}") from None
    return out


def target_widths(spec: Spec, family: Family | None, ratio: float | None, widths) -> tuple[dict[str, int], dict[str, str]]:
    """(space -> new width, space -> why it keeps its width)."""
    if ratio is not None and widths:
        raise OtfuseError("give either --ratio R or --width KIND=N, not both")
    if ratio is None and not widths:
        raise OtfuseError("say how much to compress: --ratio R (e.g. 0.5) or --width KIND=N (e.g. ffn=1536)")
    reasons = {s.name: why for s in spec.spaces if (why := blocked(s, family))}
    targets: dict[str, int] = {}
    if ratio is not None:
        if not 0 < ratio < 1:  # also false for NaN
            raise OtfuseError(f"--ratio must be between 0 and 1 (exclusive), got {ratio}")
        for s in spec.spaces:
            if s.name not in reasons:
                targets[s.name] = min(s.size - 1, max(1, math.floor(s.size * ratio + 1e-9)))
    else:
        for key, k in _parse_widths(widths):
            chosen = [s for s in spec.spaces if s.name == key] or [s for s in spec.spaces if s.kind == key]
            if not chosen:
                raise OtfuseError(f"unknown space kind {key!r}; compressible here: {_choices(spec, family)}")
            why = next((reasons[s.name] for s in chosen if s.name in reasons), None)
            if why:
                raise OtfuseError(f"--width {key}: {why}; compressible here: {_choices(spec, family)}")
            for s in chosen:
                if not 1 <= k < s.size:
                    raise OtfuseError(f"--width {key}={k}: must be at least 1 and below the width of space "
                                      f"{s.name!r} ({s.size})")
                targets[s.name] = k
        reasons.update({s.name: "not selected by --width" for s in spec.spaces
                        if s.name not in targets and s.name not in reasons})
    if family is not None:
        _check_uniform(spec, family, targets)
    if not targets:
        why = "; ".join(sorted(set(reasons.values())))
        raise OtfuseError(f"nothing to compress in this {spec.family} model: {why}")
    return targets, reasons


def _config_group(family: Family, space: Space) -> str:
    if space.kind == "ffn":
        return family.ffn_key(stack=space.name.split(".")[0])
    return family.config.heads


def _check_uniform(spec: Spec, family: Family, targets: dict[str, int]) -> None:
    """HF configs hold one FFN width and one head count for every layer (of a stack)."""
    groups: dict[str, list[Space]] = {}
    for s in spec.spaces:
        if s.kind in ("ffn", "heads"):
            groups.setdefault(_config_group(family, s), []).append(s)
    for key, spaces in groups.items():
        if any(s.name in targets for s in spaces) and len({targets.get(s.name, s.size) for s in spaces}) > 1:
            raise OtfuseError(f"per-layer widths are not supported for {spec.family} checkpoints: config.json "
                              f"holds one {key} for every layer; use --width {spaces[0].kind}=N or --ratio")


def config_overrides(spec: Spec, family: Family, targets: dict[str, int]) -> dict:
    out: dict = {}
    for s in spec.spaces:
        if s.name not in targets:
            continue
        if s.kind == "ffn":
            out[_config_group(family, s)] = targets[s.name]
        elif s.kind == "heads":  # the space's units are KV groups of `group` query heads: groups stay whole
            group = max(e.rep for e in s.entries)
            out.update(family.head_overrides(targets[s.name], group, s.entries[0].inner))
    return out


# ---------------------------------------------------------------- OT clustering

def _plusplus(dist, weights: torch.Tensor, k: int, gen: torch.Generator) -> list[int]:
    """Seeded k-means++ seeds; dist(i) = distances of every point to point i."""
    picks = [int(torch.multinomial(weights, 1, generator=gen))]
    d = dist(picks[0])
    for _ in range(1, k):
        p = weights * d
        if not p.sum() > 0:  # every point sits on a seed (zero-cost copies): any unpicked point will do
            p = weights.clone()
            p[picks] = 0
        picks.append(int(torch.multinomial(p / p.sum(), 1, generator=gen)))
        d = torch.minimum(d, dist(picks[-1]))
    return picks


# k-means restarts: eight where a clustering is cheap; one where a restart costs more than about 10^9
# distance terms (points x clusters x features). On a SmolLM2-135M FFN layer (1,536 units, 1,728 weights each,
# k = 768) scikit-learn's one greedy-k-means++ start reached a within-cluster cost of 28.20 in 3.6 CPU-s, its
# eight 28.04 in 31; the hand-written Lloyd this replaced, eight starts of plain k-means++, 29.59 in 35. On the
# digit MLP's validation half (five clustering seeds, weights and activations, half and quarter width) it was
# ahead on the mean in all four settings (benchmarks/RESULTS.md).
RESTARTS, CHEAP = 8, 1e9


def _kmeans(x: torch.Tensor, w: torch.Tensor, k: int, gen):
    """Weighted k-means (scikit-learn's, greedy k-means++ seeding): (labels, within-cluster cost)."""
    from sklearn.cluster import KMeans

    restarts = RESTARTS if len(x) * k * x.shape[1] <= CHEAP else 1
    seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
    km = KMeans(n_clusters=k, n_init=restarts, random_state=seed).fit(x.numpy(), sample_weight=w.numpy())
    return torch.from_numpy(km.labels_).long(), float(km.inertia_)


def _kmedoids(cost: torch.Tensor, w: torch.Tensor, k: int, gen, restarts: int = 8, iters: int = 100):
    """Weighted k-medoids on a cost matrix: (labels, medoids, within-cluster cost)."""
    best = None
    for _ in range(restarts):
        medoids = torch.tensor(_plusplus(lambda i: cost[:, i], w, k, gen))
        for _ in range(iters):
            labels = cost[:, medoids].argmin(1)
            new = medoids.clone()
            for c in range(k):
                members = (labels == c).nonzero()[:, 0]
                if len(members):
                    new[c] = members[(w[members, None] * cost[members][:, members]).sum(0).argmin()]
            if torch.equal(new, medoids):
                break
            medoids = new
        labels = cost[:, medoids].argmin(1)
        total = float((w * cost[torch.arange(len(w)), medoids[labels]]).sum())
        if best is None or total < best[2]:
            best = (labels, medoids, total)
    return best


@contextmanager
def _threads(work: float):
    """Small clustering problems are many tiny ops: one thread is faster than a contended pool."""
    old = torch.get_num_threads()
    if work < 1e9:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _cluster(features: Features, points, first, w, k: int, gen, metric: str, fixed_inner):
    """Clusters of the distinct points: (labels, medoids or None, within cost, one-cluster cost, inner maps)."""
    u = len(points)
    if not features.has_channels():  # plain units: k-means, the free-support barycentre
        labels, spread = _kmeans(points, w, k, gen) if u > k else (torch.arange(u), 0.0)
        total = float((w * ((points - (w[:, None] * points).sum(0)) ** 2).sum(1)).sum())
        return labels, None, spread, total, {}
    # heads: the cost matches within-head dims, so cluster on it around medoid heads
    full, maps = unit_cost(features, features, metric, fixed_inner)
    cost = full.cpu()[first][:, first].clamp_min(0)
    labels, medoids, spread = _kmedoids(cost, w, k, gen) if u > k else (torch.arange(u), torch.arange(u), 0.0)
    return labels, medoids, spread, float((w[:, None] * cost).sum(0).min()), maps


def ot_clusters(features: Features, k: int, seed: int, metric: str, fixed_inner: tuple[str, ...] = ()):
    """(labels (n,) with clusters numbered by their first unit, inner maps {channel: (n, k, d)}, distortion).

    Identical units are one support point carrying their total mass, so they always share a cluster; with
    fewer distinct units than k the spare units get no mass (zero weights)."""
    x = torch.from_numpy(features.flat())
    n = len(x)
    points, inverse, counts = torch.unique(x, dim=0, return_inverse=True, return_counts=True)
    w = counts.double() / n
    first = torch.full((len(points),), n).scatter_reduce(0, inverse, torch.arange(n), "amin")
    with _threads(float(len(points)) ** 2 * x.shape[1]):
        labels, medoids, spread, total, maps = _cluster(features, points, first, w, k,
                                                        torch.Generator().manual_seed(seed), metric, fixed_inner)
    unit_labels = labels[inverse]
    order = {int(c): i for i, c in enumerate(dict.fromkeys(unit_labels.tolist()))}  # clusters in unit order
    relabel = torch.tensor([order.get(c, len(order)) for c in range(int(labels.max()) + 1)])
    inner = {}
    if medoids is not None:
        heads = torch.zeros(k, dtype=torch.long)
        for c, i in order.items():
            heads[i] = first[medoids[c]]
        inner = {ch: perm[:, heads] for ch, perm in maps.items()}  # member dims onto the medoid head's
    return relabel[unit_labels], inner, (spread / total if total > 0 else 0.0)


# ---------------------------------------------------------------- plans

def keep_plan(keep: torch.Tensor, n: int) -> Plan:
    """Pruning: the j-th kept unit (in unit order) becomes unit j; every other unit is dropped."""
    labels = torch.full((n,), -1, dtype=torch.long)
    labels[keep.sort().values] = torch.arange(len(keep))
    return Plan(labels=labels, width=len(keep))


def incoming_norms(space: Space, src: TensorSource) -> torch.Tensor:
    """L2 norm of each unit's incoming weights ("out" entries of weight matrices / kernels)."""
    entries = [e for e in space.entries if e.role == "out"]
    mats = [e for e in entries if src(e.tensor).dim() >= 2] or entries
    slices = [unit_slices(src(e.tensor), e, space.size).reshape(space.size, -1) for e in mats]
    return torch.cat(slices, 1).double().norm(dim=1)


def space_plan(index: int, space: Space, k: int, method: str, src: TensorSource, provider, fallback,
               options: AlignOptions, seed: int,
               importance: dict[str, torch.Tensor] | None = None) -> tuple[Plan, dict]:
    n = space.size
    if method in ("magnitude", "importance"):
        score = incoming_norms(space, src) if method == "magnitude" else importance[space.name]
        return keep_plan(score.argsort(descending=True, stable=True)[:k], n), {}
    if method == "random":
        return keep_plan(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k], n), {}
    features = provider.features(index, {}, False, fold=False).parent  # clustering needs the features whole
    stats = {"features": options.align}
    if features.empty() and provider is not fallback:  # no activation recorded for this space
        features = fallback.features(index, {}, False, fold=False).parent
        stats["features"] = "weights"
    if features.empty():
        raise OtfuseError(f"space {space.name!r} has no features to cluster")
    labels, inner, distortion = ot_clusters(features, k, seed, options.metric, space.fixed_inner)
    return Plan(labels=labels, width=k, inner=inner), {**stats, "distortion": distortion}


def check_repairable(ckpt) -> None:
    """compress --repair re-estimates BatchNorm statistics of bare nets, or applies REPAIR to a BatchNorm-free MLP
    or CNN (both rebuilt from their state dict's shapes); a Hugging Face model gets the layers that read its
    compressed units refitted by least squares (merging/refit.py)."""
    if ckpt.config is not None:
        return
    if not any(name.endswith("running_mean") for name in ckpt.keys()) and build_spec(ckpt).family not in ("mlp", "cnn"):
        raise OtfuseError(f"compress --repair: {ckpt.path} has no BatchNorm layers and is not an MLP or CNN chain")


# ---------------------------------------------------------------- the command

# What `--repair` does after compression (`--repair-by`): weights (no data: merged units' incoming rows to their
# members' mean norm, merging/variance.py), statistics (REPAIR on --data: each unit's mean and std to its
# members'; BatchNorm nets re-estimate their statistics, merging/repair.py), refit (least squares on --data of
# the layers reading compressed units, merging/refit.py).
REPAIRS = ("weights", "statistics", "refit")


def repair_rule(repair: bool | str, ckpt, method: str, has_data: bool) -> str | None:
    """The repair to apply: the one named, or by default refit on a Hugging Face model given --data, statistics
    on a bare net given --data, weights without data."""
    if not repair:
        return None
    rule = repair if isinstance(repair, str) else \
        ("refit" if ckpt.config is not None else "statistics") if has_data else "weights"
    if rule not in REPAIRS:
        raise OtfuseError(f"unknown --repair-by {rule!r}; choose from {', '.join(REPAIRS)}")
    if rule == "weights" and method != "ot":
        raise OtfuseError(f"--repair without --data (or --repair-by weights) corrects merged units (--method ot); "
                          f"--method {method} keeps units whole, so only a repair on --data FILE applies")
    if rule != "weights" and not has_data:
        raise OtfuseError(f"--repair-by {rule} needs --data FILE with sample inputs")
    if rule == "refit" and ckpt.config is None:
        raise OtfuseError("--repair-by refit applies to Hugging Face models; a bare MLP or CNN takes statistics "
                          "(REPAIR, or BatchNorm statistics) or weights")
    return rule


def compressed_tensors(ckpt, mover: Transporter, plans: dict[str, Plan], write: OutputOptions, count: list[int],
                       rescale=None):
    """Every tensor moved by the plans, streamed; count[0] sums the written parameters. rescale(name, before,
    after) post-processes each moved tensor (the data-free variance repair)."""
    for name in ckpt.keys():
        x = ckpt.get(name)
        if not x.is_floating_point():
            yield name, x
            continue
        x = checked_float(x, str(ckpt.path), name)
        y = mover.move(name, x, plans)
        if rescale is not None:
            y = rescale(name, x, y)
        count[0] += y.numel()
        yield name, check_finite_output(name, y.to(output_dtype(x.dtype, write)))


def compress(model: str, output: str, *, ratio: float | None = None, widths=None, method: str = "ot",
             options: AlignOptions = AlignOptions(), data: DataOptions = DataOptions(),
             write: OutputOptions = OutputOptions(), command_options: dict | None = None, on_space=None,
             repair: bool | str = False) -> dict:
    """Write `model` with its compressible spaces shrunk; see the module docs for the methods. data.seed seeds
    the clustering and --method random; activations are not standardised unless data.standardize says so
    (a merged unit's pre-activation is the mean of the raw ones). repair: one of REPAIRS, or True for the
    model's default (repair_rule)."""
    if method not in METHODS:
        raise OtfuseError(f"unknown --method {method!r}; choose from {', '.join(METHODS)}")
    if method == "ot" and options.align == "none":  # was a KeyError traceback
        raise OtfuseError("compress --method ot clusters units by their weights or activations (--align weights "
                          "or activations); --align none gives it nothing to cluster by")
    if options.align == "cca":
        raise OtfuseError("compress --method ot clusters units by their weights or activations (--align weights "
                          "or activations); --align cca maps one model's units onto another's")
    deadline.start(options.time_limit)
    check_output(output, write)
    if method == "importance" and not data.data:
        raise OtfuseError("--method importance scores units by their output on --data FILE; give --data")
    data = replace(data, standardize=data.standardize or "none", post_activation=bool(data.post_activation))
    ckpt = open_checkpoint(model)
    rule = repair_rule(repair, ckpt, method, bool(data.data))
    uses_data = rule in ("statistics", "refit") or method == "importance" or (method == "ot" and
                                                                            options.align == "activations")
    refuse_overlap(output, input_paths([ckpt], [data.data if uses_data else None]))
    if rule == "statistics" and ckpt.config is None:
        check_repairable(ckpt)
    layout = layout_of(ckpt, output)
    check_shard_size(layout, write)
    if data.data and not uses_data:
        raise OtfuseError("--data is read by --align activations (with --method ot), --method importance or "
                          "--repair; none of them is chosen here")
    spec = build_spec(ckpt)
    family = hf_family(ckpt)
    targets, reasons = target_widths(spec, family, ratio, widths)
    if method == "ot":
        check_data(options, data)
    src = TensorSource(ckpt, str(ckpt.path))
    fallback = WeightFeatures(spec, spec, src, src)
    provider = feature_provider(options, data, spec, spec, src, src) if method == "ot" else None
    importance = None
    if method == "importance":
        from otfuse_cli.merging.importance import unit_importance

        importance = unit_importance(ckpt, spec, targets, data)
    plans, stats = {}, {}
    for index, space in enumerate(spec.spaces):
        if space.name in targets:
            plans[space.name], stats[space.name] = space_plan(index, space, targets[space.name], method, src,
                                                              provider, fallback, options, data.seed, importance)
            if on_space:
                on_space(space.name)
    src.cache.clear()
    # the data read and accepted first, then hashed
    if method == "importance":
        from otfuse_cli.alignment.activations import data_info

        info = data_info(data)
    else:
        info = data_record(options, data) if method == "ot" else None
    target = copy.deepcopy(spec)
    for s in target.spaces:
        s.size = targets.get(s.name, s.size)
    record = provenance("compress", {**(command_options or {}), "method": method, "ratio": ratio,
                                     "widths": targets, "seed": data.seed, "dtype": write.dtype,
                                     "align": {"align": options.align, "metric": options.metric}
                                     if method == "ot" else None,
                                     "repair": rule and {"rule": rule,
                                                         "data": str(data.data) if rule != "weights" else None},
                                     **({"data": info} if info else {})}, [ckpt])
    count = [0]
    rescale = None
    if rule == "weights":
        from otfuse_cli.merging.variance import VarianceRepair

        rescale = VarianceRepair(spec, target, plans)
    tensors = report.counted(compressed_tensors(ckpt, Transporter(target, spec), plans, write, count, rescale),
                             on_space, "writing", len(ckpt.keys()))
    # the rules on data hold the whole compressed model in memory, to run it
    if rule == "refit":
        from otfuse_cli.merging.refit import refit_readers

        tensors = refit_readers(dict(tensors), ckpt, spec, targets, config_overrides(spec, family, targets), data)
    elif rule == "statistics" and family:
        from otfuse_cli.merging.repair import repair_producers

        tensors = repair_producers(dict(tensors), ckpt, spec, target, plans, config_overrides(spec, family, targets),
                                   data)
    elif rule == "statistics":
        from otfuse_cli.merging.repair import repair_compressed

        tensors = repair_compressed(dict(tensors), ckpt, spec, target, plans, data)
    out = write_checkpoint(output, tensors,
                           layout=layout, source=ckpt,
                           config_overrides={**dtype_overrides(ckpt, write),
                                             **config_overrides(spec, family, targets)} if family else None,
                           provenance=record, max_shard_size=write.max_shard_size, force=write.force,
                           card=card_for(layout, record, [ckpt]))
    spaces = [{"space": s.name, "kind": s.kind, "width": [s.size, targets.get(s.name, s.size)],
               "compressed": s.name in targets, "reason": reasons.get(s.name), **stats.get(s.name, {})}
              for s in spec.spaces]
    return {"output": str(out), "family": spec.family, "method": method, "spaces": spaces,
            "parameters": [ckpt.num_parameters(), count[0]]}
