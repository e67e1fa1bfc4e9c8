"""Typed, frozen option objects shared by the library and the command line.

Each field carries its command-line flag and help; fields with a fixed set of values name the registry
their choices come from, so a new solver, metric or merge rule shows up in `--help` and is checked at parse
time. Building an object checks every value, so a library call with `solver="foo"` fails at once, before
any model is read. This module stays light (no torch, POT or SciPy) so that the CLI's checks are instant."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace

from otfuse_cli.alignment.metrics import METRICS, STANDARDIZE
from otfuse_cli.alignment.solvers import COST_NORMS, MARGINALS, SOLVERS
from otfuse_cli.errors import OtfuseError
from otfuse_cli.merging.rules import MERGES

# Feature providers (pipeline.PROVIDERS), output dtypes and bare-net activations need torch to build, so
# their names are declared here; tests check they match those tables.
ALIGN_BY = ("weights", "activations", "cca", "none")
MAX_SKETCH = 1 << 16
# AlignOptions fields that shape the transport plans: none is read with --align none.
PLAN_FIELDS = ("solver", "reg", "metric", "marginals", "cost_norm", "refine", "max_iter", "sketch", "rounds",
               "ridge")
DEFAULT_RIDGE = 0.3  # --align cca: chosen on validation (benchmarks/merge_rules.py; alignment/linear.py)
DEFAULT_ROUNDS = 5  # AlignOptions.rounds_for: with three or more parents
DTYPES = ("keep", "float32", "float16", "bfloat16")
ACTIVATIONS = ("relu", "gelu", "tanh")
DEVICE_MAPS = ("auto", "balanced", "sequential")  # accelerate's placements (transformers device_map)


def option(default, flag: str, help: str, choices=None, minimum=None, maximum=None, metavar=None):
    """A field with its CLI flag, help and (optional) allowed values, bounds and placeholder."""
    meta = {"flag": flag, "help": help}
    if metavar is not None:
        meta["metavar"] = metavar
    if choices is not None:
        meta["choices"] = tuple(choices)
    if minimum is not None:
        meta["minimum"] = minimum
    if maximum is not None:
        meta["maximum"] = maximum
    return field(default=default, metadata=meta)


# A field's declared type -> the Python types its value may have, and how to say so. Library calls and recipes
# (YAML) give values the command line's parser never saw: `refine: 1.5` or `reg: "abc"` must fail here, in
# one line, not as a TypeError deep in a solver. bool is an int to Python, so it is refused for numbers.
_VALUE_TYPES = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "str": ((str,), "text"),
                "bool": ((bool,), "true or false")}


def _type_problem(f, value) -> str | None:
    declared = [t for t in str(f.type).split(" | ") if t != "None"]  # "int | None" -> ["int"]
    if not declared or any(t not in _VALUE_TYPES for t in declared):
        return None
    if any(isinstance(value, _VALUE_TYPES[t][0]) and (t == "bool" or not isinstance(value, bool)) for t in declared):
        return None
    return f"{f.metadata['flag']} must be {' or '.join(_VALUE_TYPES[t][1] for t in declared)}, got {value!r}"


class Options:
    """Shared checks and serialisation for the option dataclasses."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None:
                continue
            if problem := _type_problem(f, value):
                raise OtfuseError(problem)
            if "choices" in meta and value not in meta["choices"]:
                raise OtfuseError(f"unknown {meta['flag']} {value!r}; choose from {', '.join(meta['choices'])}")
            if "minimum" in meta and not (isinstance(value, (int, float)) and value >= meta["minimum"]):
                raise OtfuseError(f"{meta['flag']} must be at least {meta['minimum']}, got {value!r}")
            if "maximum" in meta and not value <= meta["maximum"]:
                raise OtfuseError(f"{meta['flag']} must be at most {meta['maximum']}, got {value!r}")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AlignOptions(Options):
    """How transport plans are computed."""

    align: str = option("weights", "--align", "weights (no data), activations (needs --data; every model runs "
                        "on the same inputs), cca (linear maps from the activations' canonical correlations where "
                        "a space takes one, permutations elsewhere; needs --data) or none (vanilla merging, the "
                        "baseline).", ALIGN_BY)
    solver: str = option("exact", "--solver", "exact (assignment / network simplex) or sinkhorn (soft).", SOLVERS)
    reg: float = option(0.01, "--reg", "Sinkhorn regularisation, relative to the scaled cost.", minimum=1e-6)
    metric: str = option("sqeuclidean", "--metric", "Ground metric between neurons.", METRICS)
    marginals: str = option("uniform", "--marginals", "Support masses: uniform or neuron-norm importance.",
                            MARGINALS)
    cost_norm: str = option("mean", "--cost-norm", "Scale costs by their mean or max (or none) before solving.",
                            COST_NORMS)
    refine: int | None = option(None, "--refine", "Extra passes over all spaces until plans stop changing "
                                "(weights; default 5 for exact plans, 1 for sinkhorn or --sketch, measured).",
                                minimum=0)
    max_iter: int = option(5000, "--max-iter", "Sinkhorn: passes over the kernel per solve (iterations, Newton's "
                           "conjugate-gradient steps and epsilon-scaling stages all count) before a plan that "
                           "has not met its marginals is refused (a work budget: results never depend on the "
                           "clock).",
                           minimum=1)
    rounds: int | None = option(None, "--rounds", "Barycentric rounds after the anchor's alignment: every model, the "
                                "anchor too, is aligned to the mean of the others and the result re-merged, until no "
                                "plan changes or N rounds (0: every model aligned to the anchor). Default: 5 with three "
                                "or more models, 0 with two (measured on validation); 0 with --align cca (not "
                                "measured).", minimum=0, maximum=100,
                                metavar="N")
    ridge: float = option(DEFAULT_RIDGE, "--ridge", "--align cca: ridge added to each model's activation covariance, "
                          "relative to its mean variance.", minimum=0.0)
    time_limit: float | None = option(None, "--time-limit", "Abort (exit 2, nothing written) once this many "
                                      "seconds of wall time have passed; never changes a result.", minimum=0.0,
                                      metavar="SECONDS")
    # At most 2**16 buckets: 16x the 4096 measured at 7B (README, Large models), relative error ~0.6%, where an
    # exact cost is the better tool; each side's sketch is width x D float64 (11,008 x 65,536: 5.8 GB), and
    # 10**12 was an allocation failure with a traceback.
    sketch: int | None = option(None, "--sketch", "Weights: hash each space's per-unit weight columns into D "
                                "buckets (a seeded CountSketch) so a cost costs O(width x D), not O(width x "
                                "model); for 7B-class pairs.", minimum=16, maximum=MAX_SKETCH, metavar="D")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not math.isfinite(self.reg):
            raise OtfuseError(f"--reg must be a finite number, got {self.reg!r}")
        if not math.isfinite(self.ridge):
            raise OtfuseError(f"--ridge must be a finite number, got {self.ridge!r}")
        if self.align not in ("cca", "none") and self.ridge != DEFAULT_RIDGE:
            raise OtfuseError("--ridge does not apply: it regularises --align cca's covariances")
        if self.time_limit is not None and not math.isfinite(self.time_limit):
            raise OtfuseError(f"--time-limit must be a finite number of seconds, got {self.time_limit!r}")
        if self.align == "none":  # vanilla merging: no plan is computed, so no option of the solve is read
            unused = [f.metadata["flag"] for f in fields(self)
                      if f.name in PLAN_FIELDS and getattr(self, f.name) != f.default]
            if unused:
                raise OtfuseError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply: --align "
                                  "none computes no transport plans (vanilla merging)")

    @property
    def reads_data(self) -> bool:
        """Whether the plans come from the models run on --data (activation statistics)."""
        return self.align in ("activations", "cca")

    def rounds_for(self, models: int) -> int:
        """Barycentric rounds for this many models. With three parents, rounds raised validation accuracy in all
        nine comparisons on the BatchNorm CNNs of benchmarks/cnn_parents.py (3 seeds; weights, weights + repair,
        activations: +1.2 to +8.4 points); with two they changed nothing there, at the cost of more alignments."""
        if self.rounds is not None:
            return self.rounds
        # linear maps (cca) were not measured with rounds: none unless asked for
        return DEFAULT_ROUNDS if models >= 3 and self.align in ("weights", "activations") else 0

    @property
    def sweeps(self) -> int:
        """Refinement passes. Hard plans stop early once stable; soft plans keep drifting, so every sweep runs:
        on the BERT pair's validation half one sweep gave 76.8% (refine 0: 72.6%, 5: 76.6%) at a fifth of
        five sweeps' CPU time, and on the digit MLPs more sweeps changed nothing but the time."""
        if self.refine is not None:
            return self.refine
        # sketched costs keep moving plans between near-equal candidates as the neighbours change: at 125M
        # five sweeps ran without converging (90 CPU-s) where one gives the same pass count as exact (32)
        return 1 if self.solver == "sinkhorn" or self.sketch else 5


