"""Transformer families as declarations: regex rules that say which axes of which tensors belong to
which neuron space. One residual-stream space per model (shared embeddings make encoder and decoder one
stream), one head space per attention block (whole KV groups move; Q/K and V/O inner maps per head), one
FFN space per layer (SwiGLU gate and up together). Vocabulary, positions and labels are never touched.

A rule's axis spec is (axis, space, role[, slot[, part]]):
  space  "res" | "heads" | "ffn" | any other name for a small dense space (pooler, MLM transform);
         "heads"/"ffn" are per layer: the rule's regex groups name the layer;
  slot   for heads: "q", "k" (channel qk), "v", "o" (channel vo); q and o repeat per query head of a KV group;
  part   (index, count): the slice of a fused tensor (GPT-2's c_attn holds q, k and v).
Tensors that match a rule with no axes never move; a tensor no rule matches is refused."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from otfuse_cli.errors import OtfuseError
from otfuse_cli.arch import HF_FAMILIES
from otfuse_cli.arch.model import Entry, Space, Spec

W = r"(?:weight|gamma)"
B = r"(?:bias|beta)"
LN = r"(?:weight|bias|gamma|beta)"


@dataclass
class Family:
    name: str
    model_types: tuple[str, ...]
    rules: list[tuple[str, list[tuple]]]
    heads: dict[str, str]  # config keys: "heads", "kv_heads" (optional), "head_dim" (optional), "hidden"
    rope: bool = False  # RoPE: within-head q/k order stays fixed
    tied: dict[str, str] = field(default_factory=dict)  # dense space -> decoder tensor regex; absent = tied to embeddings


def attn(q: str, k: str, v: str, o: str, heads: str = "heads") -> list[tuple[str, list[tuple]]]:
    """Separate q/k/v/o Linear layers (out, in) with optional biases; arguments are module regexes."""
    return [
        (rf"{q}\.weight", [(0, heads, "out", "q"), (1, "res", "in")]),
        (rf"{k}\.weight", [(0, heads, "out", "k"), (1, "res", "in")]),
        (rf"{v}\.weight", [(0, heads, "out", "v"), (1, "res", "in")]),
        (rf"{q}\.bias", [(0, heads, "out", "q")]),
        (rf"{k}\.bias", [(0, heads, "out", "k")]),
        (rf"{v}\.bias", [(0, heads, "out", "v")]),
        (rf"{o}\.weight", [(0, "res", "out"), (1, heads, "in", "o")]),
        (rf"{o}\.bias", [(0, "res", "out")]),
    ]


def linear(name: str, out_space: str | None, in_space: str | None) -> list[tuple[str, list[tuple]]]:
    axes_w = ([(0, out_space, "out")] if out_space else []) + ([(1, in_space, "in")] if in_space else [])
    return [(rf"{name}\.weight", axes_w), (rf"{name}\.bias", [(0, out_space, "out")] if out_space else [])]


def norm(name: str, space: str = "res") -> list[tuple[str, list[tuple]]]:
    return [(rf"{name}\.{LN}", [(0, space, "out")])]


L = r"(\d+)"  # layer index group

BERT_LAYER = rf"encoder\.layer\.{L}"
BERT = Family(
    "bert", ("bert", "roberta", "xlm-roberta", "camembert"),
    [
        (r"embeddings\.(?:word|position|token_type)_embeddings\.weight", [(1, "res", "out")]),
        (r"embeddings\.position_ids", []),
        *norm(r"embeddings\.LayerNorm"),
        *attn(*(rf"{BERT_LAYER}\.attention\.self\.{m}" for m in ("query", "key", "value")),
              rf"{BERT_LAYER}\.attention\.output\.dense"),
        *norm(rf"{BERT_LAYER}\.attention\.output\.LayerNorm"),
        *linear(rf"{BERT_LAYER}\.intermediate\.dense", "ffn", "res"),
        *linear(rf"{BERT_LAYER}\.output\.dense", "res", "ffn"),
        *norm(rf"{BERT_LAYER}\.output\.LayerNorm"),
        *linear(r"pooler\.dense", "pooler", "res"),
        # sequence classification: BERT's classifier reads the pooler, RoBERTa's head has its own dense
        (r"^classifier\.weight", [(1, "pooler", "in")]),
        *linear(r"classifier\.dense", "cls_dense", "res"),
        *linear(r"classifier\.out_proj", None, "cls_dense"),
        (r"classifier\.(?:out_proj\.)?bias", []),
        # MLM heads: the transform feeds the decoder, tied to the word embeddings unless stored apart
        *linear(r"cls\.predictions\.transform\.dense", "mlm", "res"),
        *norm(r"cls\.predictions\.transform\.LayerNorm", "mlm"),
        (r"cls\.predictions\.decoder\.weight", [(1, "mlm", "in")]),
        (r"cls\.predictions\.(?:decoder\.)?bias", []),
        *linear(r"lm_head\.dense", "mlm", "res"),
        *norm(r"lm_head\.layer_norm", "mlm"),
        (r"lm_head\.decoder\.weight", [(1, "mlm", "in")]),
        (r"lm_head\.(?:decoder\.)?bias", []),
    ],
    {"heads": "num_attention_heads", "hidden": "hidden_size"},
    tied={"mlm": r"(?:cls\.predictions|lm_head)\.decoder\.weight"},
)

DISTIL_LAYER = rf"transformer\.layer\.{L}"
DISTILBERT = Family(
    "distilbert", ("distilbert",),
    [
        (r"embeddings\.(?:word|position)_embeddings\.weight", [(1, "res", "out")]),
        (r"embeddings\.position_ids", []),
        *norm(r"embeddings\.LayerNorm"),
        *attn(*(rf"{DISTIL_LAYER}\.attention\.{m}" for m in ("q_lin", "k_lin", "v_lin", "out_lin"))),
        *norm(rf"{DISTIL_LAYER}\.sa_layer_norm"),
        *linear(rf"{DISTIL_LAYER}\.ffn\.lin1", "ffn", "res"),
        *linear(rf"{DISTIL_LAYER}\.ffn\.lin2", "res", "ffn"),
        *norm(rf"{DISTIL_LAYER}\.output_layer_norm"),
        *linear(r"pre_classifier", "pooler", "res"),
        (r"^classifier\.weight", [(1, "pooler", "in")]),
        (r"^classifier\.bias", []),
        *linear(r"vocab_transform", "mlm", "res"),
        *norm(r"vocab_layer_norm", "mlm"),
        (r"vocab_projector\.weight", [(1, "mlm", "in")]),
        (r"vocab_projector\.bias", []),
    ],
    {"heads": "n_heads", "hidden": "dim"},
    tied={"mlm": r"vocab_projector\.weight"},
)

# ViT is saved in its legacy names (encoder.layer.N.attention.attention.query, ...) but transformers 5 holds
# it as layers.N.attention.q_proj / mlp.fc1 in memory, which is what a bare state_dict() export carries.
VIT_LAYER = rf"(?:encoder\.layer|layers)\.{L}"
VIT_Q, VIT_K, VIT_V = (rf"{VIT_LAYER}\.attention\.(?:attention\.{a}|{b}_proj)" for a, b in
                       (("query", "q"), ("key", "k"), ("value", "v")))
VIT_O = rf"{VIT_LAYER}\.attention\.(?:output\.dense|o_proj)"
VIT = Family(
    "vit", ("vit",),
    [
        (r"embeddings\.cls_token", [(2, "res", "out")]),
        (r"embeddings\.position_embeddings", [(2, "res", "out")]),
        (r"embeddings\.mask_token", [(2, "res", "out")]),
        *linear(r"embeddings\.patch_embeddings\.projection", "res", None),
        *attn(VIT_Q, VIT_K, VIT_V, VIT_O),
        *norm(rf"{VIT_LAYER}\.layernorm_(?:before|after)"),
        *linear(rf"{VIT_LAYER}\.(?:intermediate\.dense|mlp\.fc1)", "ffn", "res"),
        *linear(rf"{VIT_LAYER}\.(?:output\.dense|mlp\.fc2)", "res", "ffn"),
        *norm(r"vit\.layernorm"),
        *linear(r"pooler\.dense", "pooler", "res"),
        (r"^classifier\.weight", [(1, "res", "in")]),
        (r"^classifier\.bias", []),
    ],
    {"heads": "num_attention_heads", "hidden": "hidden_size"},
)

GPT2_LAYER = rf"h\.{L}"
GPT2 = Family(
    "gpt2", ("gpt2",),
    [
        (r"wte\.weight", [(1, "res", "out")]),
        (r"wpe\.weight", [(1, "res", "out")]),
        # Conv1D stores (in, out); c_attn's output axis holds q, k and v one after another
        (rf"{GPT2_LAYER}\.attn\.c_attn\.weight",
         [(0, "res", "in"), (1, "heads", "out", "q", (0, 3)), (1, "heads", "out", "k", (1, 3)),
          (1, "heads", "out", "v", (2, 3))]),
        (rf"{GPT2_LAYER}\.attn\.c_attn\.bias",
         [(0, "heads", "out", "q", (0, 3)), (0, "heads", "out", "k", (1, 3)), (0, "heads", "out", "v", (2, 3))]),
        (rf"{GPT2_LAYER}\.attn\.c_proj\.weight", [(0, "heads", "in", "o"), (1, "res", "out")]),
        (rf"{GPT2_LAYER}\.attn\.c_proj\.bias", [(0, "res", "out")]),
        (rf"{GPT2_LAYER}\.attn\.(?:masked_)?bias", []),
        (rf"{GPT2_LAYER}\.mlp\.c_fc\.weight", [(0, "res", "in"), (1, "ffn", "out")]),
        (rf"{GPT2_LAYER}\.mlp\.c_fc\.bias", [(0, "ffn", "out")]),
        (rf"{GPT2_LAYER}\.mlp\.c_proj\.weight", [(0, "ffn", "in"), (1, "res", "out")]),
        (rf"{GPT2_LAYER}\.mlp\.c_proj\.bias", [(0, "res", "out")]),
        *norm(rf"{GPT2_LAYER}\.ln_[12]"),
        *norm(r"ln_f"),
        (r"lm_head\.weight", [(1, "res", "in")]),
        (r"score\.weight", [(1, "res", "in")]),
    ],
    {"heads": "n_head", "hidden": "n_embd"},
)

LLAMA_LAYER = rf"layers\.{L}"
LLAMA = Family(
    "llama", ("llama", "mistral", "qwen2"),
    [
        (r"embed_tokens\.weight", [(1, "res", "out")]),
        *attn(*(rf"{LLAMA_LAYER}\.self_attn\.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj"))),
        *norm(rf"{LLAMA_LAYER}\.(?:input|post_attention)_layernorm"),
        *linear(rf"{LLAMA_LAYER}\.mlp\.(?:gate|up)_proj", "ffn", "res"),
        *linear(rf"{LLAMA_LAYER}\.mlp\.down_proj", "res", "ffn"),
        (rf"{LLAMA_LAYER}\.self_attn\.rotary_emb\.inv_freq", []),
        *norm(r"model\.norm"),
        (r"lm_head\.weight", [(1, "res", "in")]),
        (r"score\.weight", [(1, "res", "in")]),
    ],
    {"heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "head_dim": "head_dim",
     "hidden": "hidden_size"},
    rope=True,
)

S = r"(encoder|decoder)"
SEQ2SEQ_LAYER = rf"{S}\.layers\.{L}"
BART = Family(
    # Marian is left out on purpose: its sinusoidal positions are regenerated at load time in the
    # standard basis, so its residual stream has no permutation symmetry to align.
    "bart", ("bart", "mbart"),
    [
        (r"(?:shared|embed_tokens)\.weight", [(1, "res", "out")]),
        (r"embed_positions\.weight", [(1, "res", "out")]),
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
        (r"lm_head\.weight", [(1, "res", "in")]),
        (r"final_logits_bias", []),
        *linear(r"classification_head\.dense", "pooler", "res"),
        *linear(r"classification_head\.out_proj", None, "pooler"),
    ],
    {"heads": "encoder_attention_heads", "hidden": "d_model"},
)


def _dims(family: Family, config: dict) -> tuple[int, int, int]:
    text = config.get("text_config") or config
    heads = text.get(family.heads["heads"])
    hidden = text.get(family.heads["hidden"])
    if not heads or not hidden:
        raise OtfuseError(f"config.json lacks {family.heads['heads']}/{family.heads['hidden']} for a {family.name} model")
    kv = text.get(family.heads.get("kv_heads", ""), None) or heads
    head_dim = text.get(family.heads.get("head_dim", ""), None) or hidden // heads
    return heads, kv, head_dim


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
    compiled = [(re.compile(rx + "$"), axes) for rx, axes in family.rules]
    matched = {}
    for name in sorted(shapes):
        hit = next(((m, axes) for rx, axes in compiled if (m := rx.search(name))), None)
        if hit is None:
            raise OtfuseError(f"tensor {name!r} is not part of the {family.name} layout otfuse knows")
        matched[name] = hit
    # a head read by a classifier whose pooler is absent reads the residual stream itself
    produced = {a[1] for _, axes in matched.values() for a in axes if a[2] == "out"}
    spaces: dict[str, Space] = {}
    order: dict[str, tuple] = {}
    for name, (m, axes) in matched.items():
        groups = tuple(g for g in m.groups() if g is not None)
        for spec_axis in axes:
            axis, kind, role = spec_axis[:3]
            slot = spec_axis[3] if len(spec_axis) > 3 else ""
            part = spec_axis[4] if len(spec_axis) > 4 else (0, 1)
            if kind in tied_to_embeddings or kind not in produced:
                kind = "res"
            length = shapes[name][axis] // part[1]
            start = part[0] * length
            layered = kind in ("heads", "cross_heads", "ffn")
            sname = _space_name(kind, groups if layered else ())
            if kind in ("heads", "cross_heads"):
                rep = group if slot in ("q", "o") else 1
                channel = "qk" if slot in ("q", "k") else "vo"
                entry = Entry(name, axis, role, start, rep, head_dim, channel)
                size = length // (rep * head_dim)
                space_kind = "heads"
            else:
                entry = Entry(name, axis, role, start)
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
    ordered = [spaces[n] for n in sorted(spaces, key=lambda n: order[n])]
    return Spec(family.name, ordered, fixed_note="vocabulary, positions and labels")


for _family in (BERT, DISTILBERT, VIT, GPT2, LLAMA, BART):
    for _model_type in _family.model_types:
        HF_FAMILIES[_model_type] = (lambda fam: lambda config, shapes: build(fam, config, shapes))(_family)
