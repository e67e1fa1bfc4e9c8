"""Marian (MarianMTModel): why its residual stream cannot be aligned, measured, and what otfuse aligns instead.

transformers does not save Marian's sinusoidal position table and rebuilds it at load time in the standard
basis. A residual permutation is a symmetry of the network only if the position table moves with it; after a
save and a load it no longer does. The table's columns are all distinct, so the identity is the only
permutation that leaves it unchanged: no function-preserving residual permutation exists. otfuse's marian
family therefore fixes the residual stream and aligns the heads and FFN neurons (exact recovery of those in
tests/test_oracle.py, families "marian")."""

from __future__ import annotations

import re

import torch
from safetensors import safe_open

from conftest import cli
from tiny_transformers import sample_inputs, save_tokenizer, tiny_model


def residual_permuted(sd: dict, p: torch.Tensor) -> dict:
    """Every tensor's d_model axes permuted by p, written from MarianModel's forward: embeddings and positions
    (columns), q/k/v/fc1 and lm_head read the stream (columns), out_proj/fc2 write it (rows and bias), and the
    LayerNorms act per channel."""
    out = {}
    for k, v in sd.items():
        if re.search(r"(shared|embed_tokens|embed_positions|lm_head|(q|k|v)_proj|fc1)\.weight$", k):
            v = v[:, p]
        elif re.search(r"(out_proj|fc2)\.weight$", k):
            v = v[p]
        elif re.search(r"((out_proj|fc2)\.bias|layer_norm\.(weight|bias))$", k):
            v = v[p]
        out[k] = v.clone()
    return out


def test_marian_positions_are_rebuilt_so_no_residual_permutation_survives_a_save(tmp_path):
    model = tiny_model("marian")
    x = sample_inputs("marian", model)
    with torch.no_grad():
        ref = model(**x).logits
    table = model.model.encoder.embed_positions.weight
    assert len({tuple(c.tolist()) for c in table.T}) == table.shape[1]  # distinct columns: only P = I keeps it

    p = torch.randperm(model.config.d_model, generator=torch.Generator().manual_seed(0))
    permuted = type(model)(model.config).eval()
    permuted.load_state_dict(residual_permuted(model.state_dict(), p))
    with torch.no_grad():
        assert torch.allclose(permuted(**x).logits, ref, atol=1e-5)  # in memory, positions moved too: a symmetry

    permuted.save_pretrained(tmp_path / "p")
    with safe_open(str(tmp_path / "p" / "model.safetensors"), "pt") as f:
        assert not any("embed_positions" in k for k in f.keys())  # not saved
    reloaded = type(model).from_pretrained(tmp_path / "p").eval()
    assert torch.equal(reloaded.model.encoder.embed_positions.weight, table)  # rebuilt, standard basis
    with torch.no_grad():
        err = float((reloaded(**x).logits - ref).norm() / ref.norm())
    assert err > 0.05  # the permutation no longer preserves the function


def test_marian_fuse_says_the_residual_stream_is_fixed_and_writes_a_loadable_model(tmp_path):
    for name, seed in (("a", 0), ("b", 1)):
        tiny_model("marian", seed=seed).save_pretrained(tmp_path / name)
        save_tokenizer(tmp_path / name)
    r = cli("inspect", str(tmp_path / "a"), "--spaces", "--json")
    assert r.exit_code == 0, r.stderr
    import json

    kinds = {s["kind"] for s in json.loads(r.stdout)["models"][0]["spaces"]}
    assert kinds == {"heads", "ffn"}  # 2 + 2 layers: self-attention, cross-attention and FFN spaces, no residual
    r = cli("fuse", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "f"))
    assert r.exit_code == 0, r.stderr
    assert "residual stream" in r.stderr and "marian" in r.stderr
    from transformers import MarianMTModel

    fused = MarianMTModel.from_pretrained(tmp_path / "f").eval()
    x = sample_inputs("marian", fused)
    with torch.no_grad():
        assert torch.isfinite(fused(**x).logits).all()
