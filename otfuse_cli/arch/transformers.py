"""Transformer families as declarations: each Family holds every fact otfuse knows about it — which axes of
which tensors belong to which neuron space (rules), its config.json keys (hidden size, heads, KV heads, head
size, FFN width), tied tensors, and what `compress` may shrink. One residual-stream space per model (shared
embeddings make encoder and decoder one stream), one head space per attention block, one FFN space per layer
(SwiGLU gate and up together). Vocabulary, positions and labels are never touched.

Head spaces: a unit is a KV group (a plain head without GQA). Within a unit, Q and K share one map of the
head dims ("qk") and V and O's input share another ("vo"); with grouped-query attention the G query heads
of a group can also be reordered (q rows and o columns together), one map per unit pair ("query").
Symmetries deliberately left out: RoPE rotates fixed pairs of q/k dims at fixed frequencies, so q/k dims
cannot be permuted (the "qk" map is fixed; a rotation within each frequency pair is a continuous symmetry,
not a permutation); LayerNorm/RMSNorm gains and ReLU/GELU scalings are rescalings, not permutations."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from otfuse_cli.arch.model import Entry, Space, Spec
from otfuse_cli.errors import OtfuseError

LN = r"(?:weight|bias|gamma|beta)"


@dataclass(frozen=True)
class Axis:
    """One tensor axis a rule moves. space: "res" | "heads" | "cross_heads" | "ffn" | a small dense space's
    name (pooler, MLM transform); heads and ffn spaces are per layer (the rule's regex groups name the
    layer). slot (head spaces): "q", "k" (channel qk), "v", "o" (channel vo); q and o repeat per query head
    of a KV group. part: (index, count) slice of a fused tensor (GPT-2's c_attn holds q, k and v)."""

    axis: int
    space: str
    role: str
    slot: str = ""
    part: tuple[int, int] = (0, 1)


@dataclass(frozen=True)
class Rule:
    """Tensors matching `pattern` (anchored at the end) move on `axes`; no axes = never moves."""

    pattern: str
    axes: tuple[Axis, ...] = ()


@dataclass(frozen=True)
class ConfigKeys:
    """Where config.json states the widths (`{stack}` = encoder/decoder for seq2seq models)."""

    hidden: str
    heads: str
    ffn: str
    kv_heads: str = ""
    head_dim: str = ""  # set where head size is independent of hidden_size / heads


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    rules: tuple[Rule, ...]
    config: ConfigKeys
    rope: bool = False  # RoPE: within-head q/k order stays fixed
    tied: dict[str, str] = field(default_factory=dict)  # dense space -> decoder tensor regex; absent = tied to embeddings
    note: str = ""  # said once whenever this family is aligned (a limit the user should know about)
    heads: str = ""  # task-head tensors (regex from the name's start): trained per task, kept per parent on request

    @property
    def compress_heads(self) -> bool:
        """Heads can shrink only where config.json states head_dim (else head size = hidden / heads)."""
        return bool(self.config.head_dim)

    def ffn_key(self, stack: str) -> str:
        return self.config.ffn.format(stack=stack)

    def head_overrides(self, kv_groups: int, group: int, head_dim: int) -> dict:
        """config.json values for `kv_groups` KV groups of `group` query heads each."""
        out = {self.config.heads: kv_groups * group, self.config.head_dim: head_dim}
        if self.config.kv_heads:
            out[self.config.kv_heads] = kv_groups
        return out


def produces(axis: int, space: str, slot: str = "", part: tuple[int, int] = (0, 1)) -> Axis:
    """The axis indexes what the space's units produce (weight rows, biases, norm gains, embedding columns)."""
    return Axis(axis, space, "out", slot, part)


def reads(axis: int, space: str, slot: str = "") -> Axis:
    """The axis indexes what the space's units feed (the next layer's input columns)."""
    return Axis(axis, space, "in", slot)


def rule(pattern: str, *axes: Axis) -> Rule:
    return Rule(pattern, axes)


def attn(q: str, k: str, v: str, o: str, heads: str = "heads", res: str | None = "res") -> list[Rule]:
    """Separate q/k/v/o Linear layers (out, in) with optional biases; arguments are module regexes. res=None:
    the residual stream is fixed (only the heads move)."""
    reads_res, makes_res = ((reads(1, res),), (produces(0, res),)) if res else ((), ())
    return [
        rule(rf"{q}\.weight", produces(0, heads, "q"), *reads_res),
        rule(rf"{k}\.weight", produces(0, heads, "k"), *reads_res),
        rule(rf"{v}\.weight", produces(0, heads, "v"), *reads_res),
        rule(rf"{q}\.bias", produces(0, heads, "q")),
        rule(rf"{k}\.bias", produces(0, heads, "k")),
        rule(rf"{v}\.bias", produces(0, heads, "v")),
        rule(rf"{o}\.weight", *makes_res, reads(1, heads, "o")),
        rule(rf"{o}\.bias", *makes_res),
    ]


def linear(name: str, out_space: str | None, in_space: str | None) -> list[Rule]:
    axes_w = ([produces(0, out_space)] if out_space else []) + ([reads(1, in_space)] if in_space else [])
    return [rule(rf"{name}\.weight", *axes_w), rule(rf"{name}\.bias", *([produces(0, out_space)] if out_space else []))]


def norm(name: str, space: str = "res") -> list[Rule]:
    return [rule(rf"{name}\.{LN}", produces(0, space))]


L = r"(\d+)"  # layer index group

BERT_LAYER = rf"encoder\.layer\.{L}"
BERT = Family(
    "bert", ("bert", "roberta", "xlm-roberta", "camembert"),
    (
        rule(r"embeddings\.(?:word|position|token_type)_embeddings\.weight", produces(1, "res")),
        rule(r"embeddings\.position_ids"),
        *norm(r"embeddings\.LayerNorm"),
        *attn(*(rf"{BERT_LAYER}\.attention\.self\.{m}" for m in ("query", "key", "value")),
              rf"{BERT_LAYER}\.attention\.output\.dense"),
        *norm(rf"{BERT_LAYER}\.attention\.output\.LayerNorm"),
        *linear(rf"{BERT_LAYER}\.intermediate\.dense", "ffn", "res"),
        *linear(rf"{BERT_LAYER}\.output\.dense", "res", "ffn"),
        *norm(rf"{BERT_LAYER}\.output\.LayerNorm"),
        *linear(r"pooler\.dense", "pooler", "res"),
        # sequence classification: BERT's classifier reads the pooler, RoBERTa's head has its own dense
        rule(r"^classifier\.weight", reads(1, "pooler")),
        *linear(r"classifier\.dense", "cls_dense", "res"),
        *linear(r"classifier\.out_proj", None, "cls_dense"),
        rule(r"classifier\.(?:out_proj\.)?bias"),
        # MLM heads: the transform feeds the decoder, tied to the word embeddings unless stored apart
        *linear(r"cls\.predictions\.transform\.dense", "mlm", "res"),
        *norm(r"cls\.predictions\.transform\.LayerNorm", "mlm"),
        rule(r"cls\.predictions\.decoder\.weight", reads(1, "mlm")),
        rule(r"cls\.predictions\.(?:decoder\.)?bias"),
        *linear(r"lm_head\.dense", "mlm", "res"),
        *norm(r"lm_head\.layer_norm", "mlm"),
        rule(r"lm_head\.decoder\.weight", reads(1, "mlm")),
        rule(r"lm_head\.(?:decoder\.)?bias"),
    ),
    ConfigKeys(hidden="hidden_size", heads="num_attention_heads", ffn="intermediate_size"),
    tied={"mlm": r"(?:cls\.predictions|lm_head)\.decoder\.weight"},
    heads=r"(?:classifier|qa_outputs)\.",
)

DISTIL_LAYER = rf"transformer\.layer\.{L}"
DISTILBERT = Family(
    "distilbert", ("distilbert",),
    (
        rule(r"embeddings\.(?:word|position)_embeddings\.weight", produces(1, "res")),
        rule(r"embeddings\.position_ids"),
        *norm(r"embeddings\.LayerNorm"),
        *attn(*(rf"{DISTIL_LAYER}\.attention\.{m}" for m in ("q_lin", "k_lin", "v_lin", "out_lin"))),
        *norm(rf"{DISTIL_LAYER}\.sa_layer_norm"),
        *linear(rf"{DISTIL_LAYER}\.ffn\.lin1", "ffn", "res"),
        *linear(rf"{DISTIL_LAYER}\.ffn\.lin2", "res", "ffn"),
        *norm(rf"{DISTIL_LAYER}\.output_layer_norm"),
        *linear(r"pre_classifier", "pooler", "res"),
        rule(r"^classifier\.weight", reads(1, "pooler")),
        rule(r"^classifier\.bias"),
        *linear(r"vocab_transform", "mlm", "res"),
        *norm(r"vocab_layer_norm", "mlm"),
        rule(r"vocab_projector\.weight", reads(1, "mlm")),
        rule(r"vocab_projector\.bias"),
    ),
    ConfigKeys(hidden="dim", heads="n_heads", ffn="hidden_dim"),
    tied={"mlm": r"vocab_projector\.weight"},
    heads=r"(?:pre_classifier|classifier|qa_outputs)\.",
)

# ViT is saved in its legacy names (encoder.layer.N.attention.attention.query, ...) but transformers 5 holds
# it as layers.N.attention.q_proj / mlp.fc1 in memory, which is what a bare state_dict() export carries.
VIT_LAYER = rf"(?:encoder\.layer|layers)\.{L}"
VIT_Q, VIT_K, VIT_V = (rf"{VIT_LAYER}\.attention\.(?:attention\.{a}|{b}_proj)" for a, b in
                       (("query", "q"), ("key", "k"), ("value", "v")))
VIT_O = rf"{VIT_LAYER}\.attention\.(?:output\.dense|o_proj)"
VIT = Family(
    "vit", ("vit",),
    (
        rule(r"embeddings\.cls_token", produces(2, "res")),
        rule(r"embeddings\.position_embeddings", produces(2, "res")),
        rule(r"embeddings\.mask_token", produces(2, "res")),
        *linear(r"embeddings\.patch_embeddings\.projection", "res", None),
        *attn(VIT_Q, VIT_K, VIT_V, VIT_O),
        *norm(rf"{VIT_LAYER}\.layernorm_(?:before|after)"),
        *linear(rf"{VIT_LAYER}\.(?:intermediate\.dense|mlp\.fc1)", "ffn", "res"),
        *linear(rf"{VIT_LAYER}\.(?:output\.dense|mlp\.fc2)", "res", "ffn"),
        *norm(r"vit\.layernorm"),
        *linear(r"pooler\.dense", "pooler", "res"),
        rule(r"^classifier\.weight", reads(1, "res")),
        rule(r"^classifier\.bias"),
    ),
    ConfigKeys(hidden="hidden_size", heads="num_attention_heads", ffn="intermediate_size"),
    heads=r"classifier\.",
)

GPT2_LAYER = rf"h\.{L}"
GPT2 = Family(
    "gpt2", ("gpt2",),
    (
        rule(r"wte\.weight", produces(1, "res")),
        rule(r"wpe\.weight", produces(1, "res")),
        # Conv1D stores (in, out); c_attn's output axis holds q, k and v one after another
        rule(rf"{GPT2_LAYER}\.attn\.c_attn\.weight", reads(0, "res"), produces(1, "heads", "q", (0, 3)),
             produces(1, "heads", "k", (1, 3)), produces(1, "heads", "v", (2, 3))),
        rule(rf"{GPT2_LAYER}\.attn\.c_attn\.bias", produces(0, "heads", "q", (0, 3)),
             produces(0, "heads", "k", (1, 3)), produces(0, "heads", "v", (2, 3))),
        rule(rf"{GPT2_LAYER}\.attn\.c_proj\.weight", reads(0, "heads", "o"), produces(1, "res")),
        rule(rf"{GPT2_LAYER}\.attn\.c_proj\.bias", produces(0, "res")),
        rule(rf"{GPT2_LAYER}\.attn\.(?:masked_)?bias"),
        rule(rf"{GPT2_LAYER}\.mlp\.c_fc\.weight", reads(0, "res"), produces(1, "ffn")),
        rule(rf"{GPT2_LAYER}\.mlp\.c_fc\.bias", produces(0, "ffn")),
        rule(rf"{GPT2_LAYER}\.mlp\.c_proj\.weight", reads(0, "ffn"), produces(1, "res")),
        rule(rf"{GPT2_LAYER}\.mlp\.c_proj\.bias", produces(0, "res")),
        *norm(rf"{GPT2_LAYER}\.ln_[12]"),
        *norm(r"ln_f"),
        rule(r"lm_head\.weight", reads(1, "res")),
        rule(r"score\.weight", reads(1, "res")),
    ),
    ConfigKeys(hidden="n_embd", heads="n_head", ffn="n_inner"),
    heads=r"score\.",
)

LLAMA_LAYER = rf"layers\.{L}"
LLAMA = Family(
    "llama", ("llama", "mistral", "qwen2"),
    (
        rule(r"embed_tokens\.weight", produces(1, "res")),
        *attn(*(rf"{LLAMA_LAYER}\.self_attn\.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj"))),
        *norm(rf"{LLAMA_LAYER}\.(?:input|post_attention)_layernorm"),
        *linear(rf"{LLAMA_LAYER}\.mlp\.(?:gate|up)_proj", "ffn", "res"),
        *linear(rf"{LLAMA_LAYER}\.mlp\.down_proj", "res", "ffn"),
        rule(rf"{LLAMA_LAYER}\.self_attn\.rotary_emb\.inv_freq"),
        *norm(r"model\.norm"),
        rule(r"lm_head\.weight", reads(1, "res")),
        rule(r"score\.weight", reads(1, "res")),
    ),
    ConfigKeys(hidden="hidden_size", heads="num_attention_heads", ffn="intermediate_size",
               kv_heads="num_key_value_heads", head_dim="head_dim"),
    rope=True,
    heads=r"score\.",
)

