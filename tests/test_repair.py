"""--repair: REPAIR of fused MLP units; BatchNorm statistics of a fused CNN re-estimated on sample inputs."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, cli
from models import cnn
from otfuse_cli.checkpoint import open_checkpoint
from otfuse_cli.evaluation import evaluate_models
from otfuse_cli import AlignOptions, DataOptions, fuse
from otfuse_cli.runnable import load_runnable

DIGITS = Path(__file__).resolve().parents[1] / "fixtures" / "digits"


def test_repaired_statistics_equal_a_direct_computation(tmp_path):
    a, b = cnn(seed=0), cnn(seed=1)
    for i, net in enumerate((a, b)):
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / f"{i}.safetensors")
    x = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # one batch
    save_file({"x": x}, tmp_path / "x.safetensors")
    fuse([str(tmp_path / "0.safetensors"), str(tmp_path / "1.safetensors")], str(tmp_path / "f.safetensors"),
                     repair=True, data=DataOptions(data=str(tmp_path / "x.safetensors")))
    fused = cnn()
    fused.load_state_dict(load_file(tmp_path / "f.safetensors"))
    fused.eval()
    with torch.no_grad():  # the first BatchNorm sees conv 0's output; the second sees conv 4's, computed as
        h0 = fused[0](x)  # during the repair pass: the first BatchNorm normalising with batch statistics
        bn1 = torch.nn.functional.batch_norm(h0, None, None, fused[1].weight, fused[1].bias, training=True)
        h4 = fused[4](fused[3](fused[2](bn1)))
    for bn, h in ((fused[1], h0), (fused[5], h4)):
        assert torch.allclose(bn.running_mean, h.mean((0, 2, 3)), atol=1e-5)
        assert torch.allclose(bn.running_var, h.var((0, 2, 3), unbiased=True), atol=1e-5)


def test_repair_improves_the_fused_digit_cnn(tmp_path):
    a, b = str(DIGITS / "cnn_a.safetensors"), str(DIGITS / "cnn_b.safetensors")
    calib = str(DIGITS / "calib.safetensors")
    outs = {"average": dict(options=AlignOptions(align="none")), "ot": {}, "ot_repaired": dict(repair=True, data=DataOptions(data=calib))}
    for name, kw in outs.items():
        fuse([a, b], str(tmp_path / f"{name}.safetensors"), **kw)
    models = [(n, load_runnable(open_checkpoint(p))) for n, p in [("a", a), ("b", b)]]
    models += [(n, load_runnable(open_checkpoint(tmp_path / f"{n}.safetensors"))) for n in outs]
    rows = {r["model"]: r for r in evaluate_models(models, str(DIGITS / "test.safetensors"))["rows"]}
    print({n: round(100 * r["accuracy"], 1) for n, r in rows.items()})
    # measured: parents 96.9 / 96.2, average 24.5, OT 91.5, OT + repair 92.6 (ECE 0.096 -> 0.021)
    assert rows["ot"]["accuracy"] > rows["average"]["accuracy"] + 0.5
    assert rows["ot_repaired"]["accuracy"] >= rows["ot"]["accuracy"] + 0.005
    assert rows["ot_repaired"]["ece"] < rows["ot"]["ece"] / 2


def test_repair_needs_data(tmp_path):
    a, b = DIGITS / "cnn_a.safetensors", DIGITS / "cnn_b.safetensors"
    for flag in ("--repair", "--repair-bn"):  # --repair-bn: the old name, an alias
        result = cli("fuse", a, b, "-o", tmp_path / "o.safetensors", flag)
        assert result.exit_code == 2
        assert_one_line_error(result.stderr, "--data")
        assert not (tmp_path / "o.safetensors").exists()


def test_repair_sets_every_unit_to_its_aligned_parents_statistics(tmp_path):
    """REPAIR on an MLP fused with an oracle-permuted copy of another: after repair, every hidden unit's
    pre-activation mean/std on the data equals the average of the two parents' matching units (measured
    here with a hand-written forward; B's units are matched through the known permutation)."""
    from models import mlp
    from oracle_permute import permute_chain

    nets = [mlp((20, 16, 12, 5), seed=s) for s in (0, 1)]
    sd_a = {k: v.contiguous() for k, v in nets[0].state_dict().items()}
    sd_b = {k: v.contiguous() for k, v in nets[1].state_dict().items()}
    save_file(sd_a, tmp_path / "a.safetensors")
    save_file(permute_chain(sd_b, torch.Generator().manual_seed(3), [("0", []), ("2", []), ("4", [])]),
              tmp_path / "bp.safetensors")
    x = torch.randn(200, 20, generator=torch.Generator().manual_seed(0))
    save_file({"x": x}, tmp_path / "x.safetensors")
    data = DataOptions(data=str(tmp_path / "x.safetensors"), samples=200)
    # the plan from aligning A with P(B) is the hidden permutation composed with A~B's own plan; the same plan
    # is found aligning A with B itself, so targets are taken from B through that direct fusion's basis
    fuse([str(tmp_path / "a.safetensors"), str(tmp_path / "bp.safetensors")], str(tmp_path / "r.safetensors"),
         repair=True, data=data)
    save_file(sd_b, tmp_path / "b.safetensors")
    fuse([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")], str(tmp_path / "p.safetensors"),
         options=AlignOptions())  # plain OT fusion of A and B: its basis matches r's

    def pre_activations(sd):
        h, out = x.double(), []
        for i, p in enumerate(("0", "2", "4")):
            h = h @ sd[f"{p}.weight"].double().T + sd[f"{p}.bias"].double()
            out.append(h)
            h = torch.relu(h)
        return out[:2]  # hidden layers only: class outputs are not repaired

    from otfuse_cli import align
    align([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")], str(tmp_path / "plan.safetensors"))
    from otfuse_cli import load_plans
    plans = load_plans(tmp_path / "plan.safetensors")[0][1]
    repaired = pre_activations(load_file(tmp_path / "r.safetensors"))
    for layer, (ha, hb, hr) in enumerate(zip(pre_activations(sd_a), pre_activations(sd_b), repaired)):
        src = plans[("0", "2")[layer]].hard_index()  # anchor unit u <- B's unit src[u]
        target_mean = (ha.mean(0) + hb.mean(0)[src]) / 2
        target_std = (ha.std(0, unbiased=False) + hb.std(0, unbiased=False)[src]) / 2
        assert torch.allclose(hr.mean(0), target_mean, atol=1e-4), layer
        assert torch.allclose(hr.std(0, unbiased=False), target_std, atol=1e-4), layer
    assert not torch.allclose(pre_activations(load_file(tmp_path / "p.safetensors"))[0].std(0), repaired[0].std(0))


def test_repair_refuses_transformers(tmp_path):
    from tiny_transformers import tiny_model

    for name in ("a", "b"):
        tiny_model("bert_cls").save_pretrained(tmp_path / name)
    (tmp_path / "d.jsonl").write_text('{"text": "a b"}\n')
    res = cli("fuse", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "f", "--repair", "--data", tmp_path / "d.jsonl")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "--repair applies to MLPs and CNNs")
