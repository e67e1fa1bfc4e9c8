"""Merge rules: how parents already moved into the anchor's basis combine into one tensor. One function per
rule in a registry whose keys are the `--merge` choices; a rule sees one tensor at a time (streaming), with
the statistic it needs (`needs`) for that tensor from every parent, moved into the anchor's basis too.
Rules import torch only when they run, so the command line can list them without loading it."""

from __future__ import annotations

from typing import Callable


def needs(statistic: str | None, elementwise: bool = False):
    """Declare which statistic (stats.KINDS) a rule reads (None: weights only), and whether each output element
    depends only on the same element of its inputs: such a rule is applied block by block (fusion.py), so it
    never allocates whole-tensor temporaries."""
    def mark(fn):
        fn.needs, fn.elementwise = statistic, elementwise
        return fn
    return mark


@needs(None, elementwise=True)
def average(name: str, aligned: list, weights: list[float], stats: list | None, alpha: float):
    """Weighted average: F = sum_k w_k * T_k(W_k), accumulated from zero (float32, or float64 inputs)."""
    out = aligned[0].new_zeros(aligned[0].shape)
    for x, w in zip(aligned, weights):
        out += w * x
    return out


@needs("gram")
def regmean(name: str, aligned: list, weights: list[float], stats: list | None, alpha: float):
    """RegMean (Jin et al., 2023) for a linear map: W = (sum_k G~_k)^-1 sum_k G~_k W_k in (in, out)
    orientation, G~ = alpha*G + (1-alpha)*diag(G), each G_k weighted by w_k. stats[k] = (G_k, input axis).
    Tensors without Grams (biases, norms, embeddings, convolutions) take the weighted average. Input
    dimensions no parent ever saw (zero diagonal) carry no data: their weights are averaged too."""
    if stats is None:
        return average(name, aligned, weights, None, alpha)
    import torch

    axis = stats[0][1]
    grams = []
    for (g, _), w in zip(stats, weights):
        g = g.double()
        grams.append(w * (alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))))
    total = sum(grams)
    seen = torch.diagonal(total) > 1e-12 * max(float(torch.diagonal(total).max()), 1e-300)
    rhs = sum(g @ x.double().movedim(axis, 0) for g, x in zip(grams, aligned))  # (in, out)
    out = average(name, aligned, weights, None, alpha).double().movedim(axis, 0)
    block = total[seen][:, seen]
    factor, info = torch.linalg.cholesky_ex(block)
    if int(info) != 0:
        from otfuse_cli.errors import OtfuseError

        raise OtfuseError(f"RegMean: the inputs of {name} span too few directions to solve for its weights "
                          f"(singular Gram matrix); use --regmean-alpha below 1")
    out[seen] = torch.cholesky_solve(rhs[seen], factor)
    return out.movedim(0, axis).to(aligned[0].dtype)


@needs("fisher", elementwise=True)
def fisher(name: str, aligned: list, weights: list[float], stats: list | None, alpha: float):
    """Fisher-weighted averaging (Matena & Raffel, 2022): theta = sum_k w_k F_k theta_k / sum_k w_k F_k per
    parameter, F the diagonal Fisher; where no parent has information (buffers, unused rows) the average."""
    if stats is None:
        return average(name, aligned, weights, None, alpha)
    num = sum(w * f.double() * x.double() for f, x, w in zip(stats, aligned, weights))
    den = sum(w * f.double() for f, w in zip(stats, weights))
    plain = average(name, aligned, weights, None, alpha).double()
    informed = den > 1e-30
    return (num / den.clamp_min(1e-300)).where(informed, plain).to(aligned[0].dtype)


# rule(tensor name, aligned float32 tensors (one per parent; a block of their elements for an elementwise rule),
# normalised weights, statistics (blocks alike), alpha)
MERGES: dict[str, Callable] = {"average": average, "regmean": regmean, "fisher": fisher}
