"""The studies' prose, checked: every comparative sentence of benchmarks/STUDIES.md (studies 1-7) and of
README.md's studies summary, held here as data and evaluated against the committed results/<study>.json, so
that a sentence whose claim stops holding (a rerun, an edited number) fails the test suite
(tests/test_study_claims.py). A claim about "every seed" is checked seed by seed, never on the mean.

    .venv/bin/python benchmarks/studies/claims.py            # every claim, its values, and what fails
    .venv/bin/python benchmarks/studies/claims.py --study shards

FORMAT. A claim is a tuple

    (study, scope, left, op, right, columns, quote)

study    the results' stem: "shards" reads results/shards.json.
scope    which values are compared:
           "every seed"       the comparison must hold for each seed's values separately;
           "some seed"        it must hold for at least one seed (in at least one of the columns);
           "mean"             on the means over the seeds (unrounded; the tables show them rounded);
           "seed N"           seed N only (N as listed in the JSON's "seeds");
           "seeds N M ..."    each of those seeds separately.
left, right
         terms, in the tables' units (fractions x100; a study's own `value_scale` where it has one):
           "row"              the row's value in the claim's column (a row of the table, or a value that every run
                              of the JSON holds though the table leaves it out);
           "row@column"       the row's value in another column;
           "study::row"       the same row (and column, or "study::row@column") in another study's results, seeds
                              paired in order;
           "mass:route"       study 4's plan-change fraction of a mass route, in % (no column);
           "time:key"         the wall-clock seconds the run recorded under that key (its "timing");
           a number           a constant;
           (fn, term, ...)    fn one of "max", "min", "mean" (over any number of terms), "-", "+", "*", "/" (two
                              terms), "abs" (one). With scope "mean" every row is first averaged over the seeds,
                              then fn applied: ("max", "a", "b") is the larger of the two means.
op       "<", "<=", ">", ">=";
         "==": equal to 1e-9 (the same model in two rows);
         "~": |left - right| <= tol, with right given as (term, tol);
         "in": low <= left <= high, with right given as (low, high), each a term.
columns  a column name, a list of them (the claim must hold in each), "*" (every column of the study), or None
         (the terms name their own columns or are "mass:" terms).
quote    a short exact quote of the sentence the claim backs. The test checks that it still occurs (white space
         folded, "*" emphasis dropped) in benchmarks/STUDIES.md or README.md, so a sentence cannot be rewritten
         without its claim, nor a claim outlive its sentence.

Writing claims: one tuple per comparison a sentence makes, under a comment naming the study (studies 8 and 9 add
their own section the same way; a perplexity study compares in its own units, lower is better, so "beats" is
"<"). Compare unrounded values: a sentence's "within 0.2 points" is checked as <= 0.2, and a number it quotes
("3.5 points below") as a range of its rounding, ("in", (3.45, 3.55)). "every seed" claims are the point of this
file: a sentence saying "every seed" or "on each seed" gets a per-seed claim, one about the mean a "mean" claim.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOCS = (HERE.parents[1] / "benchmarks" / "STUDIES.md", HERE.parents[1] / "README.md")

PARTIES_2 = ["IMDB party", "Rotten Tomatoes party", "tweets party", "Amazon party"]
DOMAINS_2 = ["IMDB", "Rotten Tomatoes", "tweets", "Amazon"]
MERGES_2A = ("vanilla average", "OT weights (exact)", "OT weights (sinkhorn)", "OT activations", "RegMean",
             "OT + RegMean")
ONE_SHOT_7 = ["vanilla average", "OT weights (exact)", "OT activations", "RegMean", "OT + RegMean"]
TESTS_7 = ["desktop test", "system test", "LibreOffice help (unseen)"]
COLS_7 = [f"{m}, {t}" for t in TESTS_7 for m in ("BLEU", "chrF")]
CHRF_7 = [f"chrF, {t}" for t in TESTS_7]
# Study 6's rows by greedy BLEU on the mean, best first (as the prose says beam 4 ranks them too)
ORDER_6 = ["whole data", "ensemble", "half A + fine-tune", "half A", "half B", "OT + RegMean, encoders only",
           "OT + RegMean + fine-tune", "OT weights (exact) + fine-tune", "OT activations + fine-tune",
           "vanilla average, encoders only", "OT + RegMean, decoders only", "vanilla average + fine-tune",
           "OT + RegMean", "RegMean", "OT activations", "OT weights (exact)",
           "vanilla average, decoders only", "vanilla average"]  # study 6 by mean BLEU greedy; beam 4 swaps two neighbouring pairs
SWAPPED_6 = [("half A", "half B"), ("vanilla average, encoders only", "OT + RegMean, decoders only")]
SHARDS_ALIGNED = ("OT weights (exact)", "OT weights, barycentric", "OT weights (sinkhorn)", "OT activations",
                  "OT activations, barycentric", "CCA activations", "CCA + RegMean", "OT + RegMean",
                  "OT barycentric + RegMean")
CHANCE_SHARDS_8 = {0: (3, 5, 7), 1: (1, 2, 4), 2: (2, 4, 5)}  # study 1's shards at chance with k = 8, by seed
MASS_ROWS = {"OT weights, l1 masses": "OT weights (exact)", "OT weights, l2 masses": "OT weights (exact)",
             "OT activations, activation masses": "OT activations"}

CLAIMS: list[tuple] = [
    # ------------------------------------------------------------ study 1: shards (IMDB)
    ("shards", "every seed", ("min", *SHARDS_ALIGNED), ">", ("max", "shard 1", "shard 2"), "k=2",
     "With 2 shards every aligned route beats both shards on every seed"),
    ("shards", "every seed", ("-", "OT weights (exact)", "whole data"), "in", (0.05, 1.35), "k=2",
     "is above the whole-data model (74.3) on every seed too, by 0.1 to 1.3 points"),
    ("shards", "every seed", "vanilla average", "<", ("min", "shard 1", "shard 2"), "k=2",
     "vanilla averaging is below both shards on every seed (66.5)"),
    ("shards", "seeds 0 2", "vanilla average", "<", 60.0, "k=4",
     "With 4 shards vanilla averaging is at or near chance on two seeds (49.8, 59.9)"),
    ("shards", "every seed", ("-", "OT weights, barycentric", "OT weights (exact)"), "in", (0.65, 1.15), "k=4",
     "the barycentric rounds help OT on weights on every seed (74.7 against 73.9 anchored, by 0.7–1.1 points)"),
    *[("shards", "every seed", route, ">", "ensemble", "k=4",
       "CCA + RegMean and barycentric OT + RegMean (74.9 each) are above the ensemble (74.4) on every seed")
      for route in ("CCA + RegMean", "OT barycentric + RegMean")],
    ("shards", "seeds 0 2", "CCA + RegMean", ">", "whole data", "k=4",
     "CCA + RegMean is above the whole-data model on two seeds of three"),
    ("shards", "seed 1", "CCA + RegMean", "<", "whole data", "k=4", "(seed 1: 75.0 against 75.1)"),
    *[("shards", f"seed {seed}", ("max", *(f"shard {i}" for i in failed)), "<", 51.0, "k=8",
       "three shards of every seed stayed at chance (50–51%)") for seed, failed in CHANCE_SHARDS_8.items()],
    *[("shards", f"seed {seed}", ("min", *(f"shard {i}" for i in range(1, 9) if i not in failed)), ">", 55.0, "k=8",
       "three shards of every seed stayed at chance (50–51%)") for seed, failed in CHANCE_SHARDS_8.items()],
    ("shards", "mean", "ensemble", "in", (68.95, 69.05), "k=8", "the ensemble keeps 69.0"),
    *[("shards", "some seed", route, "<", "shards (mean)", "k=8",
       "Every route without RegMean then falls below the mean shard (59.5) on some seed")
      for route in ("vanilla average", "OT weights (exact)", "OT weights, barycentric", "OT weights (sinkhorn)",
                    "OT activations", "OT activations, barycentric", "CCA activations", "vanilla average + fine-tune",
                    "OT weights (exact) + fine-tune")],
    ("shards", "seed 1", "OT weights (exact)", "<", 50.0, "k=8", "(OT on weights to 49.8 on seed 1)"),
    *[("shards", "every seed", route, ">", "shards (mean)", "k=8", "the RegMean routes stay above it on every seed")
      for route in ("RegMean", "OT + RegMean", "OT barycentric + RegMean", "CCA + RegMean", "OT + RegMean + fine-tune")],
    ("shards", "seeds 0 2", "CCA + RegMean", ">", "best shard", "k=8",
     "is above the best shard on two seeds of three but below the ensemble on two"),
    ("shards", "seed 1", "CCA + RegMean", "<", "best shard", "k=8",
     "is above the best shard on two seeds of three but below the ensemble on two"),
    ("shards", "seeds 1 2", "CCA + RegMean", "<", "ensemble", "k=8",
     "is above the best shard on two seeds of three but below the ensemble on two"),
    ("shards", "seed 0", "CCA + RegMean", ">", "ensemble", "k=8",
     "is above the best shard on two seeds of three but below the ensemble on two"),
    ("shards", "seeds 0 1", "OT weights (exact) + fine-tune", "<", "OT weights (exact)", "k=4",
     "at k = 4 it lowers OT on weights on two seeds (73.6 on the mean against 73.9 before)"),
    ("shards", "seed 2", "OT weights (exact) + fine-tune", ">", "OT weights (exact)", "k=4",
     "at k = 4 it lowers OT on weights on two seeds (73.6 on the mean against 73.9 before)"),
    ("shards", "every seed", "OT weights (exact) + fine-tune", "<", 50.5, "k=8",
     "it sends OT on weights to chance on every seed (50.2)"),
    ("shards", "mean", ("max", "time:k=8: shards in parallel (slowest)", "time:whole data"), "<",
     "time:k=8: fusion (all routes)", None, "the fusion routes of k = 8 took 406 s a seed beside"),
    *[("shards", "every seed", ("-", ref, "CCA + RegMean"), "<=", 0.125, ["k=2", "k=4"],
       "(CCA + RegMean) is at most 0.12 points below the ensemble or the whole-data model on any seed")
      for ref in ("ensemble", "whole data")],
    *[("shards", "mean", "CCA + RegMean", ">", ref, ["k=2", "k=4"], "and above both on the mean")
      for ref in ("ensemble", "whole data")],
    ("shards", "mean", "CCA + RegMean", ">", ("max", *(r for r in SHARDS_ALIGNED if r != "CCA + RegMean"),
                                                "RegMean", "vanilla average"), ["k=2", "k=8"],
     "the best one-shot fusion of 2 or 4 shards (CCA + RegMean)"),
    # ------------------------------------------------------------ study 2a: federated, from scratch
    *[("federated", "every seed", p, ">", ("max", *[f"{p}@{o}" for o in DOMAINS_2 if o != d]), d,
       "Every party's model is good on its own domain and poor elsewhere") for p, d in zip(PARTIES_2, DOMAINS_2)],
    ("federated", "mean", ("min", *PARTIES_2), "in", (60.5, 66.5), "in-domain mean", "(in-domain means 61–66)"),
    ("federated", "mean", ("max", *PARTIES_2), "in", (60.5, 66.5), "in-domain mean", "(in-domain means 61–66)"),
    ("federated", "every seed", "OT + RegMean", ">", ("max", *PARTIES_2), "in-domain mean",
     "is above every party on every seed"),
    ("federated", "mean", ("-", "OT + RegMean", ("max", *PARTIES_2)), "in", (5.15, 5.25), "in-domain mean",
     "by 5.2–10.2 points on the mean"),
    ("federated", "mean", ("-", "OT + RegMean", ("min", *PARTIES_2)), "in", (10.15, 10.25), "in-domain mean",
     "by 5.2–10.2 points on the mean"),
    ("federated", "every seed", ("-", "OT + RegMean", ("max", *PARTIES_2)), ">=", 4.45, "in-domain mean",
     "4.5 at the least on one seed"),
    ("federated", "some seed", ("-", "OT + RegMean", ("max", *PARTIES_2)), "<", 4.55, "in-domain mean",
     "4.5 at the least on one seed"),
    ("federated", "every seed", ("-", "OT + RegMean", "ensemble"), "in", (0.05, 1.05), "in-domain mean",
     "above the four-model ensemble on every seed (70.4 ± 0.9 on the mean), but by 0.1 to 1.0 points only"),
    ("federated", "mean", ("-", "multi-task (union of the data)", "OT + RegMean"), "in", (2.85, 2.95),
     "in-domain mean", "2.9 points below the multi-task model that needs everyone's data"),
    ("federated", "every seed", "OT + RegMean", "<", "multi-task (union of the data)", "in-domain mean",
     "(74.0 ± 0.5, below it on every seed)"),
    # "positive" for every text: the share of positive labels in each test split (counted from the split files)
    *[("federated", "every seed", "vanilla average", "~", (share, 0.001), col,
       'it answers "positive" for every text on every seed')
      for col, share in (("IMDB", 48.95), ("Rotten Tomatoes", 49.5642), ("tweets", 68.0851), ("Amazon", 55.6114),
                         ("NYT (unseen)", 38.9925))],
    ("federated", "every seed", "vanilla average", "<", ("min", *PARTIES_2), "in-domain mean",
     "(55.6, and 39.0 on NYT), below every party"),
    ("federated", "every seed", "vanilla average", "<", ("min", *PARTIES_2), "NYT (unseen)",
     "(55.6, and 39.0 on NYT), below every party"),
    ("federated", "mean", ("max", *MERGES_2A), "<", "tweets party", "NYT (unseen)",
     "no merge reaches the tweets party (66.2 ± 4.9), the best single"),
    ("federated", "mean", "tweets party", ">", ("max", "IMDB party", "Rotten Tomatoes party", "Amazon party", "ensemble"), "NYT (unseen)",
     "the best single model there"),
    ("federated", "mean", ("max", *MERGES_2A), "<", "ensemble", "NYT (unseen)",
     "and none is above the ensemble (63.9) on the mean"),
    ("federated", "every seed", "OT weights (sinkhorn)", ">", "multi-task (union of the data)", "NYT (unseen)",
     "Sinkhorn OT (62.7) is above the multi-task"),
    ("federated", "every seed", "RegMean", ">", "vanilla average", "*",
     "merging from Gram matrices beats averaging"),
    ("federated", "mean", "RegMean", "<", ("min", "OT weights (exact)", "OT weights (sinkhorn)", "OT activations"),
     "in-domain mean", "RegMean alone (69.4) is below the"),
    ("federated", "every seed", ("-", "OT + RegMean", "RegMean"), "in", (1.05, 2.85), "in-domain mean",
     "aligning first helps it on every seed (OT + RegMean above RegMean by 1.1–2.8 points)"),
    ("federated", "mean", "OT + RegMean", ">", ("max", *MERGES_2A[:-1]), "in-domain mean",
     "OT + RegMean is the best merge on the mean (71.1 against 69.4–70.6"),
    *[("federated", "mean", (fn, "OT weights (exact)", "OT weights (sinkhorn)", "OT activations", "RegMean"), "in",
       (69.35, 70.65), "in-domain mean", "(71.1 against 69.4–70.6 for the other OT and RegMean routes)")
      for fn in ("min", "max")],
    ("federated", "seed 0", "OT weights (sinkhorn)", ">", "OT + RegMean", "in-domain mean",
     "not on every seed (seed 0: Sinkhorn OT 70.8 against 70.7)"),
    # ------------------------------------------------------------ study 2b: children of all-MiniLM-L6-v2
    ("federated_pretrained", "every seed", "OT weights (exact)", "==", "vanilla average", "*",
     "OT on weights, exact and Sinkhorn, equals the vanilla average in every cell of every seed"),
    ("federated_pretrained", "every seed", "OT weights (sinkhorn)", "==", "vanilla average", "*",
     "OT on weights, exact and Sinkhorn, equals the vanilla average in every cell of every seed"),
    ("federated_pretrained", "every seed", "OT + RegMean", "==", "RegMean", "*",
     "OT + RegMean equals RegMean for the same reason"),
    ("federated_pretrained", "every seed", "vanilla average", ">", "federated::vanilla average", "in-domain mean",
     "Plain averaging already works (78.8 in-domain, against 55.6"),
    ("federated_pretrained", "every seed", "RegMean", ">", "vanilla average", "in-domain mean",
     "RegMean adds 1.5 points (80.4 ± 1.9; more than averaging on every seed)"),
    ("federated_pretrained", "mean", ("-", "RegMean", "vanilla average"), "in", (1.45, 1.55), "in-domain mean",
     "RegMean adds 1.5 points (80.4 ± 1.9; more than averaging on every seed)"),
    ("federated_pretrained", "every seed", "RegMean", ">", ("max", *PARTIES_2, "ensemble"), "in-domain mean",
     "That is above every party (68.1–76.4) and the four-model ensemble (76.8 ± 2.1) on every seed"),
    ("federated_pretrained", "every seed", "RegMean", "<", "multi-task (union of the data)", "in-domain mean",
     "1.4 points below the multi-task model that needs everyone's data (81.8 ± 1.1; below it on every seed)"),
    ("federated_pretrained", "mean", ("-", "multi-task (union of the data)", "RegMean"), "in", (1.35, 1.45),
     "in-domain mean", "1.4 points below the multi-task model that needs everyone's data"),
    ("federated_pretrained", "every seed", ("min", "vanilla average", "OT activations", "RegMean"), ">",
     "multi-task (union of the data)", "NYT (unseen)",
     "every merge (85.2–85.7) is above the multi-task model (82.3) on every seed"),
    ("federated_pretrained", "mean", ("-", "ensemble", ("max", "vanilla average", "OT activations", "RegMean")), "in",
     (0.0, 1.0), "NYT (unseen)", "within 1 point of the ensemble (86.1) on the mean"),
    ("federated_pretrained", "mean", ("-", "ensemble", ("min", "vanilla average", "OT activations", "RegMean")), "in",
     (0.0, 1.0), "NYT (unseen)", "within 1 point of the ensemble (86.1) on the mean"),
    ("federated_pretrained", "mean", "RegMean", ">", "vanilla average", "*",
     "RegMean above simple averaging and close to multi-task training"),
    ("federated_pretrained", "every seed", ("abs", ("-", "OT activations", "vanilla average")), "<=", 1.35,
     "in-domain mean", "this changes the in-domain mean by at most 1.3 points on any seed"),
    ("federated_pretrained", "seed 1", "IMDB party", "<", 50.0, "tweets",
     "(the IMDB and Amazon parties on tweets)"),
    ("federated_pretrained", "seed 0", "Amazon party", "<", 60.0, "tweets",
     "(the IMDB and Amazon parties on tweets)"),
    # ------------------------------------------------------------ study 3: languages
    ("languages", "seeds 0 2", ("max", "EN party@FI test", "FI party@EN test"), "<", 39.2, None,
     "below the majority rate on five of the six scores"),
    ("languages", "seed 1", "FI party", "<", 39.2, "EN test", "below the majority rate on five of the six scores"),
    ("languages", "seed 1", "EN party", "in", (39.75, 39.85), "FI test",
     "0.6 points above it on the sixth (the English party on Finnish, seed 1: 39.8)"),
    ("languages", "every seed", "vanilla average", "<=", 40.2, "mean",
     "Vanilla averaging is at most the majority rate plus 1 point on every seed"),
    ("languages", "seed 0", "vanilla average", "in", (29.05, 29.15), "mean", "(36.3 on the mean; 29.1 on seed 0)"),
    ("languages", "every seed", ("min", "OT weights (exact)", "OT weights (sinkhorn)", "OT activations"), ">",
     ("max", "EN party@FI test", "FI party@EN test"), ["EN test", "FI test"],
     "above each parent's score in its other language on both tests on every seed"),
    ("languages", "every seed", "OT activations", "<", "OT weights (exact)", "mean",
     "on activations it is below exact OT on weights on every seed"),
    ("languages", "seeds 0 1", "OT weights (exact)", "<", "ensemble", "mean",
     "Exact OT on weights is below the ensemble (52.5) on two seeds of three"),
    ("languages", "seed 2", "OT weights (exact)", ">", "ensemble", "mean", "(seed 2: 51.4 against 50.0)"),
    ("languages", "mean", ("-", "ensemble", "OT weights (exact)"), "in", (1.65, 1.75), "mean",
     "by 1.7 points on the mean"),
    ("languages", "every seed", ("min", "RegMean", "OT + RegMean"), ">",
     ("max", "vanilla average", "OT weights (exact)", "OT weights (sinkhorn)", "OT activations",
      "OT activations (raw)", *MASS_ROWS), "mean", "The RegMean routes are the best fusion"),
    ("languages", "every seed", ("-", "OT + RegMean", "RegMean"), "in", (0.05, 0.65), "mean",
     "OT + RegMean is above RegMean on every seed, by 0.1–0.6 points"),
    ("languages", "mean", ("-", "OT + RegMean", "ensemble"), "in", (5.45, 5.55), "mean",
     "5.5 points above the ensemble on the mean"),
    ("languages", "mean", ("-", "FI party", "OT + RegMean"), "in", (3.45, 3.55), "FI test",
     "3.5 points below the Finnish parent on Finnish"),
    ("languages", "mean", ("-", "EN party", "OT + RegMean"), "in", (6.55, 6.65), "EN test",
     "6.6 below the English parent on English"),
    ("languages", "mean", ("-", "joint (both parties' data)", "OT + RegMean"), "in", (5.55, 5.65), "mean",
     "5.6 below the joint model that needs both datasets"),
    ("languages", "every seed", ("max", "RegMean", "OT + RegMean"), "<", "joint (both parties' data)", "mean",
     "both RegMean routes are below it on every seed"),
    *[("languages", "every seed", r, "<", own, col, "does not match each parent in its own language")
      for r in ("RegMean", "OT + RegMean") for own, col in (("EN party", "EN test"), ("FI party", "FI test"))],
    ("languages", "every seed", ("min", "RegMean", "OT + RegMean"), ">", ("max", "EN party", "FI party", "ensemble"),
     "mean", "gives one model better than either parent and than their ensemble over both languages, on every seed"),
    # ------------------------------------------------------------ study 4: support masses
    *[("shards", "every seed", ("abs", ("-", m, MASS_ROWS[m])), "<=", 0.5, "k=2",
       "l1 and l2 masses within 0.5 points of uniform on every seed") for m in list(MASS_ROWS)[:2]],
    *[("shards", "mean", ("-", MASS_ROWS[m], m), "in", (low, high), "k=2",
       "(below it on the mean, by 0.16 and 0.14)") for m, (low, high) in zip(list(MASS_ROWS)[:2],
                                                                            ((0.155, 0.165), (0.135, 0.145)))],
    ("shards", "seed 0", ("-", "OT activations, activation masses", "OT activations (raw)"), "in", (-0.75, -0.65),
     "k=2", "(−0.7, −0.1, +0.1 by seed; z-scored 74.6)"),
    ("shards", "seed 1", ("-", "OT activations, activation masses", "OT activations (raw)"), "in", (-0.15, -0.05),
     "k=2", "(−0.7, −0.1, +0.1 by seed; z-scored 74.6)"),
    ("shards", "seed 2", ("-", "OT activations, activation masses", "OT activations (raw)"), "in", (0.05, 0.15),
     "k=2", "(−0.7, −0.1, +0.1 by seed; z-scored 74.6)"),
    *[("languages", "mean", ("-", m, "OT weights (exact)"), "in", (1.65, 1.75), "mean",
       "languages l1/l2 masses 52.5/52.5 against uniform 50.8 on the mean (+1.7)") for m in list(MASS_ROWS)[:2]],
    *[("languages", "seeds 0 1", ("-", m, "OT weights (exact)"), ">", 2.0, "mean",
       "more than 2 points above on two seeds and level on the third") for m in list(MASS_ROWS)[:2]],
    *[("languages", "seed 2", ("abs", ("-", m, "OT weights (exact)")), "<=", 0.25, "mean",
       "more than 2 points above on two seeds and level on the third") for m in list(MASS_ROWS)[:2]],
    *[(s, "mean", ("-", m, MASS_ROWS[m]), "<=", 1.0, c,
       "Elsewhere no mass row is more than 1 point above its uniform row on the mean")
      for s, c in (("shards", "k=2"), ("vision", "test")) for m in MASS_ROWS],
    ("languages", "every seed", ("-", "OT activations (raw)", "OT activations, activation masses"), "in", (0.45, 1.55),
     "mean", "lower on all three seeds (by 0.5–1.5 points)"),
    ("languages", "mean", "OT activations, activation masses", "<", "OT activations (raw)", "mean",
     "Languages: raw activations 42.6, with activation masses 41.6"),
    *[(s, "every seed", f"mass:{m}", ">", 0.0, None,
       "Each option does change the plans") for s in ("shards", "languages", "vision") for m in MASS_ROWS],
    # ------------------------------------------------------------ study 5: vision
    ("vision", "every seed", ("min", "OT weights (exact)", "OT weights (sinkhorn)", "OT activations"), ">",
     "vanilla average", "test", "One-shot OT fusion beats vanilla averaging on every seed"),
    ("vision", "mean", ("min", "OT weights (exact)", "OT weights (sinkhorn)", "OT activations"), "in", (50.5, 51.5),
     "test", "(51–60% against 21% on the mean)"),
    ("vision", "mean", ("max", "OT weights (exact)", "OT weights (sinkhorn)", "OT activations"), "in", (59.5, 60.5),
     "test", "(51–60% against 21% on the mean)"),
    ("vision", "mean", "vanilla average", "in", (20.5, 21.5), "test", "(51–60% against 21% on the mean)"),
    ("vision", "every seed", ("max", "OT weights (exact)", "OT weights (sinkhorn)", "OT activations"), "<",
     ("min", "parent A", "parent B"), "test", "It stays far below the parents (85%) on every seed"),
    ("vision", "mean", "OT activations", ">", ("max", "OT weights (exact)", "OT weights (sinkhorn)"), "test",
     "The best one-shot route is OT on activations (60.3"),
    ("vision", "every seed", "OT weights (exact) + fine-tune", ">", "vanilla average + fine-tune", "test",
     "After 85 steps, OT (81.7 ± 2.4) beats vanilla + fine-tune (80.3 ± 1.3) on every seed"),
    ("vision", "seed 0", ("-", "OT weights (exact) + fine-tune", "vanilla average + fine-tune"), "in", (0.15, 0.25),
     "test", "On seed 0 the margin is 0.2 points (80.6 against 80.4)"),
    ("vision", "every seed", "OT weights (exact) + fine-tune", "<", ("min", "parent A", "parent B",
                                                                     "parent A + fine-tune"), "test",
     "On every seed it stays below the parents and below a parent given the same steps"),
    ("vision", "every seed", "wide → narrow OT + fine-tune", ">", "narrow from scratch (fine-tune steps)", "test",
     "against 63.2 ± 2.1 for a narrow model trained from scratch for those steps"),
    ("vision", "every seed", "wide → narrow OT + fine-tune", "<", ("min", "parent A", "parent B"), "test",
     "stays below the narrow parents trained in full (84.8 / 84.6) on every seed"),
    # study 4's vision row, with the uniform-mass raw-activation row scored
    ("vision", "mean", ("-", "OT activations (raw)", "OT activations, activation masses"), "in", (5.35, 5.45),
     "test", "the masses themselves cost 5.4 points on the mean"),
    ("vision", "seeds 0 2", "OT activations, activation masses", "<", "OT activations (raw)", "test",
     "lower on two of three seeds"),
    ("vision", "seed 1", "OT activations, activation masses", ">", "OT activations (raw)", "test",
     "lower on two of three seeds"),
    # ------------------------------------------------------------ study 6: translation (Multi30k)
    ("translation", "every seed", "ensemble", ">", ("max", "half A", "half B"), "BLEU greedy",
     "their ensemble gains a little (21.5, above both halves on every seed)"),
    ("translation", "every seed", "vanilla average", "==", 0.0, "BLEU greedy",
     "vanilla averaging produces nothing (0.0 in every seed)"),
    ("translation", "every seed", "OT + RegMean", ">", 10.0, "BLEU greedy", "the only one-shot route that translates"),
    ("translation", "every seed", "OT + RegMean", ">", ("max", "OT weights (exact)", "OT activations"),
     "BLEU greedy, validation", "so every seed would have chosen it"),
    ("translation", "every seed", "OT + RegMean", "in", (11.25, 13.05), "BLEU greedy, validation",
     "(11.3–13.0 greedy BLEU against 2.0–4.3)"),
    ("translation", "every seed", ("max", "OT weights (exact)", "OT activations"), "in", (1.95, 4.35),
     "BLEU greedy, validation", "(11.3–13.0 greedy BLEU against 2.0–4.3)"),
    ("translation", "every seed", ("max", "vanilla average", "OT weights (exact)", "OT activations", "RegMean"), "<",
     6.0, "BLEU greedy", "the only one-shot route that translates"),
    ("translation", "mean", ("/", "OT + RegMean", ("mean", "half A", "half B")), "in", (0.55, 0.65), "BLEU greedy",
     "at about 60% of the parents' BLEU"),
    ("translation", "mean", ("min", "vanilla average + fine-tune", "OT weights (exact) + fine-tune",
                             "OT activations + fine-tune", "OT + RegMean + fine-tune"), "in", (13.85, 13.95), "BLEU greedy",
     "every fused model recovers to 13.9–18.7 BLEU"),
    ("translation", "mean", ("max", "vanilla average + fine-tune", "OT weights (exact) + fine-tune",
                             "OT activations + fine-tune", "OT + RegMean + fine-tune"), "in", (18.65, 18.75), "BLEU greedy",
     "every fused model recovers to 13.9–18.7 BLEU"),
    ("translation", "every seed", "OT + RegMean + fine-tune", ">", ("max", "vanilla average + fine-tune",
                                                                   "OT weights (exact) + fine-tune",
                                                                   "OT activations + fine-tune"), "BLEU greedy",
     "OT + RegMean best (18.7, chrF 44.1, on every seed)"),
    ("translation", "every seed", "OT + RegMean + fine-tune", ">", ("max", "vanilla average + fine-tune",
                                                                   "OT weights (exact) + fine-tune",
                                                                   "OT activations + fine-tune"), "chrF greedy",
     "OT + RegMean best (18.7, chrF 44.1, on every seed)"),
    ("translation", "every seed", "half A + fine-tune", ">", ("max", "vanilla average + fine-tune",
                                                             "OT weights (exact) + fine-tune",
                                                             "OT activations + fine-tune", "OT + RegMean + fine-tune"),
     ["BLEU greedy", "chrF greedy", "BLEU beam 4", "chrF beam 4"],
     "but none beats half A given the same 204 steps (20.3) on any seed"),
    *[("translation", "every seed", lo, "<", hi, "BLEU greedy",
       "vanilla < OT weights, OT activations < OT + RegMean holds in every seed with and without the fine-tune")
      for ft in ("", " + fine-tune") for lo, hi in
      ((f"vanilla average{ft}", f"OT weights (exact){ft}"), (f"vanilla average{ft}", f"OT activations{ft}"),
       (f"OT weights (exact){ft}", f"OT + RegMean{ft}"), (f"OT activations{ft}", f"OT + RegMean{ft}"))],
    *[("translation", "every seed", ("abs", ("-", f"OT weights (exact){ft}", f"OT activations{ft}")), "<=", 3.4,
       "BLEU greedy", "OT on weights and on activations are within 3.4 BLEU of each other")
      for ft in ("", " + fine-tune")],
    ("translation", "every seed", "vanilla average, encoders only", ">", "vanilla average, decoders only",
     "BLEU greedy", "Averaging only the encoders (vanilla, decoder from A) keeps 15.3 BLEU"),
    ("translation", "every seed", "vanilla average, decoders only", "==", 0.0, "BLEU greedy",
     "averaging only the decoders gives 0.0"),
    ("translation", "every seed", "OT + RegMean, encoders only", ">", "OT + RegMean, decoders only", "BLEU greedy",
     "with OT + RegMean, fusing the encoders only keeps 19.7 ± 3.0"),
    ("translation", "every seed", "OT + RegMean, decoders only", ">", "OT + RegMean", "BLEU greedy",
     "against 12.3 for both (the same order on every seed)"),
    ("translation", "every seed", ("-", "half A", "OT + RegMean, encoders only"), "in", (0.25, 0.65), "BLEU greedy",
     "(0.3–0.6 below half A's own on each seed)"),
    ("translation", "mean", ("max", *[("-", f"{r}@BLEU beam 4", f"{r}@BLEU greedy") for r in ORDER_6]), "in",
     (3.35, 3.45), None, "beam adds up to 3.4 BLEU on the mean"),
    *[("translation", "mean", hi, ">" if i < len(ORDER_6) - 2 else ">=", lo,
       ["BLEU greedy"] + ([] if (hi, lo) in SWAPPED_6 else ["BLEU beam 4"]),
       "Greedy and beam 4 rank the rows the same way on the mean but for two neighbouring pairs")
      for i, (hi, lo) in enumerate(zip(ORDER_6, ORDER_6[1:]))],
    *[("translation", "mean", lo, ">", hi, "BLEU beam 4", "each within noise: half A and half B")
      for hi, lo in SWAPPED_6],
    *[("translation", "mean", ("abs", ("-", hi, lo)), "<", 0.2, "BLEU greedy", "each within noise: half A and half B")
      for hi, lo in SWAPPED_6],
    ("translation", "seed 1", "vanilla average, encoders only", ">", "OT + RegMean, decoders only", "BLEU greedy",
     "not on every seed"),
    ("translation", "seed 1", "vanilla average, encoders only", "<", "OT + RegMean, decoders only", "BLEU beam 4",
     "not on every seed"),
    ("translation", "every seed", "OT + RegMean", ">", "vanilla average", "BLEU greedy",
     "here the first half holds (vanilla 0.0 against 12.3)"),
    ("translation", "mean", "OT + RegMean + fine-tune", "<", ("min", "half A", "half B"),
     ["BLEU greedy", "BLEU beam 4"], "but the recovery overtakes neither parent on the mean"),
    ("translation", "every seed", "OT + RegMean + fine-tune", "<", "half A", ["BLEU greedy", "BLEU beam 4"],
     "but the recovery overtakes neither parent on the mean"),
    ("translation", "seeds 0 1", "OT + RegMean + fine-tune", "<", "half B", "BLEU greedy",
     "overtakes the weaker one on a single seed only"),
    ("translation", "seed 2", "OT + RegMean + fine-tune", ">", "half B", "BLEU greedy",
     "overtakes the weaker one on a single seed only"),
    ("translation", "every seed", "OT + RegMean + fine-tune", "<", ("min", "half A", "half B"), "BLEU beam 4",
     "not with beam 4"),
    # ------------------------------------------------------------ study 7: translation across software domains
    ("translation_domains", "every seed", ("max", *ONE_SHOT_7), "<", ("min", "desktop party", "system party"),
     [*CHRF_7, "BLEU, desktop test"], "Every one-shot fusion is below both parents in chrF on every test and seed"),
    ("translation_domains", "every seed", ("max", *ONE_SHOT_7[:-1]), "<", ("min", "desktop party", "system party"),
     ["BLEU, system test", "BLEU, LibreOffice help (unseen)"],
     "and in BLEU but for three cells where OT + RegMean passes the desktop party"),
    ("translation_domains", "every seed", "OT + RegMean", "<", "system party",
     ["BLEU, system test", "BLEU, LibreOffice help (unseen)"],
     "and in BLEU but for three cells where OT + RegMean passes the desktop party"),
    ("translation_domains", "seeds 0 1", "OT + RegMean", ">", "desktop party", "BLEU, system test",
     "(system strings on seeds 0 and 1: 4.53 / 4.52 against 4.29 / 4.20"),
    ("translation_domains", "seed 2", "OT + RegMean", "<", "desktop party", "BLEU, system test",
     "(system strings on seeds 0 and 1: 4.53 / 4.52 against 4.29 / 4.20"),
    ("translation_domains", "seed 2", "OT + RegMean", ">", "desktop party", "BLEU, LibreOffice help (unseen)",
     "LibreOffice help on seed 2: 0.33 against 0.29"),
    ("translation_domains", "seeds 0 1", "OT + RegMean", "<", "desktop party", "BLEU, LibreOffice help (unseen)",
     "LibreOffice help on seed 2: 0.33 against 0.29"),
    ("translation_domains", "mean", ("/", "OT + RegMean", ("mean", "desktop party", "system party")), "in",
     (0.4, 0.6), ["BLEU, desktop test", "BLEU, system test"], "keeps about half the parents' mean BLEU on each domain"),
    ("translation_domains", "mean", ("max", "OT weights (exact)", "OT activations"), "in", (0.15, 0.45),
     ["BLEU, desktop test", "BLEU, system test"], "little more (0.2–0.4 BLEU, 4.9–6.6 chrF)"),
    ("translation_domains", "mean", ("min", "OT weights (exact)", "OT activations"), ">=", 0.15,
     ["BLEU, desktop test", "BLEU, system test"], "little more (0.2–0.4 BLEU, 4.9–6.6 chrF)"),
    ("translation_domains", "mean", ("min", "OT weights (exact)", "OT activations"), ">=", 4.85,
     ["chrF, desktop test", "chrF, system test"], "little more (0.2–0.4 BLEU, 4.9–6.6 chrF)"),
    ("translation_domains", "mean", ("max", "OT weights (exact)", "OT activations"), "<", 6.65,
     ["chrF, desktop test", "chrF, system test"], "little more (0.2–0.4 BLEU, 4.9–6.6 chrF)"),
    ("translation_domains", "every seed", "vanilla average", "==", 0.0, COLS_7, "vanilla averaging produces nothing"),
    *[("translation_domains", "every seed", lo, "<", hi, CHRF_7,
       "In chrF the order is the same on every test and every seed: vanilla < OT weights, OT activations < RegMean < "
     "OT + RegMean < both parties") for lo, hi in (
        ("vanilla average", ("min", "OT weights (exact)", "OT activations")),
        (("max", "OT weights (exact)", "OT activations"), "RegMean"), ("RegMean", "OT + RegMean"),
        ("OT + RegMean", ("min", "desktop party", "system party")))],
    *[("translation_domains", "every seed", lo, "<", hi, ["BLEU, desktop test", "BLEU, system test"],
       "In BLEU on the two domains' tests the order is the same up to OT + RegMean (RegMean above OT alone on every "
       "seed)") for lo, hi in (
        ("vanilla average", ("min", "OT weights (exact)", "OT activations")),
        (("max", "OT weights (exact)", "OT activations"), "RegMean"), ("RegMean", "OT + RegMean"))],
    ("translation_domains", "every seed", "ensemble", ">", ("max", "desktop party", "system party"),
     ["BLEU, desktop test", "chrF, desktop test"], "the ensemble is above both parents on desktop strings on every seed"),
    ("translation", "every seed", "ensemble", ">", ("max", "half A", "half B"), "*",
     "As in study 6, the ensemble is above both parents"),
    ("translation_domains", "every seed", "ensemble", "<", "system party", ["BLEU, system test", "chrF, system test"],
     "but unlike study 6 it is below the system party on system strings on every seed (BLEU 11.4 / 11.6 / 8.7 "
     "against 14.2 / 14.6 / 11.8)"),
    ("translation_domains", "every seed", "ensemble", ">", "desktop party", ["BLEU, system test", "chrF, system test"],
     "between the two parents there"),
    ("translation_domains", "every seed", "ensemble", ">", ("max", *ONE_SHOT_7), COLS_7,
     "It is above every one-shot fusion on every test and seed."),
    ("translation_domains", "every seed", "joint (both domains' data)", ">",
     ("max", "desktop party", "system party", "ensemble", *ONE_SHOT_7), COLS_7,
     "The joint model trained on both domains is far ahead on every test"),
    ("translation_domains", "every seed", "joint (both domains' data)", ">=",
     ("+", 6.5, ("max", "desktop party", "system party", "ensemble")), ["BLEU, desktop test", "BLEU, system test"],
     "at least 6.5 BLEU above the best party or the ensemble on each domain"),
    ("translation_domains", "every seed", "joint (both domains' data)", ">=",
     ("+", 9.4, ("max", "desktop party", "system party", "ensemble")), CHRF_7, "and 9.4 chrF on every test)"),
    ("translation_domains", "every seed", "system party", ">", "desktop party", "BLEU, system test",
     "the system party beats the desktop party there on every seed"),
    ("translation_domains", "mean", "system party", ">=", "desktop party", "BLEU, desktop test",
     "on desktop strings the desktop party is not better than the system party"),
    ("translation_domains", "seeds 0 2", "system party", ">", "desktop party", "BLEU, desktop test",
     "(8.5 against 9.8; ahead on one seed of three)"),
    ("translation_domains", "seed 1", "desktop party", ">", "system party", "BLEU, desktop test",
     "(8.5 against 9.8; ahead on one seed of three)"),
    ("translation_domains", "every seed", ("max", "desktop party", "system party", "ensemble", *ONE_SHOT_7), "<", 1.5,
     "BLEU, LibreOffice help (unseen)", "every model but the joint one stays below 1.5 BLEU"),
    ("translation_domains", "every seed", "joint (both domains' data)", "in", (1.5, 2.05),
     "BLEU, LibreOffice help (unseen)", "(the joint one 1.5–2.0;"),
    ("translation_domains", "every seed", ("-", "RegMean", ("max", "OT weights (exact)", "OT activations")), ">", 1.0,
     "chrF, LibreOffice help (unseen)", "chrF separates the rows that BLEU leaves near zero there"),
    ("translation_domains", "every seed", "desktop party", "in", (6.95, 9.75), "BLEU, desktop test",
     "on its own domain (7.0–9.7 over the seeds)"),
    ("translation_domains", "every seed", "desktop party", "<", 13.3, "BLEU, desktop test",
     "is below the pilot's validation point"),
    # ------------------------------------------------------------ study 8: four classifiers of one base
    *[("multitask", "every seed", best, "<", other, "mean over tasks",
       "are below the multi-task model (64.3) and the four fine-tunes each on its own task (65.4) on every seed")
      for best in ("otfuse DARE-TIES", "otfuse DARE")
      for other in ("multi-task (one body, 4 heads)", "individual (each fine-tune, own task)")],
    *[("multitask", "every seed", row, "<", "multi-task (one body, 4 heads)", "mean over tasks",
       "no merge reaches the multi-task model or the separate fine-tunes")
      for row in ("otfuse average", "otfuse task arithmetic", "otfuse TIES", "otfuse DARE", "otfuse DARE-TIES",
                  "otfuse Fisher", "otfuse RegMean", "otfuse RegMean-TIES", "otfuse RegMean-DARE", "mergekit linear",
                  "mergekit task_arithmetic", "mergekit ties", "mergekit dare_linear", "mergekit dare_ties")],
    ("multitask", "mean", ("/", "otfuse DARE-TIES", "individual (each fine-tune, own task)"), "in", (0.955, 0.965),
     "mean over tasks", "keeps 96% of their accuracy in one body"),
    ("multitask", "mean", ("-", "otfuse DARE-TIES", "pre-trained body, own heads"), "in", (25.65, 25.75),
     "mean over tasks", "25.7 points above the pre-trained body with the same heads (37.3)"),
    ("multitask", "every seed", "otfuse average", "<", ("min", "otfuse task arithmetic", "otfuse TIES"),
     "mean over tasks", "Plain averaging (55.5) is far behind on every seed"),
    ("multitask", "mean", ("-", "otfuse task arithmetic", "otfuse average"), "in", (6.75, 6.85), "mean over tasks",
     "the validation choice λ 0.5 gains 6.8 points"),
    ("multitask", "mean", ("abs", ("-", "otfuse RegMean", "otfuse task arithmetic")), "<=", 0.5, "mean over tasks",
     "is level with task arithmetic (62.3) here"),
    *[("multitask", "mean", ("abs", ("-", row, "otfuse RegMean")), "<", 0.1, "mean over tasks",
       "on its own TIES or DARE task vectors it moves less than 0.1 points")
      for row in ("otfuse RegMean-TIES", "otfuse RegMean-DARE")],
    *[("multitask", "mean", ("-", "Debian section fine-tune", row), "in", (4.75, 6.3), "Debian section",
       "every task-vector or RegMean merge is 4.8–6.3 points below the Debian fine-tune (43.6) on the mean")
      for row in ("otfuse task arithmetic", "otfuse TIES", "otfuse DARE", "otfuse DARE-TIES", "otfuse RegMean",
                  "otfuse RegMean-TIES", "otfuse RegMean-DARE")],
    *[("multitask", "every seed", ours, "==", theirs, "*",
       "average / linear, task arithmetic and TIES give the same accuracies to the last digit on every seed")
      for ours, theirs in (("otfuse average", "mergekit linear"), ("otfuse task arithmetic", "mergekit task_arithmetic"),
                           ("otfuse TIES", "mergekit ties"))],
    ("multitask", "every seed", "otfuse DARE-TIES", ">",
     ("max", "mergekit linear", "mergekit task_arithmetic", "mergekit ties", "mergekit dare_linear",
      "mergekit dare_ties"), "mean over tasks", "otfuse's DARE-TIES (λ 0.7, density 0.2) is above mergekit's best rule on every seed"),
    # ------------------------------------------------------------ README: the studies summary
    ("shards", "every seed", "CCA + RegMean", ">", ("max", *(f"shard {i}" for i in range(1, 5)), "ensemble"), "k=4",
     "the best merge of 4 shards, CCA + RegMean (74.9), is also above every shard and"),
    ("shards", "mean", "CCA + RegMean", ">", ("max", *(r for r in SHARDS_ALIGNED if r != "CCA + RegMean"), "RegMean",
                                             "vanilla average"), "k=4",
     "the best merge of 4 shards, CCA + RegMean (74.9)"),
    ("shards", "mean", ("-", "CCA + RegMean", "whole data"), "in", (0.0, 1.0), "k=4",
     "and level with the whole-data model (74.3; above it on two seeds of three)"),
    ("shards", "seeds 0 2", "CCA + RegMean", ">", "whole data", "k=4",
     "and level with the whole-data model (74.3; above it on two seeds of three)"),
    ("shards", "every seed", "shards (mean)", ">", 0, "k=8", "three of which stayed at chance on every seed"),
    ("shards", "mean", "CCA + RegMean", ">", ("max", *(r for r in SHARDS_ALIGNED if r != "CCA + RegMean"), "RegMean",
                                             "vanilla average"), "k=8",
     "it keeps 67.7 against the ensemble's 69.0 (below it on two seeds)"),
    ("shards", "seeds 1 2", "CCA + RegMean", "<", "ensemble", "k=8",
     "it keeps 67.7 against the ensemble's 69.0 (below it on two seeds)"),
    ("shards", "mean", ("max", "vanilla average + fine-tune", "OT weights (exact) + fine-tune",
                        "OT + RegMean + fine-tune"), "<", "CCA + RegMean", "*",
     "and a short fine-tune lifts no fused model above the best one-shot merge"),
    *[(st, "every seed", best, ">", ("max", *parties, "ensemble"), col,
       "the best merge is above every party and above the ensemble on every seed")
      for st, best, parties, col in (("federated", "OT + RegMean", PARTIES_2, "in-domain mean"),
                                     ("federated_pretrained", "RegMean", PARTIES_2, "in-domain mean"),
                                     ("languages", "OT + RegMean", ["EN party", "FI party"], "mean"))],
    *[(st, "mean", best, ">", ("max", *others), col,
       "(OT + RegMean on four sentiment domains and across English and Finnish; RegMean for children of one")
      for st, best, col, others in (
          ("federated", "OT + RegMean", "in-domain mean", ("vanilla average", "OT weights (exact)",
                                                           "OT weights (sinkhorn)", "OT activations", "RegMean")),
          ("federated_pretrained", "RegMean", "in-domain mean", ("vanilla average", "OT weights (exact)",
                                                                 "OT weights (sinkhorn)", "OT activations")),
          ("languages", "OT + RegMean", "mean", ("vanilla average", "OT weights (exact)", "OT weights (sinkhorn)",
                                                 "OT activations", "OT activations (raw)", "RegMean", *MASS_ROWS)))],
    *[(st, "every seed", best, "<", upper, col, "and below the model trained on everyone's data on every seed")
      for st, best, upper, col in (("federated", "OT + RegMean", "multi-task (union of the data)", "in-domain mean"),
                                   ("federated_pretrained", "RegMean", "multi-task (union of the data)",
                                    "in-domain mean"),
                                   ("languages", "OT + RegMean", "joint (both parties' data)", "mean"))],
    ("federated_pretrained", "every seed", "RegMean", ">", "vanilla average", "in-domain mean",
     "RegMean 1.5 points above averaging, on every seed"),
    ("federated_pretrained", "mean", ("-", "RegMean", "vanilla average"), "in", (1.45, 1.55), "in-domain mean",
     "RegMean 1.5 points above averaging, on every seed"),
    ("vision", "every seed", ("max", "OT weights (exact)", "OT weights (sinkhorn)", "OT activations",
                              "OT weights (exact) + fine-tune"), "<", ("min", "parent A", "parent B"), "test",
     "fusion does not reach the parents, even after a short fine-tune"),
    *[(s, "mean", f"mass:{m}", "in", (35.5, 81.49), None, "Support masses change the plans (36–81% of matches)")
      for s in ("shards", "languages", "vision") for m in MASS_ROWS],
    *[(s, "mean", ("-", m, MASS_ROWS[m]), "<=", 1.0, c, "raise the accuracy by more than 1 point in one place only")
      for s, c in (("shards", "k=2"), ("vision", "test")) for m in MASS_ROWS],
    ("languages", "mean", ("-", "OT activations, activation masses", "OT activations (raw)"), "<=", 1.0, "mean",
     "raise the accuracy by more than 1 point in one place only"),
    *[("languages", "mean", ("-", m, "OT weights (exact)"), "in", (1.65, 1.75), "mean",
       "(weight-norm masses across English and Finnish, +1.7 on the mean, on two seeds of three)")
      for m in list(MASS_ROWS)[:2]],
    ("translation", "mean", "half A + fine-tune", ">", "OT + RegMean + fine-tune", "BLEU greedy",
     "a short fine-tune does not beat a parent given the same steps (18.7 against 20.3)"),
    ("translation_domains", "every seed", "ensemble", ">", ("max", "desktop party", "system party"),
     "BLEU, desktop test",
     "the ensemble is above both parents on desktop strings but below the system party on system strings"),
    ("translation_domains", "every seed", "ensemble", "<", "system party", "BLEU, system test",
     "the ensemble is above both parents on desktop strings but below the system party on system strings"),
    ("translation_domains", "mean", ("/", "OT + RegMean", ("mean", "desktop party", "system party")), "in",
     (0.4, 0.6), ["BLEU, desktop test", "BLEU, system test"], "the best fusion keeps about half a parent's BLEU"),
    ("translation", "mean", ("/", "OT + RegMean", ("mean", "half A", "half B")), "in", (0.55, 0.65), "BLEU greedy",
     "one-shot OT + RegMean keeps about 60% of the parents' BLEU"),
    ("translation", "every seed", "vanilla average", "==", 0.0, "BLEU greedy", "(vanilla averaging none)"),
    ("translation", "every seed", ("-", "half A", "OT + RegMean, encoders only"), ">", 0.0, "BLEU greedy",
     "fusing only the encoders keeps 19.7 BLEU against half A's 20.2"),
    ("translation", "every seed", "OT + RegMean, encoders only", ">", "OT + RegMean, decoders only", "BLEU greedy",
     "the ablation puts the damage in the decoders"),
    ("translation_domains", "every seed", "joint (both domains' data)", ">", ("max", "desktop party", "system party",
                                                                             "ensemble"), COLS_7,
     "a joint model on both domains' strings is far ahead"),
    ("multitask", "every seed", "otfuse DARE-TIES", "<", "multi-task (one body, 4 heads)", "mean over tasks",
     "keep 96% of the fine-tunes' accuracy in one body but stay below the multi-task model on every seed"),
    ("multitask", "mean", "otfuse DARE-TIES", "in", (62.95, 63.05), "mean over tasks",
     "DARE-TIES 63.0 (mergekit best 62.3)"),
    ("multitask", "mean", ("max", "mergekit linear", "mergekit task_arithmetic", "mergekit ties",
                           "mergekit dare_linear", "mergekit dare_ties"), "in", (62.25, 62.35), "mean over tasks",
     "DARE-TIES 63.0 (mergekit best 62.3)"),
]


# ---------------------------------------------------------------- evaluation

@lru_cache(maxsize=None)
def load(study: str, results: Path = RESULTS) -> dict:
    return json.loads((results / f"{study}.json").read_text())


def _seed_indices(doc: dict, scope: str) -> list[int] | str:
    seeds = list(doc["seeds"])
    if scope in ("every seed", "some seed"):
        return list(range(len(seeds)))
    if scope == "mean":
        return "mean"
    words = scope.split()
    if words[0] in ("seed", "seeds") and len(words) > 1:
        wanted = [int(w) for w in words[1:]]
        missing = [s for s in wanted if s not in seeds]
        if missing:
            raise ValueError(f"seed(s) {missing} not in the results (seeds {seeds})")
        return [seeds.index(s) for s in wanted]
    raise ValueError(f"unknown scope {scope!r}")


def _cell(study: str, row: str, column: str | None, k: int | str, results: Path) -> float:
    doc = load(study, results)
    if row.startswith("mass:"):
        name = row[len("mass:"):]
        values = [c[name] * 100 for c in doc["mass_changes"]]
    elif row.startswith("time:"):
        name = row[len("time:"):]
        values = [t[name] for t in doc["timing"]]
    else:
        if "@" in row:
            row, column = row.rsplit("@", 1)
        if column is None:
            raise ValueError(f"term {row!r} needs a column")
        key = f"{row}|{column}"
        # a cell of the table, or a value every run holds that the table leaves out (study 1's shards 3-8,
        # study 6's validation BLEU)
        if not all(key in r for r in doc["runs"]):
            raise KeyError(f"{study}: no row {row!r} or column {column!r}")
        scale = doc.get("value_scale", 100.0)
        values = [r[key] * scale for r in doc["runs"]]
    return sum(values) / len(values) if k == "mean" else values[k]


def value(study: str, term, column: str | None, k: int | str, results: Path = RESULTS) -> float:
    """A term's value for seed index k (or "mean")."""
    if isinstance(term, (int, float)):
        return float(term)
    if isinstance(term, str):
        if "::" in term:
            other, row = term.split("::", 1)
            return _cell(other, row, column, k, results)
        return _cell(study, term, column, k, results)
    fn, *args = term
    vals = [value(study, a, column, k, results) for a in args]
    if fn == "max":
        return max(vals)
    if fn == "min":
        return min(vals)
    if fn == "mean":
        return sum(vals) / len(vals)
    if fn == "abs":
        (v,) = vals
        return abs(v)
    a, b = vals
    if fn == "-":
        return a - b
    if fn == "+":
        return a + b
    if fn == "*":
        return a * b
    if fn == "/":
        return a / b
    raise ValueError(f"unknown function {fn!r}")


