"""Recipes: one YAML file holding a whole `align`, `fuse` or `compress` run, for CI jobs and notebooks.

    command: fuse
    models: [parent_a/, parent_b/]
    output: fused/
    anchor: 0
    options: {solver: sinkhorn, reg: 0.02}        # AlignOptions
    merge: {merge: regmean, regmean_alpha: 0.9}   # MergeOptions (ties: {merge: ties, density: 0.2}, heads)
    base: pretrained/                             # task-vector rules: the parents' pre-trained model
    data: {data: calib.jsonl, samples: 256}       # DataOptions
    write: {dtype: float16, force: true}          # OutputOptions

Every section is checked by the same typed option objects as the command line; paths are relative to the
recipe's folder; the recipe itself is recorded in the output's provenance. A mergekit configuration (a YAML
with `merge_method`) is translated into the equivalent fuse recipe first (mergekit_config.py); its output
comes from the command line."""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path

from otfuse_cli import inputs, mergekit_config, report
from otfuse_cli.errors import OtfuseError
from otfuse_cli.options import AlignOptions, DataOptions, MergeOptions, OutputOptions

GROUPS = {"options": AlignOptions, "data": DataOptions, "merge": MergeOptions, "write": OutputOptions}
COMMANDS = {
    "align": {"models", "output", "anchor", "allow_config_mismatch", "options", "data", "write"},
    "fuse": {"models", "output", "anchor", "weights", "plan", "stats", "repair", "base", "allow_config_mismatch",
             "options", "data", "merge", "write"},
    "compress": {"model", "output", "ratio", "widths", "method", "options", "data", "write"},
}
PATH_KEYS = ("models", "output", "plan", "stats", "model", "base")
REQUIRED = {"align": ("models", "output"), "fuse": ("models", "output"), "compress": ("model", "output")}
# key -> (check, what it must be)
def _is_path(v) -> bool:
    """A non-empty string the file system can take as a name (YAML's "\\ud800" escape cannot be one)."""
    if not isinstance(v, str) or not v.strip() or "\0" in v:
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


TYPES = {
    "models": (lambda v: isinstance(v, list) and len(v) >= 2 and all(_is_path(p) for p in v),
               "a list of at least two paths"),
    "stats": (lambda v: isinstance(v, list) and all(_is_path(p) for p in v), "a list of paths"),
    "model": (_is_path, "a path"),
    "output": (_is_path, "a path"),
    "plan": (_is_path, "a path"),
    "base": (_is_path, "a path"),
    "anchor": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
    "weights": (lambda v: isinstance(v, str), "comma-separated numbers, e.g. \"0.5,0.5\""),
    "repair": (lambda v: isinstance(v, bool), "true or false"),
    "allow_config_mismatch": (lambda v: isinstance(v, bool), "true or false"),
    "ratio": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number between 0 and 1"),
    "widths": (lambda v: isinstance(v, (list, dict)), "a list like [ffn=64] or a mapping"),
    "method": (lambda v: isinstance(v, str), "ot, magnitude, importance or random"),
}
# option fields whose type the dataclasses do not check themselves
BOOL_FIELDS = ("force", "post_activation")


def load_recipe(path: str | Path, output: str | None = None) -> dict:
    """The checked recipe at `path`; `output` (from the command line, relative to the current directory)
    replaces its output. A mergekit config comes back translated (notes printed)."""
    return _read(Path(path), output)[0]


def _read(path: Path, output: str | None) -> tuple[dict, dict]:
    """The checked recipe and what the output's provenance records of it."""
    inputs.check_input(path, "recipe", missing=f"recipe not found: {path}")
    recipe = inputs.load_yaml(path, "recipe")  # a regular file, size and nesting capped, aliases bounded
    record = {"recipe": recipe}
    if mergekit_config.is_mergekit(recipe):
        translation = mergekit_config.translate(recipe, path, output)
        for note in translation.notes:
            report.note_line(note)
        recipe, record = translation.recipe, {"recipe": translation.recipe, "mergekit": recipe}
    elif output is not None and isinstance(recipe, dict):
        recipe = {**recipe, "output": os.path.abspath(output)}
        record = {"recipe": recipe}
    _check(recipe, path)
    return recipe, record


