"""Tiny randomly initialised transformers of every supported family (test helper)."""

from __future__ import annotations

import torch
import transformers as T


def _cfg(name):
    common = dict(vocab_size=40)
    return {
        "bert_cls": (T.BertConfig(**common, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=24, num_labels=3), T.BertForSequenceClassification),
        "bert_mlm": (T.BertConfig(**common, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=24), T.BertForMaskedLM),
        "bert_tok": (T.BertConfig(**common, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, num_labels=4), T.BertForTokenClassification),
        "roberta_cls": (T.RobertaConfig(**common, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=24, num_labels=2, pad_token_id=1), T.RobertaForSequenceClassification),
        "distilbert_cls": (T.DistilBertConfig(**common, dim=16, n_layers=2, n_heads=4, hidden_dim=24, num_labels=2),
                           T.DistilBertForSequenceClassification),
        "distilbert_mlm": (T.DistilBertConfig(**common, dim=16, n_layers=2, n_heads=4, hidden_dim=24),
                           T.DistilBertForMaskedLM),
        "vit": (T.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
                            image_size=8, patch_size=4, num_labels=3), T.ViTForImageClassification),
        "gpt2": (T.GPT2Config(**common, n_embd=16, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                              eos_token_id=0), T.GPT2LMHeadModel),
        "llama": (T.LlamaConfig(**common, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=24, tie_word_embeddings=False,
                                bos_token_id=0, eos_token_id=0, pad_token_id=0), T.LlamaForCausalLM),
        "llama_tied": (T.LlamaConfig(**common, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=2, intermediate_size=24, tie_word_embeddings=True,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0), T.LlamaForCausalLM),
        "qwen2": (T.Qwen2Config(**common, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=24, bos_token_id=0, eos_token_id=0),
                  T.Qwen2ForCausalLM),
        "mistral": (T.MistralConfig(**common, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=1, intermediate_size=24, bos_token_id=0, eos_token_id=0),
                    T.MistralForCausalLM),
        "bart": (T.BartConfig(**common, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                              decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=24,
                              max_position_embeddings=32, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                              decoder_start_token_id=2, forced_eos_token_id=None), T.BartForConditionalGeneration),
        "marian": (T.MarianConfig(**common, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=24,
                                  max_position_embeddings=32, pad_token_id=0, eos_token_id=3,
                                  decoder_start_token_id=0, forced_eos_token_id=None), T.MarianMTModel),
    }[name]


FAMILIES = ["bert_cls", "bert_mlm", "bert_tok", "roberta_cls", "distilbert_cls", "distilbert_mlm", "vit", "gpt2",
            "llama", "llama_tied", "qwen2", "mistral", "bart", "marian"]


def tiny_model(name: str, seed: int = 0):
    config, cls = _cfg(name)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # random norms and biases too, so every entry carries signal
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in pname.lower() and "weight" in pname else 0.3 * torch.randn_like(p))
    return model


def sample_inputs(name: str, model, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=gen)}
    ids = torch.randint(3, 40, (2, 7), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name in ("bart", "marian"):
        inputs["decoder_input_ids"] = torch.randint(3, 40, (2, 5), generator=gen)
    return inputs


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


WORDS = ("the a film was good bad quiet delight long dull bright story actor plot scene music slow fast "
         "warm cold funny sad great poor").split()


def save_tokenizer(folder) -> None:
    """A word-level tokenizer over a 40-id vocabulary, so tiny text models run on real sentences offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)


def sentences(n: int = 48, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(l),), generator=gen))
            for l in torch.randint(3, 12, (n,), generator=gen)]
