"""`compress --method importance --data`: each FFN keeps the units whose output (the down projection's input)
has the largest L2 norm over the data's tokens (Minitron's score).

Oracle: the norms computed here with a torch hook on transformers' own Llama forward pass, over the same texts
tokenized here (padding excluded); the kept units are read back from the compressed folder's weights."""

from __future__ import annotations

import json

import torch
import transformers as T

from conftest import assert_one_line_error, cli
from tiny_transformers import save_tokenizer, sentences, tiny_model


def test_importance_keeps_the_units_with_the_largest_output_norm(tmp_path):
    model = tiny_model("llama").eval()
    model.save_pretrained(tmp_path / "llama")
    save_tokenizer(tmp_path / "llama")
    texts = sentences(40, seed=3)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    tok = T.AutoTokenizer.from_pretrained(tmp_path / "llama")
    enc = tok(texts, return_tensors="pt", padding=True)
    layers = model.model.layers
    squares = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]

    def hook(k):
        def add(_module, args):
            squares[k] += (args[0].double() ** 2 * enc["attention_mask"][..., None]).sum((0, 1))
        return add

    hooks = [layer.mlp.down_proj.register_forward_pre_hook(hook(k)) for k, layer in enumerate(layers)]
    with torch.no_grad():
        model(**enc)
    for h in hooks:
        h.remove()

    width = layers[0].mlp.down_proj.in_features // 2
    res = cli("compress", tmp_path / "llama", "-o", tmp_path / "small", "--width", f"ffn={width}",
              "--method", "importance", "--data", tmp_path / "d.jsonl", "--samples", "40")
    assert res.exit_code == 0, res.output
    small = T.AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    assert small.config.intermediate_size == width
    for k, (layer, cut) in enumerate(zip(layers, small.model.layers)):
        kept = squares[k].argsort(descending=True)[:width].sort().values
        assert torch.equal(cut.mlp.gate_proj.weight, layer.mlp.gate_proj.weight[kept]), k
        assert torch.equal(cut.mlp.down_proj.weight, layer.mlp.down_proj.weight[:, kept]), k


def test_importance_needs_data_and_a_linear_reader(tmp_path):
    res = cli("compress", "fixtures/digits/mlp_a.safetensors", "-o", tmp_path / "o.safetensors", "--ratio", "0.5",
              "--method", "importance")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "--method importance scores units")
    res = cli("compress", "fixtures/digits/cnn_a.safetensors", "-o", tmp_path / "o.safetensors", "--ratio", "0.5",
              "--method", "importance", "--data", "fixtures/digits/calib.safetensors")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "no linear layer reads space")
    assert not (tmp_path / "o.safetensors").exists()
