"""benchmarks/compress_classifier.py's baselines, checked against transformers' own BERT forward pass: keeping
every unit (in any order) leaves the logits as they were, dropping units whose output column is zero changes
nothing, and model folding of a BERT whose FFN units come in identical pairs (each writing half of the pair's
output) gives the logits back at half the width."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("compress_classifier", ROOT / "benchmarks" / "compress_classifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_bert(folder: Path, ffn: int = 24):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=ffn, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    return model


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    with torch.no_grad():
        return AutoModelForSequenceClassification.from_pretrained(folder).eval()(input_ids=ids).logits


def test_pruning_and_folding_keep_the_function_where_they_should(tmp_path):
    bench = load_benchmark()
    model = tiny_bert(tmp_path / "src")
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))
    ref = logits(tmp_path / "src", ids)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(2))
    bench.pruned(tmp_path / "src", [order, order], tmp_path / "all")
    torch.testing.assert_close(logits(tmp_path / "all", ids), ref, rtol=1e-5, atol=1e-6)

    dead = torch.arange(0, 24, 3)
    for layer in model.bert.encoder.layer:
        layer.output.dense.weight.data[:, dead] = 0.0
    model.save_pretrained(tmp_path / "dead")
    ref = logits(tmp_path / "dead", ids)
    alive = torch.tensor([u for u in range(24) if u % 3])
    bench.pruned(tmp_path / "dead", [alive, alive], tmp_path / "cut")
    torch.testing.assert_close(logits(tmp_path / "cut", ids), ref, rtol=1e-5, atol=1e-6)

    model = tiny_bert(tmp_path / "base", ffn=12)
    ref = logits(tmp_path / "base", ids)
    for layer in model.bert.encoder.layer:
        inter, out = layer.intermediate.dense, layer.output.dense
        doubled_in = torch.nn.Linear(16, 24)
        doubled_in.weight.data = torch.cat([inter.weight.data, inter.weight.data])
        doubled_in.bias.data = torch.cat([inter.bias.data, inter.bias.data])
        layer.intermediate.dense = doubled_in
        doubled_out = torch.nn.Linear(24, 16)
        doubled_out.weight.data = torch.cat([out.weight.data / 2, out.weight.data / 2], 1)
        doubled_out.bias.data = out.bias.data.clone()
        layer.output.dense = doubled_out
    model.config.intermediate_size = 24
    model.save_pretrained(tmp_path / "doubled")
    torch.testing.assert_close(logits(tmp_path / "doubled", ids), ref, rtol=1e-5, atol=1e-6)
    bench.folded(tmp_path / "doubled", 12, tmp_path / "folded")
    torch.testing.assert_close(logits(tmp_path / "folded", ids), ref, rtol=1e-4, atol=1e-5)
