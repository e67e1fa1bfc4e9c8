"""Bare nets (no config.json) are one family declaration: what fuses also evaluates, aligns by activations
and repairs. The oracles are hand-written torch modules with the same tensor names."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import assert_one_line_error, cli
from models import randomize_bn
from otfuse_cli import AlignOptions, DataOptions, fuse
from otfuse_cli.arch import build_spec
from otfuse_cli.checkpoint import open_checkpoint
from otfuse_cli.runnable import load_runnable, runnable_from_state_dict
from permute import permuted_state_dict

META = {"format": "pt", "otfuse.input_shape": "1,8,8"}


class VGG(nn.Module):
    """torchvision VGG naming: `classifier.*` sorts before `features.*` but runs after it."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(8 * 2 * 2, 10), nn.ReLU(), nn.Linear(10, 3))
        randomize_bn(self)
        self.eval()

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def layernorm_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.LayerNorm(16), nn.ReLU(),
                        nn.Linear(16, 3))
    with torch.no_grad():  # non-trivial gains and shifts, so a norm that did not move would show
        for m in (net[1], net[4]):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
    return net.eval()


def save(net_or_sd, path, meta=None):
    sd = net_or_sd.state_dict() if isinstance(net_or_sd, nn.Module) else net_or_sd
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    return str(path)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def permuted_copy(src: str, dst, meta=None) -> str:
    """The same function with every neuron space shuffled (what fusion must undo)."""
    ckpt = open_checkpoint(src)
    return save(permuted_state_dict(ckpt.state_dict(), build_spec(ckpt), seed=3), dst, meta)


def run(net: nn.Module, path) -> torch.Tensor:
    net.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        return net.eval()(images(16, seed=9))


@pytest.fixture()
def vgg_files(tmp_path):
    a = save(VGG(0), tmp_path / "a.safetensors", META)
    b = save(VGG(1), tmp_path / "b.safetensors", META)
    x = save({"x": images(32)}, tmp_path / "x.safetensors")
    return a, b, x


def test_vgg_rebuild_matches_the_module(tmp_path, vgg_files):
    ref, ckpt = VGG(0), open_checkpoint(vgg_files[0])
    assert [s.name for s in build_spec(ckpt).spaces] == ["features.0", "features.4", "classifier.0"]
    x = images(5)
    with torch.no_grad():
        want = ref(x)
    for r in (load_runnable(ckpt), runnable_from_state_dict(ckpt.state_dict(), ckpt)):
        assert r.kind == "cnn" and r.num_labels == 3
        assert torch.equal(r.predict_logits(x), want)
        assert torch.equal(r.predict_logits(x.flatten(1)), want)  # unflattened through otfuse.input_shape


def test_vgg_evaluate_cli(tmp_path, vgg_files):
    x = images(40, seed=1)
    with torch.no_grad():
        pred = VGG(0)(x).argmax(1)
    y = torch.where(torch.arange(40) < 30, pred, (pred + 1) % 3)  # 75% right by construction
    data = save({"x": x, "y": y}, tmp_path / "data.safetensors")
    result = cli("evaluate", vgg_files[0], "--data", data, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["rows"][0]["accuracy"] == pytest.approx(0.75)


def test_vgg_fuses_by_activations(tmp_path, vgg_files):
    a, _, x = vgg_files
    b = permuted_copy(a, tmp_path / "p.safetensors", META)
    out = tmp_path / "f.safetensors"
    fuse([a, b], str(out), options=AlignOptions(align="activations"), data=DataOptions(data=x, samples=32))
    assert torch.allclose(run(VGG(), out), run(VGG(), a), atol=1e-5)  # the hidden permutation is undone


def test_vgg_repair_bn_changes_running_stats(tmp_path, vgg_files):
    a, b, x = vgg_files
    fuse([a, b], str(tmp_path / "plain.safetensors"))
    fuse([a, b], str(tmp_path / "repaired.safetensors"), repair=True, data=DataOptions(data=x))
    plain, repaired = load_file(tmp_path / "plain.safetensors"), load_file(tmp_path / "repaired.safetensors")
    for name in plain:
        stat = name.endswith(("running_mean", "running_var"))
        assert torch.equal(plain[name], repaired[name]) != stat, name


def test_layernorm_mlp_evaluates_and_fuses(tmp_path):
    ref = layernorm_mlp()
    a = save(ref, tmp_path / "a.safetensors")
    spec = build_spec(open_checkpoint(a))
    assert {e.tensor for e in spec.space("0").entries} >= {"1.weight", "1.bias"}  # LayerNorm moves with its Linear
    x = torch.randn(7, 12)
    with torch.no_grad():
        assert torch.equal(load_runnable(open_checkpoint(a)).predict_logits(x), ref(x))
    b = permuted_copy(a, tmp_path / "p.safetensors")
    fuse([a, b], str(tmp_path / "f.safetensors"))
    fused = layernorm_mlp(5)
    fused.load_state_dict(load_file(tmp_path / "f.safetensors"))
    with torch.no_grad():
        assert torch.allclose(fused(x), ref(x), atol=1e-5)


def test_bare_bert_asks_for_its_config(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16)
    model = save(BertModel(cfg), tmp_path / "bert.safetensors", {"format": "pt"})
    data = save({"x": torch.randn(4, 16), "y": torch.zeros(4, dtype=torch.long)}, tmp_path / "d.safetensors")
    for args in (["evaluate", model, "--data", data], ["fuse", model, model, "-o", tmp_path / "o.safetensors"],
                 ["inspect", "--spaces", model]):
        result = cli(*args)
        assert result.exit_code == 2, (args, result.stdout)
        assert_one_line_error(result.stderr, "looks like a bert checkpoint without its config.json",
                              "Hugging Face folder")
