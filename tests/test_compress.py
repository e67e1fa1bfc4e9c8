"""otfuse compress: exact merging of duplicated neurons (MLP, CNN with BN, Llama FFN and KV-head groups),
OT clustering against magnitude/random pruning on real data, loadable HF outputs, bad input; and fusion of
parents of different widths into the anchor's widths (rectangular plans)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_one_line_error, cli
from models import cnn, mlp
from tiny_transformers import logits, sample_inputs, tiny_model
from otfuse_cli.align.engine import AlignOptions
from otfuse_cli.align.transport import Transporter
from otfuse_cli.checkpoint import open_checkpoint
from otfuse_cli.compress import compress_checkpoint, keep_plan
from otfuse_cli.fuse import fuse_checkpoints
from otfuse_cli.runnable import load_runnable
from otfuse_cli.spec import build_spec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def duplicate(sd: dict, spec, names, seed: int = 0, shuffle_inner: bool = False) -> dict:
    """Every unit of the named spaces twice, in a shuffled order: "out" slices (incoming weights, biases,
    BN parameters, q/k/v rows of a whole KV group) copied, "in" slices (outgoing columns) copied and halved.
    shuffle_inner: each copy's within-head dims also permuted (V rows with O columns; Q/K stay for RoPE)."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for space in spec.spaces:
        if space.name not in names:
            continue
        n = space.size
        order = torch.randperm(2 * n, generator=gen) % n
        perms = {}
        for ch in space.channels:
            d = next(e.inner for e in space.entries if e.channel == ch)
            perms[ch] = torch.stack([torch.randperm(d, generator=gen) if shuffle_inner and ch not in
                                     space.fixed_inner else torch.arange(d) for _ in range(2 * n)])
        for e in space.entries:
            y = out[e.tensor].movedim(e.axis, -1)
            lead, end = y.shape[:-1], e.start + e.span(n)
            chunk = y[..., e.start:end].reshape(*lead, n, e.rep, e.inner)[..., order, :, :]
            if e.inner > 1:
                chunk = chunk.gather(-1, perms[e.channel][:, None, :].expand(chunk.shape))
            chunk = chunk / 2 if e.role == "in" else chunk
            y = torch.cat([y[..., :e.start], chunk.reshape(*lead, -1), y[..., end:]], -1)
            out[e.tensor] = y.movedim(-1, e.axis).contiguous()
    return out


def bare_pair(tmp_path: Path, kind: str):
    """(original module, original file, doubled file, inputs) for a bare MLP or CNN."""
    net, x = (mlp((20, 16, 12, 5)), torch.randn(9, 20)) if kind == "mlp" else (cnn(), torch.randn(5, 1, 8, 8))
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(sd, tmp_path / "a.safetensors")
    spec = build_spec(open_checkpoint(tmp_path / "a.safetensors"))
    save_file(duplicate(sd, spec, {s.name for s in spec.spaces}), tmp_path / "wide.safetensors")
    return net, tmp_path / "a.safetensors", tmp_path / "wide.safetensors", x


def run_bare(path: Path, x: torch.Tensor) -> torch.Tensor:
    return load_runnable(open_checkpoint(path)).predict_logits(x)


def llama_pair(tmp_path: Path, what: str, name: str = "llama", shuffle_inner: bool = False):
    """(original model, its folder, folder of the model with every FFN unit or KV group duplicated)."""
    model = tiny_model(name)
    model.save_pretrained(tmp_path / "a")
    spec = build_spec(open_checkpoint(tmp_path / "a"))
    config = type(model.config).from_dict(model.config.to_dict())
    if what == "ffn":
        config.intermediate_size *= 2
    else:
        config.head_dim = config.hidden_size // config.num_attention_heads
        config.num_attention_heads *= 2
        config.num_key_value_heads *= 2
    wide = type(model)(config).eval()
    sd = duplicate(model.state_dict(), spec, {s.name for s in spec.spaces if s.kind == what},
                   shuffle_inner=shuffle_inner)
    wide.load_state_dict(sd)
    wide.save_pretrained(tmp_path / "wide")
    return model, tmp_path / "a", tmp_path / "wide"


# ---------------------------------------------------------------- exact merging

@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_duplicated_neurons_merge_exactly(tmp_path, kind):
    net, _, wide, x = bare_pair(tmp_path, kind)
    with torch.no_grad():
        ref = net(x)
    assert rel_err(ref, run_bare(wide, x)) < 1e-5  # duplication itself preserves the function
    result = compress_checkpoint(str(wide), str(tmp_path / "c.safetensors"), ratio=0.5)
    assert rel_err(ref, run_bare(tmp_path / "c.safetensors", x)) < 1e-5
    assert all(r["compressed"] and r["width"][1] * 2 == r["width"][0] for r in result["spaces"])
    assert all(r["distortion"] < 1e-12 for r in result["spaces"])
    assert result["parameters"] == [open_checkpoint(wide).num_parameters(), sum(p.numel() for p in net.state_dict().values() if p.is_floating_point())]


@pytest.mark.parametrize("what,name,shuffle", [("ffn", "llama", False), ("heads", "llama", False),
                                              ("heads", "qwen2", True)])
def test_duplicated_llama_ffn_and_kv_groups_merge_exactly(tmp_path, what, name, shuffle):
    """Heads: whole KV groups merge; with shuffled V/O dims the copies differ as tensors and the within-head
    maps onto the medoid head must undo the shuffle."""
    model, _, wide = llama_pair(tmp_path, what, name, shuffle)
    x = sample_inputs(name, model)
    ref = logits(model, x)
    cls = type(model)
    assert rel_err(ref, logits(cls.from_pretrained(wide).eval(), x)) < 1e-5
    size = model.config.intermediate_size if what == "ffn" else model.config.num_key_value_heads
    compress_checkpoint(str(wide), str(tmp_path / "c"), widths={what: size})
    out = cls.from_pretrained(tmp_path / "c").eval()
    assert rel_err(ref, logits(out, x)) < 1e-5
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    if what == "ffn":
        assert cfg["intermediate_size"] == model.config.intermediate_size
    else:
        assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
            model.config.num_attention_heads, model.config.num_key_value_heads)
        assert cfg["head_dim"] == model.config.hidden_size // model.config.num_attention_heads


def test_pruning_plans_drop_units_without_nan():
    plan = keep_plan(torch.tensor([3, 0]), 5)
    w_in, w_out = plan.weights("in"), plan.weights("out")
    assert torch.isfinite(w_in).all() and torch.isfinite(w_out).all()
    assert w_in.sum(1).tolist() == [1, 0, 0, 1, 0] and w_out.sum(0).tolist() == [1, 1]

