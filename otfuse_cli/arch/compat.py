"""The one compatibility judgement: can these checkpoints be fused (and interpolated)?

`inspect`, `fuse`/`align` and `evaluate --interpolate` all decide through here, so a pair inspect calls
fusable is a pair fuse accepts, with the same one-line reason when it is not. Raw tensor names and shapes
are not enough: a different vocabulary or class count keeps every name and rank but changes an axis that
no plan may move; only the Spec knows which axes move.
"""

from __future__ import annotations

import re
from dataclasses import replace

from otfuse_cli.arch.model import Spec
from otfuse_cli.arch.transformers import TOKEN_ID_KEYS
from otfuse_cli.errors import OtfuseError


def label(ckpt, k: int) -> str:
    """How a model is named in messages (the same words fuse uses)."""
    return f"model {k} ({ckpt.path})"


def shapes_of(ckpt) -> dict[str, tuple[int, ...]]:
    return {name: tuple(ckpt.shape(name)) for name in ckpt.keys()}


def check_compatible(anchor: Spec, parent: Spec, anchor_shapes: dict, parent_shapes: dict, label: str) -> None:
    """Refuse pairs that cannot be fused: other family, depth, tensors, or a fixed axis that differs."""
    if anchor.family != parent.family:
        raise OtfuseError(f"{label} is a {parent.family} model but the anchor is a {anchor.family} model")
    if [s.name for s in anchor.spaces] != [s.name for s in parent.spaces]:
        raise OtfuseError(
            f"{label} has a different structure from the anchor ({len(parent.spaces)} neuron spaces vs "
            f"{len(anchor.spaces)}: depth or layer layout differs)")
    if set(anchor_shapes) != set(parent_shapes):
        only = sorted(set(anchor_shapes) ^ set(parent_shapes))
        raise OtfuseError(f"{label} and the anchor hold different tensors (e.g. {only[0]!r})")
    for sa, sp in zip(anchor.spaces, parent.spaces):
        if [e.shape_key() for e in sa.entries] != [e.shape_key() for e in sp.entries]:
            raise OtfuseError(f"{label}: space {sa.name!r} is laid out differently from the anchor's")
    covered = anchor.axis_index()
    for name, shape_a in anchor_shapes.items():
        shape_p = parent_shapes[name]
        if len(shape_a) != len(shape_p):
            raise OtfuseError(f"{label}: tensor {name} has rank {len(shape_p)}, anchor has {len(shape_a)}")
        for axis, (la, lp) in enumerate(zip(shape_a, shape_p)):
            if la != lp and (name, axis) not in covered:
                raise OtfuseError(
                    f"{label}: {name} axis {axis} is {lp} but the anchor's is {la}, and that axis must not "
                    f"move (class outputs, vocabulary, positions or input features differ)")


# config.json fields that change what a model computes without changing any tensor's shape. Parents that differ
# in one fuse into weights that the anchor's config then runs as neither parent did.
FUNCTION_FIELDS = (
    "hidden_act", "activation_function", "hidden_activation", "activation",  # activation
    "layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps",  # norm epsilon
    "max_position_embeddings", "n_positions", "position_embedding_type", "rope_theta", "rope_scaling",
    "rope_parameters", "sinusoidal_pos_embds",  # positions
    *TOKEN_ID_KEYS,  # special tokens
)
# Tokenizer files, by what in them defines the tokenisation (None: the whole file). Settings such as padding,
# truncation or model_max_length do not change the model's function and may differ.
TOKENIZER_PARTS = {
    "tokenizer.json": ("model", "added_tokens", "normalizer", "pre_tokenizer"),
    "tokenizer_config.json": ("do_lower_case", "added_tokens_decoder", "bos_token", "eos_token", "unk_token",
                              "sep_token", "pad_token", "cls_token", "mask_token", "additional_special_tokens"),
    "special_tokens_map.json": None, "vocab.json": None, "vocab.txt": None, "merges.txt": None,
    "tokenizer.model": None, "spiece.model": None, "sentencepiece.bpe.model": None,
}


