"""Issue 33, part 3: --align cca, linear maps from canonical correlations (CCA Merge, Horoi et al. 2024).

Oracles independent of otfuse's code: the paper's closed form written here in numpy/scipy (covariances by
np.cov, matrix roots by scipy.linalg.sqrtm, not an eigendecomposition), sklearn's CCA for the leading
canonical correlation, and a plain torch forward of an MLP and of its copy with hidden units permuted and
positively rescaled (a function-preserving change no permutation matcher can undo, but a linear map can)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import load_file, save_file

from conftest import cli
from otfuse_cli.alignment.cost import FeaturePair
from otfuse_cli.alignment.linear import canonical_map, covariances
from otfuse_cli.arch.model import Entry

WIDTHS = (24, 32, 32, 6)


def numpy_cca_map(xp: np.ndarray, xa: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """(T, canonical correlations) from rows (samples x units), the paper's closed form."""
    n = xp.shape[1]
    c = np.cov(np.hstack([xp, xa]).T)
    c_pp, c_aa, c_ap = c[:n, :n], c[n:, n:], c[n:, :n]
    c_pp = c_pp + ridge * np.trace(c_pp) / n * np.eye(n)
    c_aa = c_aa + ridge * np.trace(c_aa) / n * np.eye(n)
    root_a, root_p = scipy.linalg.sqrtm(c_aa).real, scipy.linalg.sqrtm(c_pp).real
    u, s, vt = np.linalg.svd(np.linalg.solve(root_a, c_ap) @ np.linalg.inv(root_p))
    return root_a @ u @ vt @ np.linalg.inv(root_p), s


def correlated_rows(rows: int = 400, width: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(rows, width))
    xa = latent @ rng.normal(size=(width, width)) + 0.3 * rng.normal(size=(rows, width)) + 2.0
    xp = latent @ rng.normal(size=(width, width)) + 0.3 * rng.normal(size=(rows, width)) - 1.0
    return xp, xa


