"""mergekit configurations: `otfuse run config.yaml -o OUT` also reads mergekit's YAML (recognised by its
`merge_method`) and runs the otfuse `fuse` recipe that computes the same merge, or refuses in one line naming
the method or key it cannot reproduce. Translation only: nothing is read but the YAML, nothing is run here.

    mergekit                          otfuse fuse (always --align none: mergekit aligns nothing)
    linear                            --merge average --weights w            (normalize: true, the default)
    task_arithmetic                   --merge task-arithmetic --base B --weights w --scale s
    ties                              --merge ties --base B --weights w --density d --scale lambda
    dare_linear                       --merge dare --base B --weights w --density d --scale s
    dare_ties                         --merge dare-ties --base B --weights w --density d --scale lambda

mergekit's sum over the K non-base models is lambda * sum_k w_k tau_k / D (D = sum_k w_k with normalize: true,
else 1); otfuse's is s * K * sum_k (w_k / sum w) tau_k, so s = lambda * sum(w) / (K * D). TIES and DARE-TIES
take the weighted mean of the sign-agreeing entries in both tools (mergekit's normalize: true; without it
mergekit sums them, which otfuse does not compute). Values are the mergekit 0.1.5 defaults (its
merge_methods/registry.py and generalized_task_arithmetic.py)."""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from otfuse_cli.errors import OtfuseError


@dataclass(frozen=True)
class Method:
    merge: str  # otfuse --merge
    per_model: tuple[str, ...]  # parameters read per model (a model's own, else the top-level one)
    shared: dict  # parameters read from the top-level `parameters` only, with mergekit's defaults
    base: bool  # needs base_model
    consensus: bool = False  # TIES' sign election and (normalised) disjoint mean
    sparsify: str | None = None  # "magnitude" (TIES' trim) or "random" (DARE's drop)


def _task_vectors(merge: str, normalize: bool, rescale: bool, consensus: bool = False,
                  sparsify: str | None = None) -> Method:
    return Method(merge, ("weight", "density"), {"normalize": normalize, "rescale": rescale, "lambda": 1.0,
                                                 "int8_mask": False}, True, consensus, sparsify)


METHODS = {
    "linear": Method("average", ("weight",), {"normalize": True}, False),
    "task_arithmetic": _task_vectors("task-arithmetic", False, False),
    "ties": _task_vectors("ties", True, False, True, "magnitude"),
    "dare_linear": _task_vectors("dare", False, True, False, "random"),
    "dare_ties": _task_vectors("dare-ties", False, True, True, "random"),
}
# what mergekit keys otfuse does not reproduce mean, for the one-line refusal
REFUSED_KEYS = {
    "slices": "layer slices (frankenmerges) have no otfuse equivalent",
    "modules": "per-module merges have no otfuse equivalent",
    "tokenizer": "tokenizer surgery (vocabulary union, added tokens) has no otfuse equivalent; otfuse writes the "
                 "parents' shared tokenizer",
    "chat_template": "otfuse writes the parents' own tokenizer files and sets no chat template",
}
KEYS = ("merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source")
DTYPES = ("float32", "float16", "bfloat16")
NUMBERS = ("weight", "density", "lambda")


@dataclass
class Translation:
    recipe: dict  # an otfuse fuse recipe (paths as the config wrote them: relative to its folder)
    notes: list[str] = field(default_factory=list)  # what the user should know: the command, the differences


def is_mergekit(document) -> bool:
    return isinstance(document, dict) and "merge_method" in document


