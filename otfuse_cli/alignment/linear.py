"""Linear-map alignment (--align cca): a parent's units are mapped onto the anchor's by the linear map that
canonical correlation analysis gives, instead of a permutation (CCA Merge, Horoi et al., ICML 2024).

From the two models' activations on the same inputs (covariances C_pp, C_aa and cross-covariance C_ap,
each side's covariance with a ridge of `ridge` times its mean variance added), with
    C_aa^-1/2 C_ap C_pp^-1/2 = U S Vᵀ,
the map is T = C_aa^1/2 U Vᵀ C_pp^-1/2: whiten the parent's units, turn them onto the anchor's canonical
directions, colour them as the anchor's. Its inverse is closed-form, C_pp^1/2 V Uᵀ C_aa^-1/2. For a parent
that is the anchor with its units permuted, T is that permutation (exactly, whatever the ridge: C_pp is
then C_aa permuted); for any other invertible map of linear units, T is that map as the ridge goes to 0.

Only spaces that a linear map may mix take one (Space.linear: units produced by one module and read by
others, with no norm, softmax or gate acting on each unit); the others keep permutations from the same
activations."""

from __future__ import annotations

import torch


def _roots(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C^1/2, C^-1/2) of a symmetric positive definite matrix, from one eigendecomposition."""
    values, vectors = torch.linalg.eigh(c)
    values = values.clamp_min(values.max() * 1e-12)
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T


def covariances(pair, scales: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C_pp, C_aa, C_pa) of a FeaturePair that kept covariance statistics (rows centred on their means), of
    the units as the weights produce them: scales are the per-unit factors (parent, anchor) the rows were
    divided by (z-scores), multiplied back. (A map fitted to z-scores and rescaled blows up on a unit that is
    dead on every sample: its clamped deviation of 1e-6 becomes a factor of 10^6 on its weights.)"""
    count = pair.count
    if count < 2:
        raise ValueError("a covariance needs at least two activation rows")
    (g_pp, g_aa), (s_p, s_a) = pair.auto, pair.sums
    scale = 1.0 / (count - 1)
    c_pp = (g_pp - torch.outer(s_p, s_p) / count) * scale
    c_aa = (g_aa - torch.outer(s_a, s_a) / count) * scale
    c_pa = (pair.dot - torch.outer(s_p, s_a) / count) * scale
    if scales is not None:
        sp, sa = scales
        c_pp, c_aa, c_pa = c_pp * torch.outer(sp, sp), c_aa * torch.outer(sa, sa), c_pa * torch.outer(sp, sa)
    return c_pp, c_aa, c_pa


def canonical_map(c_pp: torch.Tensor, c_aa: torch.Tensor, c_pa: torch.Tensor, ridge: float
                  ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(T, T⁻¹, stats): T (m, n) maps parent units onto anchor units."""
    n, m = len(c_pp), len(c_aa)
    if n != m:
        raise ValueError(f"a linear map between widths {n} and {m} has no inverse")

    def ridged(c):
        return c + torch.eye(len(c), dtype=c.dtype) * (ridge * float(c.diagonal().mean().clamp_min(1e-300)))

    root_p, inv_root_p = _roots(ridged(c_pp))
    root_a, inv_root_a = _roots(ridged(c_aa))
    u, s, vt = torch.linalg.svd(inv_root_a @ c_pa.T @ inv_root_p)
    turn = u @ vt  # (m, n) orthogonal
    t = root_a @ turn @ inv_root_p
    t_inv = root_p @ turn.T @ inv_root_a
    stats = {"width": [n, m], "solver": "cca", "correlation": float(s.mean()), "correlation_min": float(s.min())}
    return t, t_inv, stats
