"""Issue 29, part 1: the weights route takes --device (features, cross terms, costs and Sinkhorn on it; the
exact assignments on the CPU). Without a GPU the suite checks the CPU side of that one code path: a torch
cost and a numpy cost give the same plans, and `--device cpu` gives the same models as the default (the torch
Sinkhorn kernel against POT's converged plans, an oracle sharing no code with otfuse: test_sinkhorn_speed.py).
benchmarks/gpu_check.py compares the route on cuda against cpu when a GPU is lent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import REPO, cli
from otfuse_cli.alignment.solvers import solve

DIGITS = REPO / "fixtures" / "digits"


def layer_cost() -> np.ndarray:
    a, b = load_file(DIGITS / "mlp_a.safetensors"), load_file(DIGITS / "mlp_b.safetensors")
    fa, fb = (np.concatenate([sd["0.weight"], sd["0.bias"][:, None]], 1).astype(np.float64)[:96] for sd in (a, b))
    cost = ((fb[:, None, :] - fa[None, :, :]) ** 2).sum(-1)
    return cost / cost.mean()


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_a_torch_cost_and_a_numpy_cost_give_the_same_plan(solver):
    cost = layer_cost()
    a = np.full(len(cost), 1 / len(cost))
    from_numpy, info_n = solve(cost, a, a, solver, reg=0.02)
    from_torch, info_t = solve(torch.from_numpy(cost), a, a, solver, reg=0.02)
    assert isinstance(from_torch, np.ndarray) and np.array_equal(from_numpy, from_torch) and info_n == info_t
    # (the torch kernel against POT's converged plan: tests/test_sinkhorn_speed.py)


def test_a_non_finite_torch_cost_is_refused_in_one_line():
    from otfuse_cli.errors import OtfuseError

    cost = torch.ones(3, 3, dtype=torch.float64)
    cost[1, 2] = float("nan")
    with pytest.raises(OtfuseError, match="NaN or Inf"):
        solve(cost, np.full(3, 1 / 3), np.full(3, 1 / 3), "sinkhorn")


@pytest.mark.parametrize("flags", [[], ["--solver", "sinkhorn", "--reg", "0.05"], ["--sketch", "64"], ["--align", "none"]])
def test_device_cpu_gives_the_defaults_model(tmp_path, flags):
    pair = [DIGITS / "cnn_a.safetensors", DIGITS / "cnn_b.safetensors"]
    outs = []
    for name, extra in (("default", []), ("cpu", ["--device", "cpu"])):
        res = cli("fuse", *pair, "-o", tmp_path / f"{name}.safetensors", *flags, *extra)
        assert res.exit_code == 0, res.output
        outs.append(load_file(tmp_path / f"{name}.safetensors"))
    assert outs[0].keys() == outs[1].keys()
    assert all(np.array_equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_align_takes_device_for_weights_only(tmp_path):
    pair = [DIGITS / "mlp_a.safetensors", DIGITS / "mlp_b.safetensors"]
    ok = cli("align", *pair, "-o", tmp_path / "p.safetensors", "--device", "cpu")
    assert ok.exit_code == 0, ok.output
    refused = cli("align", *pair, "-o", tmp_path / "q.safetensors", "--align", "none", "--device", "cpu")
    assert refused.exit_code == 2 and "--device" in refused.stderr