def _holds(op: str, left: float, right) -> bool:
    if op == "<":
        return left < right
    if op == "<=":
        return left <= right
    if op == ">":
        return left > right
    if op == ">=":
        return left >= right
    if op == "==":
        return abs(left - right) <= 1e-9
    if op == "~":
        target, tol = right
        return abs(left - target) <= tol
    if op == "in":
        low, high = right
        return low <= left <= high
    raise ValueError(f"unknown op {op!r}")


def evaluate(claim: tuple, results: Path = RESULTS) -> tuple[bool, list[str]]:
    """(holds, one line per (column, seed) compared) for one claim."""
    study, scope, left, op, right, columns, quote = claim
    doc = load(study, results)
    if columns == "*":
        columns = list(doc["columns"])
    elif columns is None or isinstance(columns, str):
        columns = [columns]
    indices = _seed_indices(doc, scope)
    checks, lines = [], []
    for column in columns:
        for k in (["mean"] if indices == "mean" else indices):
            lv = value(study, left, column, k, results)
            if op == "~":
                rv = (value(study, right[0], column, k, results), right[1])
            elif op == "in":
                rv = tuple(value(study, r, column, k, results) for r in right)
            else:
                rv = value(study, right, column, k, results)
            ok = _holds(op, lv, rv)
            checks.append(ok)
            where = "mean" if k == "mean" else f"seed {doc['seeds'][k]}"
            shown = f"({rv[0]:.3f}, {rv[1]:.3f})" if isinstance(rv, tuple) else f"{rv:.3f}"
            lines.append(f"{'ok ' if ok else 'NO '} {column or '-'} | {where}: {lv:.3f} {op} {shown}")
    holds = any(checks) if scope == "some seed" else all(checks)
    return holds, lines


