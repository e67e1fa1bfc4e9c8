"""Ties in a hard assignment broken by a second cost: a lexicographic matching.

Units whose primary features are identical (units that are zero after a ReLU on every sample have all-zero
activation features) have identical cost rows (parent units) or columns (anchor units), and the assignment
solver matches them among themselves arbitrarily. Re-matching such a class among the partners it already
has never changes the primary cost: with identical rows, every bijection between the class and its columns
sums the same numbers (likewise for identical columns). So each class is re-matched by a secondary cost (the
units' weight features), and the plan only changes among equal-cost optima; where no two rows and no two
columns are identical nothing is re-matched and the plan is the solver's, bit for bit."""

from __future__ import annotations

import numpy as np

from otfuse_cli.alignment.solvers import assignment

PROBES = 8  # columns compared first: rows that differ in one of them are not identical


def identical_rows(x: np.ndarray) -> list[np.ndarray]:
    """The groups of two or more identical rows of x (indices, ascending). Rows are first grouped by a few
    columns, so a cost without ties costs a sort of (n, PROBES) values; only the candidates that agree there
    are compared whole."""
    if x.shape[0] < 2 or x.shape[1] == 0:
        return []
    probe = x[:, np.linspace(0, x.shape[1] - 1, PROBES).astype(np.int64)] + 0.0  # + 0.0: -0.0 is 0.0
    groups = []
    for candidates in _groups(probe):
        groups += [candidates[g] for g in _groups(x[candidates] + 0.0)]
    return groups


def _groups(x: np.ndarray) -> list[np.ndarray]:
    _, inverse, counts = np.unique(x, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    return [np.flatnonzero(inverse == c) for c in np.flatnonzero(counts > 1)]


def tie_classes(cost: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(row classes, column classes): the groups of two or more rows, and of columns, of a cost whose
    entries are identical. Both empty for a cost without ties."""
    return identical_rows(cost), identical_rows(cost.T)


def break_ties(src: np.ndarray, classes: tuple[list[np.ndarray], list[np.ndarray]],
               secondary: np.ndarray) -> np.ndarray:
    """src[v] = the parent row matched to anchor column v, with each tie class (tie_classes of the primary
    cost) re-matched among its current partners by the least secondary cost (n, m): row classes first,
    then column classes (each step keeps the primary cost and lowers the secondary one, or keeps it)."""
    src = src.copy()
    row_classes, col_classes = classes
    for cols in [np.flatnonzero(np.isin(src, rows)) for rows in row_classes] + list(col_classes):
        partners = src[cols]
        src[cols] = partners[assignment(secondary[np.ix_(partners, cols)])]
    return src
