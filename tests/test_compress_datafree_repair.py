"""Issue 28, part 1 without data: `compress --repair` with no --data is model folding's data-free variance repair.
Each merged unit's incoming weight rows are scaled to their members' mean norm (the std of w·x on inputs with no
preferred direction), its bias kept (the mean of the members').

Oracles: the closed form written here with numpy on an MLP whose hidden units come in groups of near-copies
(clusters known by construction: group g is units g, g+G, g+2G), the std of the pre-activation measured by
sampling isotropic inputs, and exact copies (an MLP and a Llama FFN), whose compression is exact and which the
repair must leave exact."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, cli
from test_compress import llama_pair, rel_err
from test_compress_repair import COPIES, D, G, grouped_mlp, pre_activation
from tiny_transformers import logits, sample_inputs


def compressed(tmp_path, sd, *flags) -> dict[str, torch.Tensor]:
    src = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(src))
    out = tmp_path / f"c{len(flags)}.safetensors"
    r = cli("compress", src, "-o", out, "--width", f"hidden={G}", *flags)
    assert r.exit_code == 0, r.output
    return load_file(out)


def test_merged_rows_take_their_members_mean_norm_and_keep_the_mean_bias(tmp_path):
    sd = grouped_mlp(noise=0.3)
    plain, fixed = compressed(tmp_path, sd), compressed(tmp_path, sd, "--repair")
    w = sd["0.weight"].double().numpy().reshape(COPIES, G, D)  # [c, g] = unit g + G*c
    mean_row = w.mean(0)
    expected = mean_row * (np.linalg.norm(w, axis=2).mean(0) / np.linalg.norm(mean_row, axis=1))[:, None]
    np.testing.assert_allclose(plain["0.weight"].double().numpy(), mean_row, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fixed["0.weight"].double().numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fixed["0.bias"].numpy(), sd["0.bias"].numpy().reshape(COPIES, G).mean(0), rtol=1e-5)
    torch.testing.assert_close(fixed["2.weight"], plain["2.weight"])  # what reads the units: summed, as before
    # on isotropic inputs the repaired unit's spread is its members' average spread; the plain merge's is below
    x = torch.randn(200_000, D, generator=torch.Generator().manual_seed(3))
    target = pre_activation(sd, x).std(0).reshape(COPIES, G).mean(0)
    assert bool((pre_activation(plain, x).std(0) < 0.99 * target).all())
    torch.testing.assert_close(pre_activation(fixed, x).std(0), target, rtol=0.008, atol=0)


def test_exact_copies_stay_exact(tmp_path):
    sd = grouped_mlp(noise=0.0)
    small = compressed(tmp_path, sd, "--repair")
    torch.testing.assert_close(small["0.weight"], sd["0.weight"][:G], rtol=1e-6, atol=1e-6)


def test_llama_ffn_copies_stay_exact_and_heads_are_left_alone(tmp_path):
    model, _, wide = llama_pair(tmp_path, "ffn")
    x = sample_inputs("llama", model)
    r = cli("compress", wide, "-o", tmp_path / "c", "--width", f"ffn={model.config.intermediate_size}", "--repair")
    assert r.exit_code == 0, r.output
    assert rel_err(logits(model, x), logits(type(model).from_pretrained(tmp_path / "c").eval(), x)) < 1e-5
    # KV groups are blocks read through softmax, not rows: the data-free repair does not rescale them
    model.save_pretrained(tmp_path / "a")
    for out, flags in ((tmp_path / "h0", []), (tmp_path / "h1", ["--repair"])):
        r = cli("compress", tmp_path / "a", "-o", out, "--width", "heads=1", *flags)
        assert r.exit_code == 0, r.output
    a, b = (load_file(p / "model.safetensors") for p in (tmp_path / "h0", tmp_path / "h1"))
    assert all(torch.equal(a[k], b[k]) for k in a if "self_attn" in k)


def test_without_data_only_merged_units_can_be_repaired(tmp_path):
    sd = grouped_mlp(noise=0.1)
    save_file(sd, str(tmp_path / "m.safetensors"))
    r = cli("compress", tmp_path / "m.safetensors", "-o", tmp_path / "out.safetensors", "--ratio", "0.5",
            "--method", "magnitude", "--repair")
    assert r.exit_code == 2, r.output
    assert_one_line_error(r.stderr, "corrects merged units (--method ot)", "--method magnitude")
    assert not (tmp_path / "out.safetensors").exists()