S = r"(encoder|decoder)"
SEQ2SEQ_LAYER = rf"{S}\.layers\.{L}"
BART = Family(
    "bart", ("bart", "mbart"),
    (
        rule(r"(?:shared|embed_tokens)\.weight", produces(1, "res")),
        rule(r"embed_positions\.weight", produces(1, "res")),
        *norm(r"layernorm_embedding"),
        *norm(rf"{S}\.layer_norm"),
        *attn(*(rf"{SEQ2SEQ_LAYER}\.self_attn\.{m}" for m in ("q_proj", "k_proj", "v_proj", "out_proj"))),
        # cross-attention: queries read the decoder stream, keys/values the encoder's output; with shared
        # embeddings both are the one residual space
        *attn(*(rf"{SEQ2SEQ_LAYER}\.encoder_attn\.{m}" for m in ("q_proj", "k_proj", "v_proj", "out_proj")),
              heads="cross_heads"),
        *norm(rf"{SEQ2SEQ_LAYER}\.(?:self_attn|encoder_attn|final)_layer_norm"),
        *linear(rf"{SEQ2SEQ_LAYER}\.fc1", "ffn", "res"),
        *linear(rf"{SEQ2SEQ_LAYER}\.fc2", "res", "ffn"),
        rule(r"lm_head\.weight", reads(1, "res")),
        rule(r"final_logits_bias"),
        *linear(r"classification_head\.dense", "pooler", "res"),
        *linear(r"classification_head\.out_proj", None, "pooler"),
    ),
    ConfigKeys(hidden="d_model", heads="encoder_attention_heads", ffn="{stack}_ffn_dim"),
    heads=r"(?:classification_head|qa_outputs)\.",
)

