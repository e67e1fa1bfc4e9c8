"""Issue 33, part 6: ties in activation features are broken by the units' weights.

Units that are zero after the ReLU on every sample have identical (all-zero) activation features, so an
activation cost cannot tell them apart; before the fix the assignment matched them arbitrarily and a hidden
permutation of a network with dead units was not recovered. The oracle here is independent of otfuse's Spec
and permutation code: plain torch MLPs (a forward written below), units killed by a very negative bias (with
distinct outgoing weights, so a wrong match changes the fused weights), hidden permutations drawn by numpy,
the plan file read with safetensors, and, for a model without dead units, the plain activation cost computed
here from forward hooks and solved by scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import cli

WIDTHS = (64, 128, 128, 10)
SAMPLES = 256


def make_mlp(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(WIDTHS[0], WIDTHS[1]), nn.ReLU(), nn.Linear(WIDTHS[1], WIDTHS[2]), nn.ReLU(),
                        nn.Linear(WIDTHS[2], WIDTHS[3]))
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def hidden(sd: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first hidden layer after ReLU, second after ReLU, logits): the MLP's forward, written out."""
    h1 = torch.relu(x @ sd["0.weight"].T + sd["0.bias"])
    h2 = torch.relu(h1 @ sd["2.weight"].T + sd["2.bias"])
    return h1, h2, h2 @ sd["4.weight"].T + sd["4.bias"]


def kill(sd: dict[str, torch.Tensor], layer: str, units, same_inputs: bool = False) -> None:
    """Units of a hidden layer ("0" or "2") made zero after the ReLU on every sample: a very negative bias.
    Their outgoing weights stay distinct; same_inputs gives them all one incoming row and bias too, so only
    the outgoing weights tell them apart."""
    units = list(units)
    sd[f"{layer}.bias"][units] = -40.0 - torch.arange(len(units), dtype=torch.float32) * (not same_inputs)
    if same_inputs:
        sd[f"{layer}.weight"][units] = sd[f"{layer}.weight"][units[0]].clone()


