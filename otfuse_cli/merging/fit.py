"""How well each aligned parent fits the merged result: the collapse guard.

One-shot fusion of independently trained parents can fail silently (study 1, 4 shards, seed 2: 53.6% where
every shard was >= 67%). Figures over all merged tensors at once, accumulated while they are merged (the
Gram matrix of the aligned parents x_k = T_k(W_k) and their products with the result F):
- agreement: cos(x_k, weighted mean of the other parents). Leaving x_k out matters: its own share of the
  result would make every parent look like it fits (two near-copies among three parents made the third's
  plain residual 2x theirs, though it was matched as well as they were).
- residual ||x_k - F|| / ||x_k||, and retention ||F|| / mean_k ||x_k||: averaging units that do not correspond
  cancels them and the result shrinks (the variance collapse REPAIR undoes).
A parent whose agreement is far below the others' was not matched like them (a bad shard, another task, an
alignment that failed for it) and is named in a warning. On the digit MLPs: two independently trained
parents agree at 0.49, a permuted noisy copy of one at 0.83; a random network among them at 0.10."""

from __future__ import annotations

import statistics

import torch

# A parent is named when its agreement with the others is below this share of the others' median agreement.
AGREEMENT_SHARE = 0.5
BLOCK = 1 << 20


class Fit:
    def __init__(self, parents: int, weights: list[float] | None = None):
        self.weights = weights or [1.0 / parents] * parents
        self.gram = torch.zeros(parents, parents, dtype=torch.float64)  # <x_i, x_j> summed over merged tensors
        self.cross = torch.zeros(parents, dtype=torch.float64)  # <x_k, F>
        self.fused = 0.0  # ||F||^2

    def add(self, aligned: list[torch.Tensor], out: torch.Tensor) -> None:
        """One merged tensor: `aligned` are the parents' tensors in the result's basis (any dtype), in blocks
        so no tensor-sized float64 temporary is made."""
        flat = out.reshape(-1)
        xs = [x.reshape(-1) for x in aligned]
        for start in range(0, flat.numel(), BLOCK):
            f = flat[start:start + BLOCK].double()
            block = torch.stack([x[start:start + BLOCK] for x in xs]).double()  # (parents, block)
            self.fused += float(f @ f)
            self.cross += (block @ f).cpu()  # the blocks may be on --device; the sums stay on the CPU
            self.gram += (block @ block.T).cpu()

    def summary(self, labels: list[str]) -> dict:
        """{"parents": [{model, label, residual, agreement}], "retention", "outliers": [model indices]}."""
        n, g, w, cross = len(self.weights), self.gram.tolist(), self.weights, self.cross.tolist()
        residual = [((g[k][k] - 2 * cross[k] + self.fused) / g[k][k]) ** 0.5 if g[k][k] > 0 else 0.0
                    for k in range(n)]
        agreement = [_leave_one_out_cosine(g, w, k) for k in range(n)]
        mean_norm = statistics.fmean(g[k][k] ** 0.5 for k in range(n))
        outliers = [k for k in range(n) if n >= 3  # with two, "worse than the others" is one number
                    and agreement[k] < AGREEMENT_SHARE * statistics.median(agreement[:k] + agreement[k + 1:])]
        return {"parents": [{"model": k, "label": labels[k], "residual": residual[k], "agreement": agreement[k]}
                            for k in range(n)],
                "retention": self.fused ** 0.5 / mean_norm if mean_norm > 0 else 1.0, "outliers": outliers}


def _leave_one_out_cosine(g: list[list[float]], w: list[float], k: int) -> float:
    """cos(x_k, the weighted mean of the other parents), from the Gram matrix of the aligned parents: how much
    parent k agrees with the rest once its own pull on the result is taken out."""
    others = [j for j in range(len(w)) if j != k]
    dot = sum(w[j] * g[k][j] for j in others)
    norm = sum(w[i] * w[j] * g[i][j] for i in others for j in others)
    return dot / (g[k][k] * norm) ** 0.5 if g[k][k] > 0 and norm > 0 else 0.0


def warnings(summary: dict) -> list[str]:
    """The warning lines a fit summary calls for (none when every parent fits alike)."""
    parents = summary["parents"]
    out = []
    for k in summary["outliers"]:
        others = [p["agreement"] for p in parents if p["model"] != k]
        out.append(f"{parents[k]['label']} agrees with the other parents far less than they do with each other "
                   f"(cosine to the others' mean {parents[k]['agreement']:.2f}, theirs "
                   f"{', '.join(f'{a:.2f}' for a in others)}): its units were not matched like theirs, and the "
                   "fused model may be worse than every parent; check that it belongs with them (--json: fit)")
    return out