def _check(recipe, path: Path) -> None:
    if not isinstance(recipe, dict) or recipe.get("command") not in COMMANDS:
        raise OtfuseError(f"{path}: a recipe is a mapping with command: {' | '.join(COMMANDS)}")
    unknown = set(recipe) - COMMANDS[recipe["command"]] - {"command"}
    if unknown:
        raise OtfuseError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} for {recipe['command']}; "
                          f"allowed: {', '.join(sorted(COMMANDS[recipe['command']]))}")
    if missing := [k for k in REQUIRED[recipe["command"]] if recipe.get(k) is None]:
        raise OtfuseError(f"{path}: {recipe['command']} needs {', '.join(missing)}")
    for key, value in recipe.items():
        if key in TYPES and value is not None and not TYPES[key][0](value):
            raise OtfuseError(f"{path}: {key} must be {TYPES[key][1]}, got {value!r}")


def _group(name: str, section, where: Path):
    cls = GROUPS[name]
    if section is None:
        return cls()
    if not isinstance(section, dict):
        raise OtfuseError(f"{where}: {name} must be a mapping of {', '.join(f.name for f in fields(cls))}")
    allowed = {f.name for f in fields(cls)}
    if unknown := set(section) - allowed:
        raise OtfuseError(f"{where}: unknown {name} field(s) {', '.join(sorted(unknown))}; "
                          f"allowed: {', '.join(sorted(allowed))}")
    for key in BOOL_FIELDS:
        if key in section and section[key] is not None and not isinstance(section[key], bool):
            raise OtfuseError(f"{where}: {name}.{key} must be true or false, got {section[key]!r}")
    if name == "data" and isinstance(section.get("data"), str) and _is_path(section["data"]):
        from otfuse_cli.tables import looks_like_dataset_id

        given, joined = section["data"], where.parent / section["data"]
        # relative to the recipe's folder, unless nothing there has that name and it reads as a dataset id
        keep_id = not joined.exists() and not joined.is_symlink() and looks_like_dataset_id(given)
        section = {**section, "data": given if keep_id else str(joined)}
    return cls(**section)


def _paths(recipe: dict, base: Path) -> dict:
    """Paths relative to the recipe's folder; a model (models, model, base) that is no path there may be a
    Hugging Face id, resolved through its cache (otfuse_cli.hub)."""
    from otfuse_cli import hub

    out = dict(recipe)
    for key in PATH_KEYS:
        value = out.get(key)
        join = hub.relative_model if key in ("models", "model", "base") else lambda v, where: str(where / v)
        if isinstance(value, list):
            out[key] = [join(str(v), base) for v in value]
        elif value is not None:
            out[key] = join(str(value), base)
    return out


def run_recipe(path: str | Path, on_space=None, output: str | None = None, force: bool = False) -> dict:
    """Run the recipe's command through the library; returns that command's result. `output` and `force`
    come from the command line (`otfuse run RECIPE -o OUT --force`): a mergekit config names no output."""
    path = Path(path)
    recipe, record = _read(path, output)
    args = _paths(recipe, path.parent)
    from otfuse_cli.checkpoint.guard import refuse_overlap

    refuse_overlap(args["output"], [path])  # the recipe is an input too
    groups = {name: _group(name, recipe.get(name), path) for name in GROUPS if name in COMMANDS[recipe["command"]]}
    if force:
        groups["write"] = replace(groups["write"], force=True)
    command = recipe["command"]
    if command == "align":
        from otfuse_cli.pipeline import align

        return align(args["models"], args["output"], options=groups["options"], data=groups["data"],
                     anchor=int(recipe.get("anchor", 0)), force=groups["write"].force, on_space=on_space,
                     allow_config_mismatch=recipe.get("allow_config_mismatch", False))
    if command == "fuse":
        from otfuse_cli.fusion import fuse

        return fuse(args["models"], args["output"], options=groups["options"], data=groups["data"],
                    merge=groups["merge"], write=groups["write"], anchor=int(recipe.get("anchor", 0)),
                    weights=recipe.get("weights"), plan=args.get("plan"), stats=args.get("stats"),
                    repair=bool(recipe.get("repair", False)), base=args.get("base"), command_options=record,
                    on_space=on_space,
                    allow_config_mismatch=recipe.get("allow_config_mismatch", False))
    from otfuse_cli.compression import compress

    return compress(args["model"], args["output"], ratio=recipe.get("ratio"), widths=recipe.get("widths"),
                    method=recipe.get("method", "ot"), options=groups["options"], data=groups["data"],
                    write=groups["write"], command_options=record, on_space=on_space)
