"""The collapse guard on data: does the fused model still predict like its parents?

The weight-space guard (fit.py) compares aligned parents with each other, so it cannot see a fused model that
has lost its function, nor parents that never learnt theirs: in an earlier run of study 1 (IMDB, 8 shards) four
working shards and four at chance fused into a model at 50.6% while every weight agreement read 0.70-0.71, as
in the runs that worked. With --data, fuse runs the written model and each parent on it and compares their
top-1 predictions (a classifier's class, a language model's next token at every unpadded position) by Cohen's
kappa, agreement beyond what the two models' label frequencies give by chance (a model that always answers
the same has kappa 0 with anyone). Reference: how well each parent agrees with its closest other parent.
- with three or more parents, a parent whose best kappa with another is below SHARE x the median of the
  parents' best kappas is a stray: it agrees with none of them (a shard that diverged, another task);
- the fused model is named collapsed when its best kappa with a parent that is not a stray is below SHARE x
  the median best of those parents: a merge should be about as close to one of them as they are to each
  other. Strays are left out because a collapsed model can agree best with a parent stuck on one answer
  (benchmarks/collapse_guard.py on study 1: the 7 fused models at chance named, 1 of the 104 others)."""

from __future__ import annotations

import statistics

import numpy as np
import torch

SHARE = 0.5
BATCH = 8  # a language model's logits are batch x tokens x vocabulary floats


def top_predictions(model, data) -> np.ndarray:
    """The model's top-1 prediction for every sample of --data (every unpadded position of a token model)."""
    from otfuse_cli.alignment.activations import sample_batches

    out = []
    for batch, masks in sample_batches(model, data.data, data.samples, data.seed, data.max_length,
                                       batch_size=BATCH, split=data.split, say_truncation=False):
        ids = model.predict_logits(batch).argmax(-1).cpu()
        if ids.dim() > 1 and masks:  # token models: the positions that hold a token (a decoder's own mask)
            ids = ids[masks[-1].cpu()]
        out.append(ids.reshape(-1))
    return torch.cat(out).numpy()


def kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa of two label sequences, (p_o - p_e) / (1 - p_e), from counts (a vocabulary-sized
    confusion matrix is never built). 0 where chance explains everything (p_e = 1: both constant)."""
    observed = float(np.mean(a == b))
    size = int(max(a.max(), b.max())) + 1
    expected = float(np.bincount(a, minlength=size) @ np.bincount(b, minlength=size)) / (len(a) * len(b))
    return (observed - expected) / (1 - expected) if expected < 1 else 0.0


def agreement(fused: np.ndarray, parents: list[np.ndarray]) -> dict:
    """{"rows", "fused_kappa": per parent, "parents_best_kappa": per parent, "median_best", "strays": parent
    indices, "reference": the median best without them, "collapsed"}. Strays are judged first and left out of
    the rest: a fused model that copies a parent stuck on one answer agrees with it, and that must not count as
    predicting like the parents."""
    n = len(parents)
    pair = {(i, j): kappa(parents[i], parents[j]) for i in range(n) for j in range(i + 1, n)}  # kappa is symmetric
    best = [max(pair[min(i, j), max(i, j)] for j in range(n) if j != i) for i in range(n)]
    first = statistics.median(best)
    strays = [k for k in range(n) if n >= 3 and first > 0 and best[k] < SHARE * first]
    kept = [k for k in range(n) if k not in strays]
    reference = statistics.median(best[k] for k in kept)
    fused_kappa = [kappa(fused, p) for p in parents]
    return {"rows": int(len(fused)), "fused_kappa": fused_kappa, "parents_best_kappa": best, "median_best": first,
            "strays": strays, "reference": reference,
            "collapsed": reference > 0 and max(fused_kappa[k] for k in kept) < SHARE * reference}


def warnings(summary: dict, labels: list[str]) -> list[str]:
    """The warning lines a prediction summary calls for (none when the fused model predicts like a parent and
    every parent like another)."""
    out = []
    if summary["collapsed"]:
        kept = [k for k in range(len(labels)) if k not in summary["strays"]]
        best = max(kept, key=lambda k: summary["fused_kappa"][k])
        out.append(f"the fused model's predictions on --data agree with no parent's the way the parents' agree "
                   f"with each other (Cohen's kappa at best {summary['fused_kappa'][best]:.2f}, with "
                   f"{labels[best]}; the parents' median best {summary['reference']:.2f}, strays left out): it has "
                   "likely lost "
                   "their function (--json: fit.predictions)")
    for k in summary["strays"]:
        out.append(f"{labels[k]} predicts on --data like no other parent (Cohen's kappa at best "
                   f"{summary['parents_best_kappa'][k]:.2f}; the parents' median best {summary['median_best']:.2f}): "
                   "it may not have learnt the task, or not the same one; check that it belongs with them")
    return out


def predictions_of(ckpt, data) -> np.ndarray:
    from otfuse_cli.runnable import load_runnable

    # a model spread over devices for activation alignment (--device-map) is loaded the same way here
    return top_predictions(load_runnable(ckpt, activation=data.activation, device=data.device,
                                         device_map=data.device_map), data)


def check_fused(output: str, parents: list[np.ndarray], data) -> dict | None:
    """The summary for the written model against its parents' predictions (made before it was written, so bad
    --data is refused before any output exists), or None, with a note, where they cannot be paired."""
    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli.report import note_line

    fused = predictions_of(open_checkpoint(output), data)
    if any(len(p) != len(fused) for p in parents):
        note_line("the fused model was not checked against its parents on --data: their tokenizers split the "
                  "texts into different positions")
        return None
    return agreement(fused, parents)
