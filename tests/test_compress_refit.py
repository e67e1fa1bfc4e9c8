"""`compress --repair` on a Hugging Face model: the layers that read compressed units are refitted by least
squares on --data (otfuse_cli/merging/refit.py).

Oracles share no code with otfuse: transformers' own forward pass (logits of the original model against the
compressed folder loaded with from_pretrained), and numpy's ridge closed form on activations captured here
with torch hooks."""

from __future__ import annotations

import json

import numpy as np
import torch
import transformers as T

from conftest import cli
from otfuse_cli.merging import refit as refit_module
from tiny_transformers import save_tokenizer, sentences, tiny_model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def write_data(path, n=64, seed=0):
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences(n, seed)))
    return path


def token_batch(folder, texts):
    tok = T.AutoTokenizer.from_pretrained(folder)
    return tok(texts, return_tensors="pt", padding=True)


def scaled_copies(tmp_path):
    """A tiny Llama whose FFN units come in pairs: unit j and a copy with its up row times 3 (so its output
    is 3 h_j) and a down column of its own. Pruning by weight norm keeps the copies; the dropped units' part
    of the output is then only reachable through the kept ones, which a refit must find."""
    small = tiny_model("llama")
    config = T.LlamaConfig.from_dict(small.config.to_dict())
    config.intermediate_size *= 2
    wide = T.LlamaForCausalLM(config).eval()
    sd = small.state_dict()
    gen = torch.Generator().manual_seed(5)
    for name, tensor in sd.items():
        if ".mlp." in name:
            if "down_proj" in name:
                tensor = torch.cat([tensor, torch.randn(tensor.shape, generator=gen) * tensor.std()], 1)
            else:
                tensor = torch.cat([tensor, 3 * tensor if "up_proj" in name else tensor], 0)
        sd[name] = tensor
    wide.load_state_dict(sd)
    wide.save_pretrained(tmp_path / "wide")
    save_tokenizer(tmp_path / "wide")
    return wide


def test_refit_recovers_pruned_units_that_kept_ones_span(tmp_path, monkeypatch):
    monkeypatch.setattr(refit_module, "RIDGE", 1e-10)  # exact up to round-off (the default trades that for noise)
    wide = scaled_copies(tmp_path)
    data = write_data(tmp_path / "data.jsonl")
    half = wide.config.intermediate_size // 2
    x = token_batch(tmp_path / "wide", sentences(8, seed=1))
    with torch.no_grad():
        ref = wide(**x).logits
    for flags, name in (([], "pruned"), (["--repair", "--data", data], "refit")):
        res = cli("compress", tmp_path / "wide", "-o", tmp_path / name, "--method", "magnitude", "--width",
                  f"ffn={half}", *flags)
        assert res.exit_code == 0, res.output
    pruned = T.LlamaForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    refit = T.LlamaForCausalLM.from_pretrained(tmp_path / "refit").eval()
    assert refit.config.intermediate_size == half
    with torch.no_grad():
        assert rel_err(ref, pruned(**x).logits) > 0.05  # pruning alone loses the dropped units' share
        assert rel_err(ref, refit(**x).logits) < 1e-5  # the refit puts it back (texts it did not see)


def test_the_first_refit_is_numpys_ridge_solution_and_lowers_its_error(tmp_path):
    """OT compression of a random tiny Llama to 2/3 of its FFN width, with and without --repair. Layer 0's
    FFN input is the same in both models (nothing before it changed), so its refitted down projection must
    be the ridge solution numpy computes from activations captured on the same texts."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "a")
    save_tokenizer(tmp_path / "a")
    data = write_data(tmp_path / "data.jsonl", n=40)
    width = model.config.intermediate_size * 2 // 3
    for flags, name in (([], "plain"), (["--repair", "--data", data, "--samples", "40"], "refit")):
        res = cli("compress", tmp_path / "a", "-o", tmp_path / name, "--width", f"ffn={width}", *flags)
        assert res.exit_code == 0, res.output
    plain = T.LlamaForCausalLM.from_pretrained(tmp_path / "plain").eval()
    refit = T.LlamaForCausalLM.from_pretrained(tmp_path / "refit").eval()
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    x = token_batch(tmp_path / "a", texts)
    captured = {}

    def grab(key):
        def hook(_m, args):
            captured[key] = args[0].detach().double()
        return hook

    handles = [model.model.layers[0].mlp.down_proj.register_forward_pre_hook(grab("h")),
               plain.model.layers[0].mlp.down_proj.register_forward_pre_hook(grab("h_small"))]
    with torch.no_grad():
        model(**x), plain(**x)
    for h in handles:
        h.remove()
    mask = x["attention_mask"].bool()
    h, hs = captured["h"][mask].numpy(), captured["h_small"][mask].numpy()
    y = h @ model.model.layers[0].mlp.down_proj.weight.detach().double().numpy().T
    gram = hs.T @ hs
    ridge = refit_module.RIDGE * np.mean(np.diag(gram))
    expected = np.linalg.solve(gram + ridge * np.eye(len(gram)), hs.T @ y).T
    got = refit.model.layers[0].mlp.down_proj.weight.detach().double().numpy()
    assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()
    # and the refit lowers layer 0's output error on those texts
    err = lambda w: np.linalg.norm(y - hs @ w.T)
    assert err(got) < err(plain.model.layers[0].mlp.down_proj.weight.detach().double().numpy())