MARIAN = Family(
    # Marian's sinusoidal positions are not in its checkpoint: transformers rebuilds them at load time in the
    # standard basis, and every column of the table differs, so the only residual permutation that keeps them
    # is the identity (tests/test_marian.py measures both facts). The residual stream is therefore fixed and
    # only what can move is aligned: each layer's heads (self- and cross-attention) and FFN neurons. Parents
    # must share one residual basis (e.g. fine-tunes of one opus-mt model); Marians trained from scratch
    # apart cannot be aligned here.
    "marian", ("marian",),
    (
        rule(r"(?:shared|embed_tokens)\.weight"),
        rule(r"embed_positions\.weight"),
        rule(rf"{S}\.layer_norm\.{LN}"),
        *attn(*(rf"{SEQ2SEQ_LAYER}\.self_attn\.{m}" for m in ("q_proj", "k_proj", "v_proj", "out_proj")), res=None),
        *attn(*(rf"{SEQ2SEQ_LAYER}\.encoder_attn\.{m}" for m in ("q_proj", "k_proj", "v_proj", "out_proj")),
              heads="cross_heads", res=None),
        rule(rf"{SEQ2SEQ_LAYER}\.(?:self_attn|encoder_attn|final)_layer_norm\.{LN}"),
        *linear(rf"{SEQ2SEQ_LAYER}\.fc1", "ffn", None),
        *linear(rf"{SEQ2SEQ_LAYER}\.fc2", None, "ffn"),
        rule(r"lm_head\.weight"),
        rule(r"final_logits_bias"),
    ),
    ConfigKeys(hidden="d_model", heads="encoder_attention_heads", ffn="{stack}_ffn_dim"),
    note="the residual stream is not aligned (its sinusoidal positions are rebuilt at load in the standard "
         "basis), only heads and FFN neurons: fuse Marians that share one residual basis, e.g. fine-tunes of one "
         "opus-mt model, or use BART/mBART for models trained apart",
)

