"""`compress --repair-by statistics` on a Hugging Face model: REPAIR for transformer FFN units. Every merged
unit's output of the projection that produces it gets, on the tokens of --data, the mean and std of its members'
in the original model (merging/repair.py, repair_producers).

Oracle: transformers' own forward pass with torch hooks written here, on a tiny BERT whose FFN units come in pairs
of near-copies (unit j and unit j + I, its incoming weights and bias perturbed; outgoing columns halved), so
the clusters are known by construction; the statistics are taken over every token of every text, one text at
a time (no padding)."""

from __future__ import annotations

import json

import torch
import transformers as T

from conftest import cli
from tiny_transformers import save_tokenizer, sentences, tiny_model


def paired_bert(tmp_path, noise: float):
    small = tiny_model("bert_cls")
    config = T.BertConfig.from_dict(small.config.to_dict())
    width = config.intermediate_size
    config.intermediate_size *= 2
    wide = T.BertForSequenceClassification(config).eval()
    sd = small.state_dict()
    gen = torch.Generator().manual_seed(7)
    for name, tensor in list(sd.items()):
        if ".intermediate.dense." in name:
            sd[name] = torch.cat([tensor, tensor * (1 + noise * torch.randn(tensor.shape, generator=gen))], 0)
        elif ".output.dense.weight" in name and ".attention." not in name:
            sd[name] = torch.cat([tensor / 2, tensor / 2], 1)
    wide.load_state_dict(sd)
    wide.save_pretrained(tmp_path / "wide")
    save_tokenizer(tmp_path / "wide")
    return wide, width


def unit_statistics(model, folder, texts):
    """Per layer: (mean, std) of each unit of intermediate.dense's output over all tokens."""
    tok = T.AutoTokenizer.from_pretrained(folder)
    rows = {i: [] for i in range(len(model.bert.encoder.layer))}
    hooks = [layer.intermediate.dense.register_forward_hook(
        lambda _m, _i, out, i=i: rows[i].append(out[0].detach().double())) for i, layer in
        enumerate(model.bert.encoder.layer)]
    with torch.no_grad():
        for text in texts:
            model(**tok(text, return_tensors="pt"))
    for h in hooks:
        h.remove()
    return {i: (torch.cat(r).mean(0), torch.cat(r).std(0, unbiased=False)) for i, r in rows.items()}


def test_each_merged_unit_gets_its_members_mean_and_std(tmp_path):
    wide, width = paired_bert(tmp_path, noise=0.12)
    texts = sentences(48, 0)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in texts))
    for out, flags in (("plain", []), ("fixed", ["--repair-by", "statistics", "--data", data])):
        r = cli("compress", tmp_path / "wide", "-o", tmp_path / out, "--width", f"ffn={width}", *flags)
        assert r.exit_code == 0, r.output
    members = unit_statistics(wide, tmp_path / "wide", texts)
    plain = unit_statistics(T.BertForSequenceClassification.from_pretrained(tmp_path / "plain").eval(),
                            tmp_path / "wide", texts)
    fixed = unit_statistics(T.BertForSequenceClassification.from_pretrained(tmp_path / "fixed").eval(),
                            tmp_path / "wide", texts)
    # the pairs were merged (the plain merge's first layer outputs their mean)
    torch.testing.assert_close(plain[0][0], (members[0][0][:width] + members[0][0][width:]) / 2, rtol=1e-4,
                               atol=1e-5)
    for i, (mean, std) in members.items():
        target_mean = (mean[:width] + mean[width:]) / 2
        target_std = (std[:width] + std[width:]) / 2
        assert float(plain[i][1].mean()) < float(target_std.mean())  # and the merge lost spread
        torch.testing.assert_close(fixed[i][0], target_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fixed[i][1], target_std, rtol=1e-5, atol=1e-6)


def test_exact_copies_stay_exact(tmp_path):
    wide, width = paired_bert(tmp_path, noise=0.0)
    data = tmp_path / "d.jsonl"
    texts = sentences(16, 1)
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in texts))
    r = cli("compress", tmp_path / "wide", "-o", tmp_path / "c", "--width", f"ffn={width}",
            "--repair-by", "statistics", "--data", data)
    assert r.exit_code == 0, r.output
    small = T.BertForSequenceClassification.from_pretrained(tmp_path / "c").eval()
    tok = T.AutoTokenizer.from_pretrained(tmp_path / "wide")
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = wide(**batch).logits, small(**batch).logits
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5