@dataclass(frozen=True)
class DataOptions(Options):
    """Sample inputs and forward passes: activation alignment, BatchNorm repair, activation compression.
    `device` runs the forward passes, and (named, not auto) the weights route's features, cross terms, costs and
    Sinkhorn (the exact solvers take each cost to the CPU) and fuse's merge of every tensor."""

    data: str | None = option(None, "--data", "Sample inputs: jsonl/csv/tsv/txt/npz/safetensors, parquet (a file or "
                              "a folder of shards), a datasets save_to_disk folder, or a dataset id in the Hugging "
                              "Face datasets cache (read offline).", metavar="FILE")
    split: str | None = option(None, "--split", "Which split of --data: a DatasetDict folder, a folder of "
                               "<split>-00000-of-00002.parquet shards or a cached dataset id (default: its only "
                               "split).", metavar="SPLIT")
    samples: int = option(256, "--samples", "Number of sample inputs.", minimum=1)
    seed: int = option(0, "--seed", "Seed for sampling inputs and tokens (and compress's clustering).", minimum=0,
                      maximum=2**63 - 1)
    max_tokens: int = option(4096, "--max-tokens", "Activation rows (tokens/positions) per module that enter "
                             "the costs: a seeded choice, the same tokens in every model.", minimum=1)
    standardize: str | None = option(None, "--standardize", "Activation standardisation before matching "
                                     "(default: per family, measured; none to compress).", STANDARDIZE)
    activation: str | None = option(None, "--activation", "Nonlinearity of bare MLP/CNN/ResNet state dicts.",
                                    ACTIVATIONS)
    post_activation: bool | None = option(None, "--post-activation/--pre-activation",
                                          "Match bare MLP/CNN units after (or before) the nonlinearity "
                                          "(default: per family, measured).")
    max_length: int = option(128, "--max-length", "Token limit per text sample.", minimum=1)
    device: str = option("auto", "--device", "auto, cpu or cuda: where forward passes run, and (named, not "
                         "auto) the weights route's features, costs and Sinkhorn, and fuse's merge of every tensor.",
                         metavar="DEVICE")
    device_map: str | None = option(None, "--device-map", "Spread each model's layers for activation "
                                    "alignment over the GPUs, CPU memory and disk (accelerate): auto, balanced, "
                                    "sequential. For models that do not fit one device; overrides --device.",
                                    DEVICE_MAPS)

    def __post_init__(self) -> None:
        if isinstance(self.data, os.PathLike):  # library callers pass Path objects
            object.__setattr__(self, "data", os.fspath(self.data))
        super().__post_init__()
        if self.data is not None and not self.data.strip():
            raise OtfuseError(f"--data needs a file name, got {self.data!r}")
        if self.split is not None and not self.split.strip():
            raise OtfuseError(f"--split needs a split name, got {self.split!r}")
        if self.split is not None and self.data is None:
            raise OtfuseError("--split picks a split of --data; give --data too")

    def for_family(self, family: str) -> "DataOptions":
        """Unset activation choices filled with the family's measured defaults (arch.activation_defaults)."""
        from otfuse_cli.arch import activation_defaults

        standardize, post = activation_defaults(family)
        return replace(self, standardize=self.standardize or standardize,
                       post_activation=post if self.post_activation is None else self.post_activation)

    def collect(self) -> dict:
        """What activation collection needs (everything but the standardisation, applied afterwards)."""
        return {k: v for k, v in self.to_json().items() if k != "standardize"}


