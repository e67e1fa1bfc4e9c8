"""The keys of config.json that otfuse reads, as one typed model checked when a checkpoint is opened: each key
by type and range, then against the tensors (layer count, axes, residual and FFN widths, vocabulary and label
rows), and, for a supported family, transformers' own load of the whole file. A config that does not
describe its weights is refused, never re-interpreted: transformers would build what the config says and
silently drop or randomly initialise the rest."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from otfuse_cli.arch import HF_FAMILIES
from otfuse_cli.arch.transformers import LAYER_KEYS, TOKEN_ID_KEYS, check_layers
from otfuse_cli.errors import OtfuseError

STACKS = ("encoder", "decoder")
# Positive integers when present: the counts every family reads, plus the width, head and FFN keys its
# declaration names (ConfigKeys).
COUNT_KEYS = (*LAYER_KEYS, *(f"{s}_layers" for s in STACKS), "vocab_size", "max_position_embeddings",
              "n_positions", "num_labels")
# Keys transformers lets be null (defaults: KV heads = heads, head size = hidden / heads, GPT-2's FFN = 4 x
# hidden); any other size key, when present, is a positive integer.
NULLABLE = ("n_inner",)


def nullable_keys(family) -> tuple[str, ...]:
    return (*NULLABLE, *((family.config.kv_heads, family.config.head_dim) if family is not None else ()))


def size_keys(family) -> tuple[str, ...]:
    """The positive-integer keys of a family's config.json (an unknown model type: the counts only)."""
    c = family.config if family is not None else None
    widths = (c.hidden, c.heads, c.ffn, c.kv_heads, c.head_dim) if c is not None else ()
    expanded = [key.format(stack=stack) for key in widths if key for stack in STACKS]
    return tuple(dict.fromkeys((*expanded, *COUNT_KEYS)))  # deduplicated, in order


# Tensors whose rows are the vocabulary, and the classification heads whose rows are the labels.
VOCAB_TENSOR = re.compile(r"(?:^|\.)(?:word_embeddings|wte|embed_tokens|shared|lm_head|lm_head\.decoder|"
                          r"cls\.predictions\.decoder|vocab_projector)\.weight$")
LABEL_TENSOR = re.compile(r"(?:^|\.)(?:classifier|classifier\.out_proj|score|classification_head\.out_proj)"
                          r"\.weight$")


@dataclass(frozen=True)
class ModelConfig:
    """What otfuse reads from config.json, typed and range-checked."""

    model_type: str | None = None
    architectures: tuple[str, ...] = ()
    sizes: dict[str, int] = field(default_factory=dict)  # the size_keys present (text_config's where it has one)
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None

    @property
    def num_labels(self) -> int | None:
        return len(self.id2label) if self.id2label else self.sizes.get("num_labels")


def _bad(source, key: str, want: str, value) -> OtfuseError:
    return OtfuseError(f"{source}: config.json field {key!r} must be {want}, got {value!r}")


def _sizes(raw: dict, keys: tuple[str, ...], nullable: tuple[str, ...], source) -> dict[str, int]:
    out = {}
    for key in keys:
        value = raw.get(key)
        if key not in raw or (value is None and key in nullable):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _bad(source, key, "a positive integer", value)
        out[key] = value
    return out


def _id2label(value, source) -> dict[int, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad(source, "id2label", "an object mapping class ids to names", value)
    out = {}
    for k, name in value.items():
        if not (isinstance(k, int) or (isinstance(k, str) and k.strip().isdigit())) or not isinstance(name, str):
            raise _bad(source, "id2label", "an object mapping class ids to names", value)
        out[int(k)] = name
    if sorted(out) != list(range(len(out))):  # the classifier's rows are 0..N-1
        raise _bad(source, "id2label", f"keyed by the class ids 0..{len(out) - 1}", value)
    return out


def _label2id(value, source) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                          for i in value.values()):
        raise _bad(source, "label2id", "an object mapping names to class ids", value)
    return dict(value)


def _check_token_ids(raw: dict, vocab: int | None, source) -> None:
    """Each id, when set, is an integer row of the vocabulary (eos may be a list of them). Negative ids count
    from the end, as nn.Embedding's padding_idx does, so old configs' -1 still loads."""
    if vocab is None:
        return
    for key in TOKEN_ID_KEYS:
        value = raw.get(key)
        for token in value if isinstance(value, list) and key == "eos_token_id" else [value]:
            if token is None and not isinstance(value, list):
                continue
            if isinstance(token, bool) or not isinstance(token, int) or not -vocab <= token < vocab:
                raise _bad(source, key, f"a token id below vocab_size {vocab}", value)


