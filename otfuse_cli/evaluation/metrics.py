"""Metric functions on plain numpy arrays (probabilities, labels, token NLLs, strings): unit-testable."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

ECE_BINS = 15

# Which way is better, per metric name used in evaluation documents (None: a count, not a score).
HIGHER_IS_BETTER: dict[str, bool | None] = {
    "accuracy": True, "f1_weighted": True, "f1_macro": True, "ece": False, "nll": False,
    "perplexity": False, "tokens": None, "mlm_accuracy": True, "pseudo_perplexity": False,
    "bleu": True, "chrf": True,
}


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(probs).argmax(axis=1) == np.asarray(labels)))


def f1(probs: np.ndarray, labels: np.ndarray, average: str) -> float:
    from sklearn.metrics import f1_score
    return float(f1_score(np.asarray(labels), np.asarray(probs).argmax(axis=1), average=average, zero_division=0))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width bins of top-1 confidence.

    Bin b holds confidences in (b/n, (b+1)/n] (Guo et al. 2017); a confidence of exactly 0 cannot occur.
    """
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    # ceil(conf*n)-1 puts conf on a bin's upper edge into that bin: (lo, hi].
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true label (probabilities clipped away from 0)."""
    probs = np.asarray(probs, dtype=np.float64)
    p = probs[np.arange(len(probs)), np.asarray(labels)]
    return float(-np.mean(np.log(np.clip(p, 1e-300, None))))


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"accuracy": accuracy(probs, labels), "f1_weighted": f1(probs, labels, "weighted"),
            "f1_macro": f1(probs, labels, "macro"), "ece": expected_calibration_error(probs, labels),
            "nll": nll(probs, labels)}


def perplexity(total_nll: float, tokens: int) -> float:
    """exp of the token-weighted mean NLL (inf when it overflows)."""
    mean = total_nll / tokens
    return math.exp(mean) if mean < 709 else math.inf


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """Corpus BLEU (sacrebleu defaults) and its signature string."""
    from sacrebleu.metrics import BLEU
    metric = BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    from sacrebleu.metrics import CHRF
    metric = CHRF()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())