def translate(config: dict, where: Path | str, output: str | None) -> Translation:
    """The otfuse recipe that computes mergekit `config`'s merge into `output` (a path from the command line,
    relative to the current directory), or OtfuseError naming what otfuse cannot reproduce."""
    def refuse(message: str):
        raise OtfuseError(f"{where}: {message}")

    name = config["merge_method"]
    method = METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        refuse(f"mergekit merge_method {name!r} has no otfuse equivalent; otfuse runs {', '.join(METHODS)}")
    for key in config:
        if key in REFUSED_KEYS:
            refuse(f"mergekit key {key}: {REFUSED_KEYS[key]}")
        if key not in KEYS:
            refuse(f"{key!r} is not a mergekit key otfuse reads; it reads {', '.join(KEYS)}")
    if not output or not isinstance(output, str):
        refuse("a mergekit config names no output: give it on the command line, otfuse run CONFIG -o OUT")

    top = _parameters(config.get("parameters"), "parameters", refuse)
    for key in top:
        if key not in method.per_model and key not in method.shared:
            refuse(f"parameters: {key!r} is not a parameter of mergekit's {name} "
                   f"(it reads {', '.join((*method.per_model, *method.shared))})")
    entries = config.get("models")
    if not isinstance(entries, list) or not entries:
        refuse("models must be a list of entries like {model: PATH, parameters: {weight: 1.0}}")
    base = _reference(config["base_model"], "base_model", refuse) if config.get("base_model") is not None else None
    if method.base and base is None:
        refuse(f"mergekit's {name} merges task vectors and needs base_model (the models' pre-trained model)")

    models, own = [], []  # the inputs, each with its own parameters
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "model" not in entry:
            refuse(f"models[{i}] must be a mapping with model: PATH (and parameters)")
        if extra := set(entry) - {"model", "parameters"}:
            refuse(f"models[{i}]: {', '.join(sorted(map(str, extra)))} is not a mergekit model key otfuse reads "
                   "(model, parameters)")
        path = _reference(entry["model"], f"models[{i}].model", refuse)
        params = _parameters(entry.get("parameters"), f"models[{i}].parameters", refuse)
        for key in params:
            if key in method.shared:
                refuse(f"models[{i}].parameters: {key!r} is read only from the top-level parameters by mergekit "
                       "(it would ignore it here)")
            if key not in method.per_model:
                refuse(f"models[{i}].parameters: {key!r} is not a parameter of mergekit's {name} "
                       f"(per model it reads {', '.join(method.per_model)})")
        if any(_same(path, p) for p in models):
            refuse(f"models[{i}]: {path} is listed twice")
        models.append(path)
        own.append(params)

    if method.base:  # the base is not a merged input: its entry (if listed) only names it
        keep = [k for k, p in enumerate(models) if not _same(p, base)]
    else:  # linear ignores the base's role; mergekit adds a base_model it was not given as one more input
        keep = list(range(len(models)))
        if base is not None and not any(_same(base, p) for p in models):
            models.append(base)
            own.append({})
            keep.append(len(models) - 1)
    parents = [models[k] for k in keep]
    if len(parents) < 2:
        refuse(f"otfuse merges two or more models{' besides base_model' if method.base else ''}; "
               f"this config has {len(parents)}")

    def per_model(key: str, k: int, default=None):
        value = own[k].get(key, top.get(key, default))
        if value is None:
            refuse(f"{models[k]} has no {key}: mergekit's {name} needs one per model (under its parameters, or a "
                   "top-level default)")
        return value

    def shared(key: str):
        return top.get(key, method.shared[key])

    weights = [per_model("weight", k) for k in keep]
    if any(w < 0 for w in weights) or not sum(weights) > 0:
        refuse(f"weights {', '.join(map(_number, weights))}: otfuse's --weights are non-negative with a positive "
               "sum")
    total, count = math.fsum(weights), len(parents)
    merge: dict = {"merge": method.merge}
    notes, ignored = [], []

    if name == "linear":
        if not shared("normalize") and abs(total - 1) > 1e-9:
            refuse(f"linear with normalize: false sums the weighted models (weights sum to {_number(total)}); "
                   "otfuse's average divides by the weights' sum: set normalize: true or weights that sum to 1")
    else:
        lam = shared("lambda")
        if lam < 0:
            refuse(f"lambda {_number(lam)}: otfuse's --scale is at least 0")
        if method.consensus:
            if not shared("normalize"):
                default = "" if method.shared["normalize"] else " (its mergekit default)"
                refuse(f"{name} with normalize: false{default} sums the sign-agreeing entries; otfuse's "
                       f"{method.merge} takes their weighted mean, which is mergekit's normalize: true")
            scale = lam
        else:
            divisor = total if shared("normalize") and abs(total) >= 1e-8 else 1.0
            scale = lam * total / (count * divisor)
        merge["scale"] = scale
        densities = [per_model("density", k, 1.0) for k in keep]
        if method.sparsify is None:
            if any(d != 1.0 for d in densities):
                ignored.append("density")
            if "rescale" in top:
                ignored.append("rescale")
        else:
            if len(set(densities)) > 1:
                refuse(f"per-model densities {', '.join(map(_number, densities))}: otfuse's --density is one value "
                       "for every model")
            density = densities[0]
            if not 0 < density <= 1:
                refuse(f"density {_number(density)}: otfuse keeps a fraction in (0, 1] of each task vector")
            merge["density"] = density
            if method.sparsify == "magnitude" and shared("rescale"):
                refuse(f"{name} with rescale: true rescales each trimmed task vector to its L1 norm; otfuse's "
                       "ties does not rescale")
            if method.sparsify == "random" and not shared("rescale"):
                refuse(f"{name} with rescale: false keeps the dropped task vectors unscaled; otfuse's "
                       f"{method.merge} always divides the kept entries by density")
            if density < 1 and method.sparsify == "magnitude":
                notes.append("TIES' trim: otfuse keeps the ceil(density x n) largest magnitudes of each task vector "
                             "(and any tied with the last), mergekit int(density x n): one more entry where "
                             "density x n is not whole")
            if density < 1 and method.sparsify == "random":
                notes.append("DARE's drops are otfuse's seeded hash (seed 0), not torch's generator, and the kept "
                             "entries are divided by density (Yu et al.) where mergekit rescales each tensor to its "
                             "L1 norm: other draws, the same scale on average")
    if ignored:
        notes.append(f"{' and '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect on {name} "
                     "(in mergekit either); ignored")

    dtype = _dtype(config.get("out_dtype"), "out_dtype", refuse) or _dtype(config.get("dtype"), "dtype", refuse)
    compute = _dtype(config.get("dtype"), "dtype", refuse)
    if compute in ("float16", "bfloat16"):
        notes.append(f"mergekit casts the inputs to {compute} before merging; otfuse merges in float32 and writes "
                     f"{dtype}")

    anchor = 0
    source = config.get("tokenizer_source")
    if source is not None:
        if source == "union":
            refuse("tokenizer_source: union builds a new vocabulary; otfuse writes the parents' shared tokenizer "
                   "(base, or one of the models)")
        if source == "base":
            if base is None:
                refuse("tokenizer_source: base, but the config names no base_model")
        else:
            named = _reference(source.removeprefix("model:") if isinstance(source, str) else source,
                               "tokenizer_source", refuse)
            if base is not None and _same(named, base):
                pass  # otfuse checks the base's tokenizer is the parents' (--allow-config-mismatch aside)
            elif any(_same(named, p) for p in parents):
                anchor = next(k for k, p in enumerate(parents) if _same(named, p))  # config and tokenizer: its
            else:
                refuse(f"tokenizer_source {source!r} is none of the config's models")

    recipe = {"command": "fuse", "models": parents, "output": os.path.abspath(output), "anchor": anchor,
              "weights": ",".join(repr(float(w)) for w in weights), "options": {"align": "none"}, "merge": merge,
              "write": {"dtype": dtype or "keep"}}
    if method.base:
        recipe["base"] = base
    notes.insert(0, f"mergekit {name} runs as: {command_line(recipe)}")
    return Translation(recipe, notes)