def fold(text: str) -> str:
    """White space folded and Markdown emphasis dropped, for finding a quote in the prose."""
    return " ".join(text.replace("*", "").split())


def missing_quotes(claims: list[tuple] = CLAIMS, docs=DOCS) -> list[str]:
    prose = " ".join(fold(Path(d).read_text()) for d in docs)
    return sorted({c[-1] for c in claims if fold(c[-1]) not in prose})


def check(claims: list[tuple] = CLAIMS, results: Path = RESULTS) -> list[tuple[tuple, list[str]]]:
    """The claims that do not hold, each with its comparisons."""
    failed = []
    for claim in claims:
        holds, lines = evaluate(claim, results)
        if not holds:
            failed.append((claim, lines))
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default=None, help="only this study's claims")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--quiet", action="store_true", help="print only what fails")
    args = ap.parse_args(argv)
    claims = [c for c in CLAIMS if args.study in (None, c[0])]
    bad = 0
    for claim in claims:
        holds, lines = evaluate(claim, args.results)
        bad += not holds
        if not holds or not args.quiet:
            print(f"{'PASS' if holds else 'FAIL'} [{claim[0]}, {claim[1]}] {claim[-1]!r}")
            for line in lines:
                print("     " + line)
    quotes = missing_quotes(claims)
    for q in quotes:
        print(f"QUOTE NOT FOUND in STUDIES.md / README.md: {q!r}")
    print(f"{len(claims) - bad} of {len(claims)} claims hold; {len(quotes)} quotes not found")
    return int(bool(bad or quotes))


if __name__ == "__main__":
    sys.exit(main())