@pytest.mark.parametrize("ridge", [0.0, 0.1])
def test_streamed_map_equals_the_closed_form(ridge):
    xp, xa = correlated_rows()
    pair, entry = FeaturePair(covariance=True, l1=False), Entry("layer.weight", 0, "out")
    for start in range(0, len(xp), 150):  # batch by batch, as activations arrive
        chunk = slice(start, start + 150)
        pair.add(entry, torch.from_numpy(xp[chunk].T.copy())[:, None, None, :], entry,
                 torch.from_numpy(xa[chunk].T.copy())[:, None, None, :])
    t, t_inv, stats = canonical_map(*covariances(pair), ridge)
    oracle, corr = numpy_cca_map(xp, xa, ridge)
    np.testing.assert_allclose(t.numpy(), oracle, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(t.numpy() @ t_inv.numpy(), np.eye(len(t)), atol=1e-9)
    assert stats["correlation"] == pytest.approx(corr.mean(), rel=1e-9)


def test_leading_canonical_correlation_agrees_with_sklearn():
    from sklearn.cross_decomposition import CCA

    xp, xa = correlated_rows(rows=2000, width=6, seed=1)
    pair, entry = FeaturePair(covariance=True, l1=False), Entry("layer.weight", 0, "out")
    pair.add(entry, torch.from_numpy(xp.T.copy())[:, None, None, :], entry, torch.from_numpy(xa.T.copy())[:, None, None, :])
    stats = canonical_map(*covariances(pair), 0.0)[2]
    u, v = CCA(n_components=1, scale=False, max_iter=5000, tol=1e-12).fit(xp, xa).transform(xp, xa)
    leading = abs(np.corrcoef(u[:, 0], v[:, 0])[0, 1])
    assert stats["correlation_min"] <= stats["correlation"] <= leading <= 1.0
    # the leading singular value of the whitened cross-covariance is the top canonical correlation
    c_pp, c_aa, c_pa = (m.numpy() for m in covariances(pair))
    top = np.linalg.svd(np.linalg.solve(scipy.linalg.sqrtm(c_aa).real, c_pa.T)
                        @ np.linalg.inv(scipy.linalg.sqrtm(c_pp).real), compute_uv=False)[0]
    assert leading == pytest.approx(top, abs=1e-4)


# ------------------------------------------------------------------ end to end, through the CLI

def make_mlp(seed: int) -> dict[str, torch.Tensor]:
    """Random MLP whose hidden units are alive on the sample inputs (positive biases)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, (d_in, d_out) in enumerate(zip(WIDTHS, WIDTHS[1:])):
        sd[f"{2 * k}.weight"] = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
        sd[f"{2 * k}.bias"] = torch.rand(d_out, generator=g) * 0.5 + 0.5 * (k < 2)
    return sd


def forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ sd["0.weight"].T + sd["0.bias"])
    h = torch.relu(h @ sd["2.weight"].T + sd["2.bias"])
    return h @ sd["4.weight"].T + sd["4.bias"]


def permuted_and_scaled(sd: dict[str, torch.Tensor], seed: int, scale: bool) -> dict[str, torch.Tensor]:
    """The same function: hidden unit i of each layer becomes unit perm[i], its output multiplied by s_i > 0
    (ReLU commutes with a positive factor) and its readers' weights divided by it."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in sd.items()}
    for layer, reader in (("0", "2"), ("2", "4")):
        n = out[f"{layer}.weight"].shape[0]
        perm = torch.randperm(n, generator=g)
        s = torch.rand(n, generator=g) * 1.5 + 0.5 if scale else torch.ones(n)
        out[f"{layer}.weight"] = (out[f"{layer}.weight"] * s[:, None])[perm]
        out[f"{layer}.bias"] = (out[f"{layer}.bias"] * s)[perm]
        out[f"{reader}.weight"] = (out[f"{reader}.weight"] / s[None, :])[:, perm]
    return out


def save(path, sd) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("scale,ridge", [(False, None), (True, "1e-10")])
def test_a_function_preserving_copy_is_undone(tmp_path, scale, ridge):
    """Permuted copy: exact at the default ridge (a permutation commutes with it). Permuted and rescaled copy:
    exact as the ridge goes to 0 (every weight-matching or activation-matching permutation leaves the scales)."""
    a = make_mlp(0)
    b = permuted_and_scaled(a, 1, scale)
    x = torch.randn(300, WIDTHS[0], generator=torch.Generator().manual_seed(2))
    assert rel(forward(a, x), forward(b, x)) < 1e-5  # the copy computes the same function
    pa, pb, data = save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b), \
        save(tmp_path / "x.safetensors", {"x": x})
    flags = ["--align", "cca", "--data", data, "--samples", "300", *(["--ridge", ridge] if ridge else [])]
    r = cli("fuse", pa, pb, "-o", tmp_path / "f.safetensors", *flags)
    assert r.exit_code == 0, r.output
    fused = load_file(tmp_path / "f.safetensors")
    assert rel(forward(a, x), forward(fused, x)) < 1e-5
    # plans written by `align` and reused by `fuse --plan` give the same model
    r = cli("align", pa, pb, "-o", tmp_path / "plans.safetensors", *flags)
    assert r.exit_code == 0, r.output
    r = cli("fuse", pa, pb, "-o", tmp_path / "g.safetensors", "--plan", tmp_path / "plans.safetensors")
    assert r.exit_code == 0, r.output
    again = load_file(tmp_path / "g.safetensors")
    assert all(torch.equal(fused[k], again[k]) for k in fused)
    if not scale:  # the map itself is the permutation
        maps = load_file(tmp_path / "plans.safetensors")
        t = maps["1/0/map"]
        assert torch.allclose(t.abs().sum(0), torch.ones(WIDTHS[1], dtype=t.dtype), atol=1e-6)
        assert int((t.abs() > 0.5).sum()) == WIDTHS[1]


