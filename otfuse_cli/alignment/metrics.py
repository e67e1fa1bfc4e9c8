"""Ground metrics and activation standardisations, one function each in a registry whose keys are the CLI's
choices. They use tensor methods only, so this module loads without torch (the command line checks its
options before anything heavy is imported)."""

from __future__ import annotations

from typing import Callable


def sqeuclidean(dot, nx, ny):
    """|x - y|^2 from x.y and the squared norms (float64: the expansion cancels no more than cdist). One new
    (n, m) array, the rest in place: at n = 5,632 each fresh array is 254 MB of page faults."""
    cost = dot * -2
    cost += nx[..., :, None]
    cost += ny[..., None, :]
    return cost.clamp_min_(0)


def cosine(dot, nx, ny):
    return 1.0 - dot / (nx.sqrt()[..., :, None] * ny.sqrt()[..., None, :]).clamp_min(1e-24)


# metric(x.y (..., n, m), |x|^2 (..., n), |y|^2 (..., m)) -> cost (..., n, m)
METRICS: dict[str, Callable] = {"sqeuclidean": sqeuclidean, "cosine": cosine}


# per-feature standardisation of activation rows x (rows = samples), from each feature's mean and standard
# deviation over the rows that enter the costs (activations.Moments): (x, mean, std) -> standardised rows
def _zscore(x, mean, std):
    """Squared distance of z-scores = 2N(1 - correlation): correlation matching."""
    return (x - mean) / std.clamp_min(1e-6)


STANDARDIZE: dict[str, Callable] = {"none": lambda x, mean, std: x, "center": lambda x, mean, std: x - mean,
                                    "zscore": _zscore}