FAMILIES: tuple[Family, ...] = (BERT, DISTILBERT, VIT, GPT2, LLAMA, BART, MARIAN)


def alignment_note(family: str) -> str:
    """What to tell the user whenever `family` is aligned ("" for most families)."""
    return next((f.note for f in FAMILIES if f.name == family), "")


def _dims(family: Family, config: dict) -> tuple[int, int, int]:
    """(query heads, KV heads, head size) from config.json, checked to be positive integers that divide."""
    text = config.get("text_config") or config
    if not isinstance(text, dict):
        raise OtfuseError(f"config.json: text_config must be an object, got {type(text).__name__}")
    keys = family.config

    def read(key: str, default=None):
        value = text.get(key, None) if key else None
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OtfuseError(f"config.json: {key} must be a positive integer, got {value!r}")
        return value

    heads, hidden = read(keys.heads), read(keys.hidden)
    if heads is None or hidden is None:
        raise OtfuseError(f"config.json lacks {keys.heads}/{keys.hidden} for a {family.name} model")
    kv = read(keys.kv_heads, heads)
    if heads % kv:
        raise OtfuseError(f"config.json: {keys.heads}={heads} is not a multiple of {keys.kv_heads}={kv}")
    head_dim = read(keys.head_dim)
    if head_dim is None:  # head size derived from the width: it must split evenly, as transformers requires
        if hidden % heads:
            raise OtfuseError(f"config.json: {keys.hidden}={hidden} is not a multiple of {keys.heads}={heads}")
        head_dim = hidden // heads
    return heads, kv, head_dim