def test_independent_parents_fuse_and_the_plan_file_is_checked(tmp_path):
    a, b = make_mlp(0), make_mlp(5)
    x = torch.randn(200, WIDTHS[0], generator=torch.Generator().manual_seed(3))
    pa, pb, data = save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b), \
        save(tmp_path / "x.safetensors", {"x": x})
    plans = tmp_path / "plans.safetensors"
    assert cli("align", pa, pb, "-o", plans, "--align", "cca", "--data", data).exit_code == 0
    tensors = load_file(plans)
    tensors["1/0/inverse"] = tensors["1/0/inverse"] * 1.01  # no longer the map's inverse
    bad = save(tmp_path / "bad.safetensors", tensors)
    from safetensors import safe_open

    with safe_open(str(plans), "pt") as f:
        meta = f.metadata()
    save_file({k: v.contiguous() for k, v in tensors.items()}, bad, metadata=meta)
    r = cli("fuse", pa, pb, "-o", tmp_path / "f.safetensors", "--plan", bad)
    assert r.exit_code == 2 and "is not the inverse of" in r.output
    assert not (tmp_path / "f.safetensors").exists()


def test_refusals_and_notes(tmp_path):
    x = torch.randn(64, WIDTHS[0], generator=torch.Generator().manual_seed(0))
    data = save(tmp_path / "x.safetensors", {"x": x})
    # every hidden space normalised unit by unit (BatchNorm): nothing takes a linear map
    g = torch.Generator().manual_seed(0)
    bn = {"0.weight": torch.randn(32, 24, generator=g), "0.bias": torch.zeros(32), "1.weight": torch.ones(32),
          "1.bias": torch.zeros(32), "1.running_mean": torch.zeros(32), "1.running_var": torch.ones(32),
          "3.weight": torch.randn(6, 32, generator=g), "3.bias": torch.zeros(6)}
    pa = save(tmp_path / "bn_a.safetensors", bn)
    pb = save(tmp_path / "bn_b.safetensors", {k: v * 1.1 for k, v in bn.items()})
    r = cli("fuse", pa, pb, "-o", tmp_path / "f.safetensors", "--align", "cca", "--data", data)
    assert r.exit_code == 2 and "no space of this" in r.output and "linear map" in r.output
    assert not (tmp_path / "f.safetensors").exists()
    mlp = save(tmp_path / "m.safetensors", make_mlp(0))
    r = cli("fuse", mlp, mlp, "-o", tmp_path / "f.safetensors", "--ridge", "0.5")  # --align weights
    assert r.exit_code == 2 and "--ridge does not apply" in r.output
    r = cli("compress", mlp, "-o", tmp_path / "c.safetensors", "--ratio", "0.5", "--align", "cca", "--data", data)
    assert r.exit_code == 2 and "--align cca" in r.output
    r = cli("fuse", mlp, mlp, "-o", tmp_path / "f.safetensors", "--align", "cca")
    assert r.exit_code == 2 and "--align cca needs --data" in r.output


def test_spaces_under_a_norm_are_permuted_and_said(tmp_path):
    """The bundled digit CNN: two BatchNorm conv spaces keep permutations, its hidden linear space is mapped."""
    from pathlib import Path

    digits = Path(__file__).resolve().parents[1] / "fixtures" / "digits"
    r = cli("fuse", digits / "cnn_a.safetensors", digits / "cnn_b.safetensors", "-o", tmp_path / "f.safetensors",
            "--align", "cca", "--data", digits / "calib.safetensors", "--samples", "128", "--json")
    assert r.exit_code == 0, r.output
    assert "linear maps for 1 of 3 spaces" in r.stderr
    import json

    doc = json.loads(r.stdout)
    solvers = {row["space"]: row.get("solver") for row in doc["spaces"]}
    assert solvers["9"] == "cca" and solvers["0"] != "cca"


def test_no_barycentric_rounds_by_default():
    """Rounds were chosen on validation for permutations; linear maps take them only when asked."""
    from otfuse_cli.options import AlignOptions

    assert AlignOptions(align="cca").rounds_for(3) == 0
    assert AlignOptions(align="cca", rounds=2).rounds_for(3) == 2
    assert AlignOptions(align="activations").rounds_for(3) == 5
