"""--repair-bn: BatchNorm statistics of a fused CNN re-estimated on sample inputs."""

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
                     repair_bn=True, data=DataOptions(data=str(tmp_path / "x.safetensors")))
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
    outs = {"average": dict(options=AlignOptions(align="none")), "ot": {}, "ot_repaired": dict(repair_bn=True, data=DataOptions(data=calib))}
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


def test_repair_needs_data_and_batchnorm(tmp_path):
    a, b = DIGITS / "cnn_a.safetensors", DIGITS / "cnn_b.safetensors"
    result = cli("fuse", a, b, "-o", tmp_path / "o.safetensors", "--repair-bn")
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "--data")
    result = cli("fuse", DIGITS / "mlp_a.safetensors", DIGITS / "mlp_b.safetensors", "-o", tmp_path / "o.safetensors",
                 "--repair-bn", "--data", DIGITS / "calib.safetensors")
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "BatchNorm")
    assert not (tmp_path / "o.safetensors").exists()