# Where config.json states the layer count: the first key present (seq2seq stacks: `{stack}_layers`).
LAYER_KEYS = ("num_hidden_layers", "n_layers", "n_layer")
# Token ids the model looks up in its vocabulary (the embedding's padding row, generation's start and stop).
TOKEN_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id")


def layer_indices(family: Family, names) -> dict[str, set[int]]:
    """stack ("" or encoder/decoder) -> the layer indices the tensor names hold (the rules' layer groups)."""
    compiled = [re.compile(r.pattern + "$") for r in family.rules]
    found: dict[str, set[int]] = {}
    for name in names:
        m = next((m for rx in compiled if (m := rx.search(name))), None)
        groups = [g for g in m.groups() if g is not None] if m else []
        layers = [int(g) for g in groups if g.isdigit()]
        if layers:
            stack = "".join(g for g in groups if not g.isdigit())
            found.setdefault(stack, set()).add(layers[0])
    return found


def check_layers(family: Family, config: dict, names) -> None:
    """The layer count config.json states must be the layers the tensors hold (0..N-1): transformers builds
    what the config says, silently dropping extra layers or leaving missing ones random."""
    text = config.get("text_config") or config
    found = layer_indices(family, names)
    stacks = ("encoder", "decoder") if "{stack}" in family.config.ffn else ("",)
    for stack in stacks:
        keys = (f"{stack}_layers",) if stack else LAYER_KEYS
        key = next((k for k in keys if text.get(k) is not None), None)
        if key is None:
            continue
        have = found.get(stack, set())
        if len(have) != text[key] or have != set(range(text[key])):  # length first: never build range(2**40)
            held = f"layers {min(have)}..{max(have)}" if have else "no layers"
            where = f" of the {stack}" if stack else ""
            raise OtfuseError(f"config.json states {key} = {text[key]} but the tensors{where} hold {held} "
                              f"({len(have)} in all); the config does not describe these weights")


