"""An independent permutation oracle (test helper).

Hides random function-preserving permutations in EVERY permutation symmetry of a model, hand-written per
family from the model's own forward code (transformers' modeling files, tests/models.py). It shares no code
with otfuse_cli on purpose: a symmetry otfuse's Spec misses is still hidden here, so fusion tests catch it.

Every function takes a state dict (`model.state_dict()` names), the config where needed and a torch.Generator,
and returns a new state dict. Vocabulary, positions, class outputs and input channels never move.
"""

from __future__ import annotations

import torch


class Mover:
    """Collects index_select moves per tensor; `result` refuses a float tensor nobody claimed, so a tensor
    forgotten by a family below fails loudly instead of silently staying put."""

    def __init__(self, sd: dict, gen: torch.Generator):
        self.sd, self.gen, self.moves = sd, gen, {}

    def perm(self, n: int, moved: bool = False) -> torch.Tensor:
        while True:  # moved=True: never the identity, so the symmetry is surely exercised
            p = torch.randperm(n, generator=self.gen)
            if not moved or n < 2 or not torch.equal(p, torch.arange(n)):
                return p

    def take(self, key: str, axis: int = 0, index: torch.Tensor | None = None, optional: bool = False) -> None:
        """Claim `key`; with an index, select it along `axis` (several moves on one tensor compose)."""
        if key not in self.sd:
            if optional:
                return
            raise KeyError(f"oracle expected tensor {key!r}")
        self.moves.setdefault(key, [])
        if index is not None:
            self.moves[key].append((axis, index))

    def linear(self, name: str, out=None, inp=None) -> None:
        """nn.Linear / nn.Conv2d: weight (out, in, ...), bias (out)."""
        self.take(f"{name}.weight", 0, out)
        self.take(f"{name}.weight", 1, inp)
        self.take(f"{name}.bias", 0, out, optional=True)

    def conv1d(self, name: str, out=None, inp=None) -> None:
        """GPT-2 Conv1D computes x @ W + b: weight is (in, out)."""
        self.take(f"{name}.weight", 1, out)
        self.take(f"{name}.weight", 0, inp)
        self.take(f"{name}.bias", 0, out)

    def norm(self, name: str, idx) -> None:
        """LayerNorm / RMSNorm / BatchNorm act per channel (LN/RMS statistics are permutation invariant)."""
        self.take(f"{name}.weight", 0, idx)
        for s in ("bias", "running_mean", "running_var"):
            self.take(f"{name}.{s}", 0, idx, optional=True)

    def result(self) -> dict:
        missed = [k for k, v in self.sd.items() if v.is_floating_point() and k not in self.moves]
        if missed:
            raise KeyError(f"oracle does not know what to do with {missed}")
        out = {}
        for k, v in self.sd.items():
            for axis, idx in self.moves.get(k, ()):
                v = v.index_select(axis, idx)
            out[k] = v.clone().contiguous()
        return out


def head_indices(m: Mover, heads: int, kv_heads: int, d: int, rope: bool):
    """Row indices of q, k, v and column index of o: whole KV groups move together with their query heads;
    inside each group the query heads move too (repeat_kv maps query head i to KV head i // rep, so any
    reorder within a group is free); Q and K share one dim permutation per KV head (q.k is a sum over dims)
    except under RoPE (dim i rotates with dim i + d/2 at frequency i: fixed); V and O share one per KV head."""
    rep = heads // kv_heads
    q, k, v, o = [], [], [], []
    for g in m.perm(kv_heads).tolist():
        qk = torch.arange(d) if rope else m.perm(d)
        vo = m.perm(d)
        k.append(g * d + qk)
        v.append(g * d + vo)
        for r in m.perm(rep, moved=True).tolist():
            h = g * rep + r
            q.append(h * d + qk)
            o.append(h * d + vo)
    return torch.cat(q), torch.cat(k), torch.cat(v), torch.cat(o)