def permuted(sd: dict[str, torch.Tensor], perms: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The same function with hidden units reordered: unit i of layer L in the copy is unit perms[L][i]."""
    p0, p2 = (torch.from_numpy(perms[k]) for k in ("0", "2"))
    return {"0.weight": sd["0.weight"][p0], "0.bias": sd["0.bias"][p0],
            "2.weight": sd["2.weight"][p2][:, p0], "2.bias": sd["2.bias"][p2],
            "4.weight": sd["4.weight"][:, p2], "4.bias": sd["4.bias"].clone()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def weight_err(a: dict, b: dict) -> float:
    return float(sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5 / sum(a[k].norm() ** 2 for k in a) ** 0.5)


def save(path, sd) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def align_and_fuse(tmp_path, a: dict, b: dict, x: torch.Tensor) -> tuple[dict[str, np.ndarray], dict]:
    """`otfuse align` and `otfuse fuse` with --align activations --solver exact: the plan's index per space
    (src[v] = the parent unit moved to anchor unit v) and the fused tensors."""
    pa, pb, data = save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b), \
        save(tmp_path / "x.safetensors", {"x": x})
    flags = ["--align", "activations", "--solver", "exact", "--data", data, "--samples", str(SAMPLES)]
    r = cli("align", pa, pb, "-o", tmp_path / "plans.safetensors", *flags)
    assert r.exit_code == 0, r.output
    r = cli("fuse", pa, pb, "-o", tmp_path / "f.safetensors", *flags)
    assert r.exit_code == 0, r.output
    with safe_open(str(tmp_path / "plans.safetensors"), "pt") as f:
        plans = {key.split("/")[1]: f.get_tensor(key).numpy() for key in f.keys()}
    return plans, load_file(tmp_path / "f.safetensors")


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(SAMPLES, WIDTHS[0], generator=torch.Generator().manual_seed(seed))


CASES = {
    # several dead units in the first hidden layer
    "one_layer": [("0", range(3, 60, 7), False)],
    # dead units in both hidden layers
    "two_layers": [("0", [1, 2, 40, 77, 100], False), ("2", [0, 5, 6, 64, 90, 127], False)],
    # the whole first hidden layer dead: the second's activations are constant, so every unit of both ties
    "whole_layer": [("0", range(WIDTHS[1]), False)],
    # dead units alike in their incoming weights and bias: only the outgoing weights tell them apart
    "same_inputs": [("0", [4, 8, 15, 16, 23, 42], True), ("2", [10, 20, 30, 40], True)],
}


@pytest.mark.parametrize("noise", [0.0, 1e-3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_dead_units_are_recovered_by_activations(tmp_path, case, noise):
    a = make_mlp(seed=0)
    for layer, units, same_inputs in CASES[case]:
        kill(a, layer, units, same_inputs)
    x = inputs()
    h1, h2, _ = hidden(a, x)
    dead = {"0": (h1 == 0).all(0), "2": (h2 == 0).all(0)}
    for layer, units, _ in CASES[case]:
        assert bool(dead[layer][list(units)].all())  # really dead on every sample, with distinct outgoing weights
    assert len({tuple(c.tolist()) for c in a["2.weight"].T[dead["0"]]}) == int(dead["0"].sum())
    rng = np.random.default_rng(7)
    perms = {"0": rng.permutation(WIDTHS[1]), "2": rng.permutation(WIDTHS[2])}
    b = permuted(a, perms)
    g = torch.Generator().manual_seed(3)
    b = {k: v + noise * v.std() * torch.randn(v.shape, generator=g) for k, v in b.items()}

    plans, fused = align_and_fuse(tmp_path, a, b, x)

    for layer, perm in perms.items():  # (b) parent unit u is a's unit perm[u]: anchor unit v takes perm⁻¹[v]
        np.testing.assert_array_equal(plans[layer], np.argsort(perm), err_msg=f"space {layer}")
    # (a) the fused model is a's average with the noisy copy put back in order by numpy's inverse: a, up to
    # half the noise; a wrong match of two dead units would move their distinct outgoing weights
    back = permuted(b, {layer: np.argsort(perm) for layer, perm in perms.items()})
    want = {k: (a[k] + back[k]) / 2 for k in a}
    assert weight_err(want, fused) < 1e-6
    assert weight_err(a, fused) <= 0.5 * noise + 1e-6
    x_test = inputs(seed=1)
    assert rel(hidden(want, x_test)[2], hidden(fused, x_test)[2]) < 1e-5


def test_without_dead_units_the_plan_is_the_plain_activation_assignment(tmp_path):
    """Two independently initialised MLPs without dead units: the plan is the assignment of the z-scored
    post-ReLU activations' squared distances (the MLP default), computed here from hooks and solved by scipy."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    x = inputs()
    models = {"a": make_mlp(seed=0), "b": make_mlp(seed=1)}
    z = {}
    for name, sd in models.items():
        net = nn.Sequential(nn.Linear(WIDTHS[0], WIDTHS[1]), nn.ReLU(), nn.Linear(WIDTHS[1], WIDTHS[2]), nn.ReLU(),
                            nn.Linear(WIDTHS[2], WIDTHS[3]))
        net.load_state_dict(sd)
        rows = {}
        hooks = [net[i].register_forward_hook(lambda m, i_, o, i=i: rows.__setitem__(str(i), o.numpy()))
                 for i in (1, 3)]  # the ReLUs' outputs: units after the nonlinearity
        with torch.no_grad():
            net(x)
        for h in hooks:
            h.remove()
        for layer, key in (("0", "1"), ("2", "3")):
            act = rows[key].astype(np.float64)
            assert (act.std(0) > 0).all()  # no dead (or constant) unit: no ties to break
            z[name, layer] = (act - act.mean(0)) / act.std(0, ddof=1)
    plans, _ = align_and_fuse(tmp_path, models["a"], models["b"], x)
    for layer in ("0", "2"):
        cost = cdist(z["b", layer].T, z["a", layer].T, "sqeuclidean")  # parent units x anchor units
        rows, cols = linear_sum_assignment(cost)
        want = np.empty(len(cols), dtype=np.int64)
        want[cols] = rows
        assert not (want == np.arange(len(want))).all()  # a real matching, not the identity
        np.testing.assert_array_equal(plans[layer], want, err_msg=f"space {layer}")


def test_rematching_a_tie_keeps_the_primary_cost():
    """ties.break_ties on random costs with repeated rows and columns: the matching's primary cost is a sum
    of the same numbers as before, the secondary one never rises, and a cost without repeats has no classes."""
    from scipy.optimize import linear_sum_assignment

    from otfuse_cli.alignment.ties import break_ties, tie_classes

    rng = np.random.default_rng(11)
    assert tie_classes(rng.random((50, 50))) == ([], [])
    for trial in range(20):
        cost = rng.random((40, 40))
        cost[rng.choice(40, 6, replace=False)] = cost[0]  # a class of identical rows
        cost[:, rng.choice(40, 5, replace=False)] = cost[:, [1]]  # and of identical columns
        secondary = rng.random((40, 40))
        rows, cols = linear_sum_assignment(cost)
        src = np.empty(40, dtype=np.int64)
        src[cols] = rows
        classes = tie_classes(cost)
        assert classes[0] and classes[1]
        new = break_ties(src, classes, secondary)
        assert sorted(new) == list(range(40))
        v = np.arange(40)
        np.testing.assert_array_equal(np.sort(cost[new, v]), np.sort(cost[src, v]))  # the same numbers summed
        assert secondary[new, v].sum() <= secondary[src, v].sum()