def _space_name(kind: str, groups: tuple[str, ...]) -> str:
    if kind == "res":
        return "residual"
    if groups:
        return ".".join(groups) + f".{kind}"
    return kind


def build(family: Family, config: dict, shapes: dict) -> Spec:
    heads, kv, head_dim = _dims(family, config)
    group = heads // kv
    tied_to_embeddings = {space for space, rx in family.tied.items()
                          if not any(re.search(rx, n) for n in shapes)}
    compiled = [(re.compile(r.pattern + "$"), r.axes) for r in family.rules]
    matched = {}
    for name in sorted(shapes):
        hit = next(((m, axes) for rx, axes in compiled if (m := rx.search(name))), None)
        if hit is None:
            raise OtfuseError(f"tensor {name!r} is not part of the {family.name} layout otfuse knows")
        matched[name] = hit
    # a head read by a classifier whose pooler is absent reads the residual stream itself
    produced = {a.space for _, axes in matched.values() for a in axes if a.role == "out"}
    spaces: dict[str, Space] = {}
    order: dict[str, tuple] = {}
    for name, (m, axes) in matched.items():
        groups = tuple(g for g in m.groups() if g is not None)
        for ax in axes:
            kind = ax.space
            if kind in tied_to_embeddings or kind not in produced:
                kind = "res"
            length = shapes[name][ax.axis] // ax.part[1]
            start = ax.part[0] * length
            layered = kind in ("heads", "cross_heads", "ffn")
            sname = _space_name(kind, groups if layered else ())
            if kind in ("heads", "cross_heads"):
                rep = group if ax.slot in ("q", "o") else 1
                channel = "qk" if ax.slot in ("q", "k") else "vo"
                # GQA: the query heads of a KV group may be reordered (q rows and o columns together)
                entry = Entry(name, ax.axis, ax.role, start, rep, head_dim, channel, "query" if rep > 1 else "")
                size = length // (rep * head_dim)
                space_kind = "heads"
            else:
                entry = Entry(name, ax.axis, ax.role, start)
                size = length
                space_kind = {"res": "residual", "ffn": "ffn"}.get(kind, "dense")
            if sname not in spaces:
                fixed = ("qk",) if family.rope and space_kind == "heads" and kind == "heads" else ()
                spaces[sname] = Space(sname, space_kind, size, [], fixed_inner=fixed,
                                      compressible=space_kind in ("ffn", "heads"),
                                      note="residual stream: compress only with care (norms)"
                                      if space_kind == "residual" else "")
                layer = tuple(int(g) if g.isdigit() else g for g in groups) if layered else ()
                rank = {"residual": 0, "heads": 1, "ffn": 2}.get(space_kind, 3)
                order[sname] = (0 if rank == 0 else 1 if layered else 2, layer, rank, sname)
            spaces[sname].entries.append(entry)
    for space in spaces.values():
        space.entries.sort(key=lambda e: (e.tensor, e.axis, e.start))
        # an FFN's units fed by one module (not a gate and an up projection multiplied unit by unit)
        producers = {e.tensor.rsplit(".", 1)[0] for e in space.entries if e.role == "out"}
        space.linear = space.kind == "ffn" and len(producers) == 1
    ordered = [spaces[n] for n in sorted(spaces, key=lambda n: order[n])]
    return Spec(family.name, ordered, fixed_note="vocabulary, positions and labels")
