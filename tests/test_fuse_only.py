"""`fuse --only GLOB`: only the matching tensors are merged, every other is the anchor's own, in one basis.

Oracle: one-hidden-layer MLPs written and permuted with numpy (no otfuse code), their forward written out; a
parent is a noisy copy of a common network behind a hidden permutation, so the expected fused function has a
closed form: the merged layer is the mean of the un-permuted copies', the other layer the anchor's own."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conftest import assert_one_line_error, cli, cli_subprocess

D, H, C = 10, 24, 3
META = {"otfuse.arch": "mlp", "otfuse.activation": "relu", "otfuse.input_shape": str(D)}


def forward(sd, x):
    return np.maximum(x @ sd["0.weight"].T + sd["0.bias"], 0) @ sd["2.weight"].T + sd["2.bias"]


@pytest.fixture
def copies(tmp_path):
    rng = np.random.default_rng(11)
    base = {"0.weight": rng.normal(size=(H, D)), "0.bias": rng.normal(size=H), "2.weight": rng.normal(size=(C, H)),
            "2.bias": rng.normal(size=C)}
    plain = [{k: (v + 0.05 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()} for _ in range(3)]
    paths = []
    for k, sd in enumerate(plain):
        perm = rng.permutation(H)
        hidden = {"0.weight": sd["0.weight"][perm], "0.bias": sd["0.bias"][perm],
                  "2.weight": np.ascontiguousarray(sd["2.weight"][:, perm]), "2.bias": sd["2.bias"]}
        save_file(hidden, tmp_path / f"m{k}.safetensors", metadata=META)
        paths.append(tmp_path / f"m{k}.safetensors")
    return plain, paths, rng.normal(size=(32, D)), tmp_path


@pytest.mark.parametrize("rounds", ["0", "3"])
def test_only_merges_the_matching_tensors(copies, rounds):
    plain, paths, x, tmp = copies
    out = tmp / f"only{rounds}.safetensors"
    result = cli("fuse", *paths, "-o", out, "--only", "0.*", "--rounds", rounds)
    assert result.exit_code == 0, result.output
    expected = {"0.weight": np.mean([p["0.weight"] for p in plain], 0),
                "0.bias": np.mean([p["0.bias"] for p in plain], 0), "2.weight": plain[0]["2.weight"],
                "2.bias": plain[0]["2.bias"]}
    np.testing.assert_allclose(forward(load_file(out), x), forward(expected, x), rtol=1e-4, atol=1e-4)
    if rounds == "0":  # the anchor's own tensors are copied, bit for bit
        fused, anchor = load_file(out), load_file(paths[0])
        assert all(np.array_equal(fused[k], anchor[k]) for k in ("2.weight", "2.bias"))
    with safe_open(str(out), "np") as f:  # provenance says what was merged
        assert json.loads(f.metadata()["otfuse"])["options"]["only"] == ["0.*"]


def test_only_with_a_pattern_that_matches_nothing_is_refused_before_work(copies):
    _, paths, _, tmp = copies
    out = tmp / "none.safetensors"
    result = cli_subprocess("fuse", *paths, "-o", out, "--only", "model.encoder.*")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--only 'model.encoder.*' matches no tensor")
    assert not out.exists()