def _config_value(ckpt, key: str):
    """The value the model runs with: transformers' loaded config (defaults and aliases applied) where there is
    one, else config.json's own entry."""
    if ckpt.hf_config is not None:
        value = getattr(ckpt.hf_config, key, None)
        return value.to_dict() if hasattr(value, "to_dict") else value
    return (ckpt.config or {}).get(key)


def _tokenizer_part(path, parts):
    from otfuse_cli import inputs

    raw = inputs.read_small(path, "tokenizer file")  # a regular file within the JSON cap, like every small file
    if parts is None:
        return raw
    try:
        doc = inputs.parse_json(raw.decode("utf-8"), str(path))
    except (OtfuseError, UnicodeDecodeError):
        return raw  # unreadable as JSON: compare the bytes
    return {k: doc.get(k) for k in parts} if isinstance(doc, dict) else doc


def config_differences(anchor, parent) -> list[str]:
    """Function-changing fields and tokenizer files in which `parent` differs from `anchor`, as
    "field (anchor's vs parent's)" or "tokenizer file name"; files only one of them has are not compared."""
    if anchor.config is None or parent.config is None:
        return []
    diffs = [f"{key} ({a!r} vs {b!r})" for key in FUNCTION_FIELDS
             if (a := _config_value(anchor, key)) != (b := _config_value(parent, key))]
    for name, parts in TOKENIZER_PARTS.items():
        fa, fp = anchor.folder / name, parent.folder / name
        if fa.is_file() and fp.is_file() and _tokenizer_part(fa, parts) != _tokenizer_part(fp, parts):
            diffs.append(f"tokenizer {name}")
    return diffs


def check_config_match(anchor, parent, label: str) -> None:
    if diffs := config_differences(anchor, parent):
        shown = ", ".join(diffs[:3]) + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise OtfuseError(f"{label} differs from the anchor in what it computes: {shown}; the fused model would "
                          "run with the anchor's config (--allow-config-mismatch to fuse anyway)")


def head_tensors(ckpt) -> list[str]:
    """The task-head tensors of a checkpoint (its family's `heads`: classifier, score...); none for bare state
    dicts and for families without a task head."""
    from otfuse_cli.arch import hf_family  # the registry imports this module

    try:
        family = hf_family(ckpt)
    except OtfuseError:  # an unsupported family: check_models says so
        return []
    if family is None or not family.heads:
        return []
    return [name for name in ckpt.keys() if re.match(family.heads, name)]


def _label_names(ckpt) -> list | None:
    labels = (ckpt.config or {}).get("id2label")
    return [labels[k] for k in sorted(labels, key=lambda k: int(k))] if isinstance(labels, dict) else None


def _label_shape(ckpt, name: str) -> tuple[int, ...]:
    """A head tensor's extent on the axes no space moves (its labels): widths may differ, labels may not."""
    from otfuse_cli.arch import build_spec  # the registry imports this module

    covered = build_spec(ckpt).axis_index()
    return tuple(n for axis, n in enumerate(ckpt.shape(name)) if (name, axis) not in covered)


def heads_differ(ckpts: list, anchor: int = 0) -> bool:
    """Whether the parents' task heads are for different tasks as far as the files tell: other head tensors,
    other label counts, or other label names in config.json."""
    heads = [sorted(head_tensors(c)) for c in ckpts]
    a = ckpts[anchor]
    try:
        return any(h != heads[anchor] or any(_label_shape(c, n) != _label_shape(a, n) for n in h)
                   or _label_names(c) != _label_names(a) for c, h in zip(ckpts, heads))
    except OtfuseError:  # a model without a Spec: check_models says why
        return False


def without_tensors(spec: Spec, names: set[str]) -> Spec:
    """The Spec with `names` taken out of every space (spaces left empty are dropped): what alignment sees of
    models whose task heads are kept apart."""
    spaces = [replace(s, entries=[e for e in s.entries if e.tensor not in names]) for s in spec.spaces]
    return replace(spec, spaces=[s for s in spaces if s.entries])


