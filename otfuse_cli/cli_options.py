"""Turns the option dataclasses (options.py) into typer options: one decorator adds a group's fields to every
command that shares it and hands the command one built, checked, frozen object per group. Choices become
typer enums, so `--solver foo` is refused while parsing, with the choices listed, before anything loads."""

from __future__ import annotations

import contextvars
import enum
import functools
import inspect
import typing
from dataclasses import MISSING, fields
from typing import Optional

import typer

_ENUMS: dict[tuple[str, tuple], type[enum.Enum]] = {}
CTX = "_typer_context"  # the click context typer injects, read for which flags were typed
_GIVEN: contextvars.ContextVar[frozenset] = contextvars.ContextVar("otfuse_given_flags", default=frozenset())


def _choice_type(flag: str, choices: tuple) -> type[enum.Enum]:
    """One str-valued Enum per flag (typer shows and checks its members)."""
    key = (flag, choices)
    if key not in _ENUMS:
        name = "".join(part.title() for part in flag.strip("-").split("-"))
        _ENUMS[key] = enum.Enum(name, {c: c for c in choices}, type=str)
    return _ENUMS[key]


def _annotation(f, default):
    if "choices" in f.metadata:
        base = _choice_type(f.metadata["flag"], f.metadata["choices"])
    else:
        base = {"int": int, "float": float, "bool": bool}.get(str(f.type).split(" ")[0], str)
    return Optional[base] if default is None else base


def with_options(defaults: dict | None = None, only: dict | None = None, **groups):
    """@with_options(align=AlignOptions, data=DataOptions): the command receives `align` and `data` objects.
    defaults: per-command default values by field name; only: {group: field names} to expose a subset (the
    rest keep their dataclass defaults)."""
    defaults = defaults or {}
    only = only or {}

    def decorate(func):
        sig = inspect.signature(func)
        hints = typing.get_type_hints(func)  # the command's own annotations, resolved in its module
        kept = [p.replace(annotation=hints.get(name, p.annotation)) for name, p in sig.parameters.items()
                if name not in groups]
        added = []
        for group, cls in groups.items():
            for f in fields(cls):
                if group in only and f.name not in only[group]:
                    continue
                default = defaults.get(f.name, f.default if f.default is not MISSING else None)
                ann = _annotation(f, default)
                shown = default.value if isinstance(default, enum.Enum) else default
                added.append(inspect.Parameter(f"{group}__{f.name}", inspect.Parameter.KEYWORD_ONLY, annotation=ann,
                                               default=typer.Option(shown, f.metadata["flag"],
                                                                    help=f.metadata["help"],
                                                                    metavar=f.metadata.get("metavar"),
                                                                    min=f.metadata.get("minimum"),
                                                                    max=f.metadata.get("maximum"))))

        @functools.wraps(func)
        def command(**kwargs):
            ctx = kwargs.pop(CTX)
            _GIVEN.set(frozenset(p.opts[0] for p in ctx.command.params
                                 if p.opts and ctx.get_parameter_source(p.name) in _TYPED(ctx)))
            for group, cls in groups.items():
                values = {f.name: defaults[f.name] for f in fields(cls) if f.name in defaults}
                for f in fields(cls):
                    key = f"{group}__{f.name}"
                    if key in kwargs:
                        value = kwargs.pop(key)
                        values[f.name] = value.value if isinstance(value, enum.Enum) else value
                kwargs[group] = cls(**values)
            return func(**kwargs)

        params = kept + added + [inspect.Parameter(CTX, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must read the new signature, not the function's own
        return command

    return decorate


def _TYPED(ctx) -> set:
    """Parameter sources that mean the user gave the value (typer may vendor its own click)."""
    source = type(ctx.get_parameter_source(next(p.name for p in ctx.command.params)))
    return {source.COMMANDLINE, source.ENVIRONMENT}


def explicit_flags() -> set[str]:
    """The flags the user typed on this command line (not defaults), e.g. {"--solver", "--data"}."""
    return set(_GIVEN.get())


def refuse_unused(given: set[str], flags: tuple[str, ...], why: str) -> None:
    """One line for options that would be silently ignored in the chosen mode."""
    from otfuse_cli.errors import OtfuseError

    unused = [f for f in flags if f in given]
    if unused:
        raise OtfuseError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply: {why}")