def attention(m: Mover, names, p, heads: int, kv_heads: int | None = None, rope: bool = False) -> None:
    """Linear q, k, v, o (names in that order) reading and writing the residual basis p; for cross-attention
    k/v read the encoder output, which lives in the same residual basis p."""
    qn, kn, vn, on = names
    q, k, v, o = head_indices(m, heads, kv_heads or heads, m.sd[f"{qn}.weight"].shape[0] // heads, rope)
    for name, rows in ((qn, q), (kn, k), (vn, v)):
        m.linear(name, rows, p)
    m.linear(on, p, o)


def ffn(m: Mover, ups, down: str, p) -> None:
    """Up (and gate: SwiGLU multiplies gate and up unit by unit, so they share rows) then down."""
    f = m.perm(m.sd[f"{down}.weight"].shape[1])
    for up in ups:
        m.linear(up, f, p)
    m.linear(down, p, f)


def permute_bert(sd: dict, config, gen: torch.Generator) -> dict:
    """BertModel / RobertaModel and their sequence-, token-classification and masked-LM heads."""
    m = Mover(sd, gen)
    word = "embeddings.word_embeddings.weight"
    base = next(k for k in sd if k.endswith(word))[:-len(word)]  # "bert.", "roberta." or "" (bare BertModel)
    H = config.hidden_size
    p = m.perm(H)
    for e in ("word", "position", "token_type"):
        m.take(f"{base}embeddings.{e}_embeddings.weight", 1, p)
    m.norm(f"{base}embeddings.LayerNorm", p)
    for i in range(config.num_hidden_layers):
        L = f"{base}encoder.layer.{i}."
        attention(m, [L + f"attention.self.{n}" for n in ("query", "key", "value")] + [L + "attention.output.dense"],
                  p, config.num_attention_heads)
        m.norm(L + "attention.output.LayerNorm", p)
        ffn(m, [L + "intermediate.dense"], L + "output.dense", p)
        m.norm(L + "output.LayerNorm", p)
    pool = None
    if f"{base}pooler.dense.weight" in sd:  # dense -> tanh on the first token: its own basis
        pool = m.perm(H)
        m.linear(f"{base}pooler.dense", pool, p)
    if "classifier.weight" in sd:  # ...ForSequenceClassification reads the pooler, ...ForTokenClassification the stream
        m.linear("classifier", None, p if pool is None else pool)
    if "classifier.dense.weight" in sd:  # RoBERTa head: dense -> tanh -> out_proj
        c = m.perm(H)
        m.linear("classifier.dense", c, p)
        m.linear("classifier.out_proj", None, c)
    if "cls.predictions.decoder.weight" in sd:  # MLM: dense -> gelu -> LayerNorm -> decoder
        # a decoder tied to the word embeddings shares their column basis: the transform must output in p
        t = p if config.tie_word_embeddings else m.perm(H)
        m.linear("cls.predictions.transform.dense", t, p)
        m.norm("cls.predictions.transform.LayerNorm", t)
        m.linear("cls.predictions.decoder", None, t)
        m.take("cls.predictions.bias")
    return m.result()


def permute_distilbert(sd: dict, config, gen: torch.Generator) -> dict:
    m = Mover(sd, gen)
    p = m.perm(config.dim)
    for e in ("word", "position"):
        m.take(f"distilbert.embeddings.{e}_embeddings.weight", 1, p)
    m.norm("distilbert.embeddings.LayerNorm", p)
    for i in range(config.n_layers):
        L = f"distilbert.transformer.layer.{i}."
        attention(m, [L + f"attention.{n}_lin" for n in ("q", "k", "v", "out")], p, config.n_heads)
        m.norm(L + "sa_layer_norm", p)
        ffn(m, [L + "ffn.lin1"], L + "ffn.lin2", p)
        m.norm(L + "output_layer_norm", p)
    if "pre_classifier.weight" in sd:  # pre_classifier -> relu -> classifier on the first token
        c = m.perm(config.dim)
        m.linear("pre_classifier", c, p)
        m.linear("classifier", None, c)
    if "vocab_projector.weight" in sd:  # vocab_transform -> gelu -> LayerNorm -> projector (tied: basis p)
        t = p if config.tie_word_embeddings else m.perm(config.dim)
        m.linear("vocab_transform", t, p)
        m.norm("vocab_layer_norm", t)
        m.linear("vocab_projector", None, t)
    return m.result()


def permute_vit(sd: dict, config, gen: torch.Generator) -> dict:
    """ViTForImageClassification, transformers-5 in-memory names (vit.layers.N.attention.q_proj ...)."""
    m = Mover(sd, gen)
    p = m.perm(config.hidden_size)
    m.take("vit.embeddings.cls_token", -1, p)
    m.take("vit.embeddings.position_embeddings", -1, p)
    m.linear("vit.embeddings.patch_embeddings.projection", p, None)  # conv output channels = hidden
    for i in range(config.num_hidden_layers):
        L = f"vit.layers.{i}."
        m.norm(L + "layernorm_before", p)
        attention(m, [L + f"attention.{n}_proj" for n in "qkvo"], p, config.num_attention_heads)
        m.norm(L + "layernorm_after", p)
        ffn(m, [L + "mlp.fc1"], L + "mlp.fc2", p)
    m.norm("vit.layernorm", p)
    m.linear("classifier", None, p)
    return m.result()


def permute_gpt2(sd: dict, config, gen: torch.Generator) -> dict:
    m = Mover(sd, gen)
    H = config.n_embd
    p = m.perm(H)
    for e in ("wte", "wpe"):
        m.take(f"transformer.{e}.weight", 1, p)
    for i in range(config.n_layer):
        L = f"transformer.h.{i}."
        m.norm(L + "ln_1", p)
        q, k, v, o = head_indices(m, config.n_head, config.n_head, H // config.n_head, rope=False)
        m.conv1d(L + "attn.c_attn", torch.cat([q, H + k, 2 * H + v]), p)  # output axis holds q | k | v
        m.conv1d(L + "attn.c_proj", p, o)
        m.norm(L + "ln_2", p)
        f = m.perm(sd[L + "mlp.c_fc.weight"].shape[1])
        m.conv1d(L + "mlp.c_fc", f, p)
        m.conv1d(L + "mlp.c_proj", p, f)
    m.norm("transformer.ln_f", p)
    m.linear("lm_head", None, p)  # tied to wte: the same column move
    return m.result()


def permute_llama(sd: dict, config, gen: torch.Generator) -> dict:
    """Llama, Mistral, Qwen2 (...ForCausalLM): RMSNorm, RoPE, GQA, SwiGLU."""
    m = Mover(sd, gen)
    p = m.perm(config.hidden_size)
    m.take("model.embed_tokens.weight", 1, p)
    for i in range(config.num_hidden_layers):
        L = f"model.layers.{i}."
        m.norm(L + "input_layernorm", p)
        attention(m, [L + f"self_attn.{n}_proj" for n in "qkvo"], p, config.num_attention_heads,
                  config.num_key_value_heads, rope=True)
        m.norm(L + "post_attention_layernorm", p)
        ffn(m, [L + "mlp.gate_proj", L + "mlp.up_proj"], L + "mlp.down_proj", p)
    m.norm("model.norm", p)
    m.linear("lm_head", None, p)
    return m.result()


def permute_bart(sd: dict, config, gen: torch.Generator) -> dict:
    """BartForConditionalGeneration: encoder and decoder read one shared embedding table, so both are one
    residual basis p (and cross-attention k/v read the encoder output in p)."""
    m = Mover(sd, gen)
    p = m.perm(config.d_model)
    m.take("model.shared.weight", 1, p)
    for side, layers, heads in (("encoder", config.encoder_layers, config.encoder_attention_heads),
                                ("decoder", config.decoder_layers, config.decoder_attention_heads)):
        S = f"model.{side}."
        m.take(S + "embed_tokens.weight", 1, p)
        m.take(S + "embed_positions.weight", 1, p)
        m.norm(S + "layernorm_embedding", p)
        if S + "layer_norm.weight" in sd:  # add_final_layer_norm (mBART-style)
            m.norm(S + "layer_norm", p)
        for i in range(layers):
            L = f"{S}layers.{i}."
            blocks = ["self_attn"] + (["encoder_attn"] if side == "decoder" else [])
            for a in blocks:
                attention(m, [L + f"{a}.{n}" for n in ("q_proj", "k_proj", "v_proj", "out_proj")], p, heads)
                m.norm(L + f"{a}_layer_norm", p)
            ffn(m, [L + "fc1"], L + "fc2", p)
            m.norm(L + "final_layer_norm", p)
    m.linear("lm_head", None, p)
    m.take("final_logits_bias")
    return m.result()


def permute_marian(sd: dict, config, gen: torch.Generator) -> dict:
    """MarianMTModel: like BART, but its sinusoidal position table is rebuilt by transformers at load time in
    the standard basis (it is not even saved), so the residual basis cannot move; heads and FFN neurons can."""
    m = Mover(sd, gen)
    for key in ("model.shared.weight", "lm_head.weight", "final_logits_bias"):
        m.take(key, optional=key != "final_logits_bias")
    for side, layers, heads in (("encoder", config.encoder_layers, config.encoder_attention_heads),
                                ("decoder", config.decoder_layers, config.decoder_attention_heads)):
        S = f"model.{side}."
        for key in ("embed_tokens.weight", "embed_positions.weight"):
            m.take(S + key, optional=True)
        for i in range(layers):
            L = f"{S}layers.{i}."
            for a in ["self_attn"] + (["encoder_attn"] if side == "decoder" else []):
                attention(m, [L + f"{a}.{n}" for n in ("q_proj", "k_proj", "v_proj", "out_proj")], None, heads)
                m.norm(L + f"{a}_layer_norm", None)
            ffn(m, [L + "fc1"], L + "fc2", None)
            m.norm(L + "final_layer_norm", None)
    return m.result()


FAMILIES = {"bert": permute_bert, "roberta": permute_bert, "distilbert": permute_distilbert, "vit": permute_vit,
            "gpt2": permute_gpt2, "llama": permute_llama, "mistral": permute_llama, "qwen2": permute_llama,
            "bart": permute_bart, "marian": permute_marian}


def permute_transformer(sd: dict, config, gen: torch.Generator) -> dict:
    return FAMILIES[config.model_type](sd, config, gen)


def permute_chain(sd: dict, gen: torch.Generator, layers) -> dict:
    """A feed-forward chain of Linear/Conv2d layers, `layers` = [(prefix, [BatchNorm prefixes after it])] in
    forward order. Each hidden space gets one permutation: layer rows, its BatchNorms, next layer's columns;
    at a conv -> linear flatten, channel c owns the h*w consecutive columns c*h*w ... (c+1)*h*w - 1."""
    m = Mover(sd, gen)
    inp = None  # input channels never move
    for (name, bns), nxt in zip(layers, [*layers[1:], None]):
        if nxt is None:  # class outputs never move
            m.linear(name, None, inp)
            break
        n = sd[f"{name}.weight"].shape[0]
        out = m.perm(n)
        m.linear(name, out, inp)
        for bn in bns:
            m.norm(bn, out)
        rep = sd[f"{nxt[0]}.weight"].shape[1] // n
        inp = (out[:, None] * rep + torch.arange(rep)).flatten()
    return m.result()


def permute_resnet(sd: dict, gen: torch.Generator) -> dict:
    """torchvision-named ResNet (tests/models.py TinyResNet): an identity skip adds a block's output to its
    input, so the stem and every block of a stage share one channel permutation; a block with a downsample
    starts a new one, shared by its conv2/bn2 and the downsample conv/BN. Inside a block conv1 -> bn1 is free."""
    m = Mover(sd, gen)
    s = m.perm(sd["conv1.weight"].shape[0])
    m.linear("conv1", s, None)
    m.norm("bn1", s)
    stage = 1
    while f"layer{stage}.0.conv1.weight" in sd:
        block = 0
        while (B := f"layer{stage}.{block}.") + "conv1.weight" in sd:
            new = s
            if B + "downsample.0.weight" in sd:
                new = m.perm(sd[B + "downsample.0.weight"].shape[0])
                m.linear(B + "downsample.0", new, s)
                m.norm(B + "downsample.1", new)
            inner = m.perm(sd[B + "conv1.weight"].shape[0])
            m.linear(B + "conv1", inner, s)
            m.norm(B + "bn1", inner)
            m.linear(B + "conv2", new, inner)
            m.norm(B + "bn2", new)
            s, block = new, block + 1
        stage += 1
    m.linear("fc", None, s)
    return m.result()