def parse_config(raw: dict, source) -> ModelConfig:
    """The typed config of a config.json object; OtfuseError naming the first field of a wrong type or range."""
    model_type = raw.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise _bad(source, "model_type", "a string", model_type)
    arch = raw.get("architectures")
    if arch is not None and (not isinstance(arch, list) or not all(isinstance(a, str) for a in arch)):
        raise _bad(source, "architectures", "a list of class names", arch)
    text = raw.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise _bad(source, "text_config", "an object", text)
    family = HF_FAMILIES.get(model_type or "")
    keys, nullable = size_keys(family), nullable_keys(family)
    sizes = _sizes(raw, keys, nullable, source)
    if text:
        sizes.update(_sizes(text, keys, nullable, source))
    _check_token_ids(raw, sizes.get("vocab_size"), source)
    if text:
        _check_token_ids(text, sizes.get("vocab_size"), source)
    config = ModelConfig(model_type or None, tuple(arch or ()), sizes, _id2label(raw.get("id2label"), source),
                         _label2id(raw.get("label2id"), source))
    if config.id2label and "num_labels" in sizes and sizes["num_labels"] != len(config.id2label):
        raise OtfuseError(f"{source}: config.json states num_labels {sizes['num_labels']} but id2label names "
                          f"{len(config.id2label)} labels")
    return config


def check_weights(config: ModelConfig, raw: dict, shapes: dict[str, tuple[int, ...]], source) -> None:
    """The config must describe these tensors: layer count, widths, vocabulary rows, classifier rows."""
    family = HF_FAMILIES.get(config.model_type or "")
    try:
        if family is not None:
            check_layers(family, raw, shapes)
            _check_layout(family, config, shapes)
        _check_rows(config, shapes)
    except OtfuseError as e:  # name the model: several are usually given
        raise OtfuseError(f"{source}: {e}") from None


def _mismatch(stated: str, name: str, have: int, what: str) -> OtfuseError:
    return OtfuseError(f"config.json states {stated} but tensor {name!r} has {have} {what}; the config does not "
                       "describe these weights")


def _check_rows(config: ModelConfig, shapes: dict) -> None:
    """Vocabulary tensors have vocab_size rows, classification heads one row per label."""
    vocab = config.sizes.get("vocab_size")
    labels = (f"id2label with {config.num_labels} labels" if config.id2label else
              f"num_labels = {config.num_labels}")
    for want, stated, pattern in ((vocab, f"vocab_size = {vocab}", VOCAB_TENSOR),
                                  (config.num_labels, labels, LABEL_TENSOR)):
        for name, shape in sorted(shapes.items()):
            if want is not None and pattern.search(name) and len(shape) == 2 and shape[0] != want:
                raise _mismatch(stated, name, shape[0], "rows")


def _check_layout(family, config: ModelConfig, shapes: dict) -> None:
    """Each tensor has the axes its family rule moves (a scalar where a bias belongs is refused), the residual
    width (columns of the vocabulary tensors) and each stack's FFN width are what config.json states."""
    hidden = config.sizes.get(family.config.hidden)
    rules = [(re.compile(r.pattern + "$"), r.axes) for r in family.rules]
    for name, shape in sorted(shapes.items()):
        if hidden is not None and VOCAB_TENSOR.search(name) and len(shape) == 2 and shape[1] != hidden:
            raise _mismatch(f"{family.config.hidden} = {hidden}", name, shape[1], "columns")
        m, axes = next(((m, axes) for rx, axes in rules if (m := rx.search(name))), (None, ()))
        for axis in axes:  # the first rule that matches, as the family's Spec reads it
            if axis.axis >= len(shape):
                raise OtfuseError(f"tensor {name!r} has shape {tuple(shape)} but the {family.name} layout "
                                  f"reads its axis {axis.axis}")
            if axis.space == "ffn" and axis.role == "out":
                key = family.ffn_key(stack="".join(g for g in m.groups() if g and not g.isdigit()))
                want = config.sizes.get(key)
                if want is not None and shape[axis.axis] != want:
                    raise _mismatch(f"{key} = {want}", name, shape[axis.axis], "FFN units")


def check_loads(folder, source):
    """transformers checks every field of its config classes by type (layer_norm_eps, hidden_act, ...): a
    config.json of a supported family that it would refuse is refused when the checkpoint is opened. Returns
    the loaded config (its attributes carry transformers' defaults and aliases)."""
    import transformers

    from otfuse_cli.runnable import quiet_transformers

    with quiet_transformers():
        try:
            return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # huggingface_hub's StrictDataclassError, ValueError, ...: all "does not load"
            raise OtfuseError(f"{source}: config.json does not load with transformers: "
                              f"{' '.join(str(e).split()) or type(e).__name__}") from None