def command_line(recipe: dict) -> str:
    """The `otfuse fuse` command line of a translated recipe (paths as the config wrote them)."""
    words = ["otfuse fuse", *map(shlex.quote, recipe["models"])]
    if recipe.get("base"):
        words += ["--base", shlex.quote(recipe["base"])]
    words += ["--align", "none", "--merge", recipe["merge"]["merge"]]
    for key in ("scale", "density"):
        if key in recipe["merge"]:
            words += [f"--{key}", _number(recipe["merge"][key])]
    words += ["--weights", ",".join(_number(float(w)) for w in recipe["weights"].split(","))]
    if recipe["anchor"]:
        words += ["--anchor", str(recipe["anchor"])]
    if recipe["write"]["dtype"] != "keep":
        words += ["--dtype", recipe["write"]["dtype"]]
    return " ".join(words + ["-o", "OUT"])


def _number(x: float) -> str:
    return f"{x:.10g}"


def _same(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def _reference(value, where: str, refuse) -> str:
    """A model path as mergekit writes one; LoRA (`model+adapter`) and the mapping form are refused (otfuse
    reads a PEFT adapter folder as a model of its own: name it directly)."""
    if not isinstance(value, str) or not value.strip():
        refuse(f"{where} must be a model path, got {value!r}")
    if "+" in value:
        refuse(f"{where} {value!r}: mergekit's model+LoRA references are not read; name the PEFT adapter folder "
               "itself as the model (otfuse reads it over its base)")
    return value  # a Hub id with @revision reads as otfuse reads any model path given in a recipe


def _parameters(section, where: str, refuse) -> dict:
    """A `parameters` mapping of scalars: gradients (lists) and per-tensor filters are refused by key."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        refuse(f"{where} must be a mapping of parameter names to values")
    out = {}
    for key, value in section.items():
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
            refuse(f"{where}: {key} has per-tensor filters; otfuse applies one value to every tensor")
        if isinstance(value, list):
            refuse(f"{where}: {key} is a gradient (a list of values over the layers); otfuse applies one value "
                   "to every tensor")
        if key in NUMBERS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                refuse(f"{where}: {key} must be a number, got {value!r}")
            value = float(value)
        elif value is not None and not isinstance(value, bool) and key in ("normalize", "rescale", "int8_mask"):
            refuse(f"{where}: {key} must be true or false, got {value!r}")
        if value is not None:
            out[str(key)] = value
    return out


def _dtype(value, where: str, refuse) -> str | None:
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in DTYPES:
        refuse(f"{where} {value!r}: otfuse writes {', '.join(DTYPES)}")
    return name
