"""Recipes: one YAML file holding a whole `align`, `fuse` or `compress` run, for CI jobs and notebooks.

    command: fuse
    models: [parent_a/, parent_b/]
    output: fused/
    anchor: 0
    options: {solver: sinkhorn, reg: 0.02}        # AlignOptions
    merge: {merge: regmean, regmean_alpha: 0.9}   # MergeOptions
    data: {data: calib.jsonl, samples: 256}       # DataOptions
    write: {dtype: float16, force: true}          # OutputOptions

Every section is checked by the same typed option objects as the command line; paths are relative to the
recipe's folder; the recipe itself is recorded in the output's provenance."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from otfuse_cli.errors import OtfuseError
from otfuse_cli.options import AlignOptions, DataOptions, MergeOptions, OutputOptions

GROUPS = {"options": AlignOptions, "data": DataOptions, "merge": MergeOptions, "write": OutputOptions}
COMMANDS = {
    "align": {"models", "output", "anchor", "options", "data", "write"},
    "fuse": {"models", "output", "anchor", "weights", "plan", "stats", "repair", "options", "data", "merge", "write"},
    "compress": {"model", "output", "ratio", "widths", "method", "options", "data", "write"},
}
PATH_KEYS = ("models", "output", "plan", "stats", "model")


def load_recipe(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise OtfuseError(f"recipe not found: {path}")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise OtfuseError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(recipe, dict) or recipe.get("command") not in COMMANDS:
        raise OtfuseError(f"{path}: a recipe is a mapping with command: {' | '.join(COMMANDS)}")
    unknown = set(recipe) - COMMANDS[recipe["command"]] - {"command"}
    if unknown:
        raise OtfuseError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} for {recipe['command']}; "
                          f"allowed: {', '.join(sorted(COMMANDS[recipe['command']]))}")
    return recipe


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
    if name == "data" and section.get("data"):
        section = {**section, "data": str(where.parent / section["data"])}
    return cls(**section)


def _paths(recipe: dict, base: Path) -> dict:
    out = dict(recipe)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, list):
            out[key] = [str(base / str(v)) for v in value]
        elif value is not None:
            out[key] = str(base / str(value))
    return out


def run_recipe(path: str | Path, on_space=None) -> dict:
    """Run the recipe's command through the library; returns that command's result."""
    path = Path(path)
    recipe = load_recipe(path)
    args = _paths(recipe, path.parent)
    groups = {name: _group(name, recipe.get(name), path) for name in GROUPS if name in COMMANDS[recipe["command"]]}
    command = recipe["command"]
    record = {"recipe": recipe}
    if command == "align":
        from otfuse_cli.pipeline import align

        return align(args["models"], args["output"], options=groups["options"], data=groups["data"],
                     anchor=int(recipe.get("anchor", 0)), force=groups["write"].force, on_space=on_space)
    if command == "fuse":
        from otfuse_cli.fusion import fuse

        return fuse(args["models"], args["output"], options=groups["options"], data=groups["data"],
                    merge=groups["merge"], write=groups["write"], anchor=int(recipe.get("anchor", 0)),
                    weights=recipe.get("weights"), plan=args.get("plan"), stats=args.get("stats"),
                    repair=bool(recipe.get("repair", False)), command_options=record, on_space=on_space)
    from otfuse_cli.compression import compress

    return compress(args["model"], args["output"], ratio=recipe.get("ratio"), widths=recipe.get("widths"),
                    method=recipe.get("method", "ot"), options=groups["options"], data=groups["data"],
                    write=groups["write"], command_options=record, on_space=on_space)