@dataclass(frozen=True)
class OutputOptions(Options):
    """How a checkpoint is written."""

    dtype: str = option("keep", "--dtype", "Output dtype (keep = each input tensor's own).", DTYPES)
    max_shard_size: str | int = option("5GB", "--max-shard-size", "Shard folder outputs above this size.", metavar="SIZE")
    force: bool = option(False, "--force", "Overwrite an existing output.")

    def __post_init__(self) -> None:
        super().__post_init__()
        # parse_size (checkpoint.writer) reads the size; a number of hundreds of digits became float('inf') there
        # and an OverflowError traceback. No real size needs more than a few characters.
        if isinstance(self.max_shard_size, str) and len(self.max_shard_size) > 32:
            raise OtfuseError(f"--max-shard-size {self.max_shard_size[:24]!r}... is not a size (examples: 5GB, 200MB, "
                              "500KB)")


HEADS = ("auto", "merge", "keep")


@dataclass(frozen=True)
class MergeOptions(Options):
    """How the aligned parents combine; regmean and fisher read statistics (--stats files, or --data); the
    task-vector rules (task-arithmetic, ties, dare, dare-ties) merge theta_k - theta_base (--base)."""

    merge: str = option("average", "--merge", "average, regmean (Gram matrices of each linear layer's inputs), "
                        "fisher (diagonal Fisher); with --base also the task-vector rules task-arithmetic, ties, "
                        "dare, dare-ties, and RegMean on TIES' or DARE's task vectors: regmean-ties, "
                        "regmean-dare.", MERGES, metavar="RULE")
    regmean_alpha: float = option(0.9, "--regmean-alpha", "RegMean: weight of the off-diagonal Gram entries "
                                  "(1 = exact least squares, 0 = diagonal).", minimum=0.0, maximum=1.0)
    scale: float | None = option(None, "--scale", "Task-vector rules: lambda, the merged task vector's scale "
                                 "(default per rule: see README, chosen on validation).", minimum=0.0,
                                 metavar="LAMBDA")
    density: float | None = option(None, "--density", "ties / dare / dare-ties: fraction of each task vector "
                                   "kept (ties: largest magnitudes; dare: at random, rescaled).", minimum=1e-6,
                                   maximum=1.0)
    heads: str = option("auto", "--heads", "Task heads (classifier, score): keep gives every parent its own "
                        "head on the merged body, one model folder each (OUT/<name>/); merge fuses them; auto "
                        "keeps them when the parents' label sets differ.", HEADS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale is not None and not math.isfinite(self.scale):
            raise OtfuseError(f"--scale must be a finite number, got {self.scale!r}")

    def resolved(self) -> "MergeOptions":
        """Unset --scale / --density filled with the rule's defaults (merging.rules.DEFAULTS)."""
        from otfuse_cli.merging.rules import DEFAULTS

        given = DEFAULTS.get(self.merge, {})
        return replace(self, scale=self.scale if self.scale is not None else given.get("scale", 1.0),
                       density=self.density if self.density is not None else given.get("density", 1.0))