def check_models(ckpts: list, anchor: int = 0, allow_config_mismatch: bool = False,
                 keep_heads: bool = False) -> list[Spec]:
    """Every model's Spec, after checking each parent against the anchor (structure, then, unless allowed,
    the config fields and tokenizer that change the function); raises the first one-line reason.
    keep_heads: the task heads are not fused (each parent keeps its own), so they are left out of the check
    and of the Specs."""
    from otfuse_cli.arch import build_spec  # the registry imports this module

    specs = [build_spec(c) for c in ckpts]
    shapes = [shapes_of(c) for c in ckpts]
    if keep_heads:
        heads = [set(head_tensors(c)) for c in ckpts]
        if not heads[anchor]:
            raise OtfuseError(f"--heads keep: {label(ckpts[anchor], anchor)} has no task head "
                              f"({specs[anchor].family} models declare none); fuse the whole models instead")
        specs = [without_tensors(s, h) for s, h in zip(specs, heads)]
        shapes = [{n: v for n, v in sh.items() if n not in h} for sh, h in zip(shapes, heads)]
    for k, (ckpt, spec) in enumerate(zip(ckpts, specs)):
        if k != anchor:
            check_compatible(specs[anchor], spec, shapes[anchor], shapes[k], label(ckpt, k))
            if not allow_config_mismatch:
                check_config_match(ckpts[anchor], ckpt, label(ckpt, k))
    return specs


def width_differences(specs: list[Spec]) -> list[str]:
    """Neuron spaces whose width differs from model 0's, as 'name (w0/w1/...)'; specs must be compatible."""
    return [f"{spaces[0].name} ({'/'.join(str(s.size) for s in spaces)})"
            for spaces in zip(*(spec.spaces for spec in specs)) if any(s.size != spaces[0].size for s in spaces)]


def judge(ckpts: list, allow_config_mismatch: bool = False) -> dict:
    """Judge opened checkpoints against model 0: {compatible, heterogeneous, verdict, reason}.

    `reason` is the message `otfuse fuse` would fail with (None when compatible); heterogeneous means
    compatible but some widths differ, so fusion needs rectangular plans and interpolation is impossible.
    """
    try:
        specs = check_models(ckpts, allow_config_mismatch=allow_config_mismatch)
    except OtfuseError as e:
        if not heads_differ(ckpts):
            return {"compatible": False, "heterogeneous": False, "verdict": "incompatible", "reason": str(e)}
        try:  # the bodies may still fuse, each parent keeping its own task head (fuse --heads auto)
            check_models(ckpts, allow_config_mismatch=allow_config_mismatch, keep_heads=True)
        except OtfuseError as inner:
            return {"compatible": False, "heterogeneous": False, "verdict": "incompatible", "reason": str(inner)}
        return {"compatible": True, "heterogeneous": False, "verdict": "shared body, different task heads",
                "reason": None}
    shapes = [shapes_of(c) for c in ckpts]
    # A tensor shape can differ where no space size does only if the Spec misses an axis; count it anyway.
    heterogeneous = bool(width_differences(specs)) or any(s != shapes[0] for s in shapes[1:])
    return {"compatible": True, "heterogeneous": heterogeneous,
            "verdict": "heterogeneous widths" if heterogeneous else "identical layout", "reason": None}


def check_interpolatable(a, b, allow_config_mismatch: bool = False) -> None:
    """Raise a one-line OtfuseError unless checkpoints A and B can be interpolated: fusable, same widths."""
    try:
        specs = check_models([a, b], allow_config_mismatch=allow_config_mismatch)
    except OtfuseError as e:
        raise OtfuseError(f"cannot interpolate: {e}") from None
    widths = width_differences(specs)
    if widths or shapes_of(a) != shapes_of(b):
        where = f"; widths differ in {', '.join(widths[:3])}{' …' if len(widths) > 3 else ''}" if widths else ""
        raise OtfuseError(f"cannot interpolate: the two models need the same widths{where} "
                          "(otfuse fuse handles different widths)")
