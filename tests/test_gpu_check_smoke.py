"""Smoke mode of benchmarks/gpu_check.py (cpu against cpu: the smallest bundled pair and a tiny Llama pair): every
route that takes --device runs twice and its plans and fused tensors compare equal (the weights route too, exact
and with Sinkhorn), the timing section is filled in — and the comparison can fail: a planted difference in
a plan or a fused tensor is reported as unequal."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu-check")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--json", "--work",
                             str(work)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return json.loads(result.stdout), work


def test_every_check_is_equal(smoke):
    doc, _ = smoke
    assert doc["smoke"] and doc["device"] == "cpu" and doc["all_equal"]
    pairs = {c["pair"] for c in doc["checks"]}
    assert pairs == {"digits CNN (bundled)", "tiny Llama (random)"}
    for pair in pairs:  # plans and fused tensors of every route that takes --device, on every pair
        routes = {(c["route"], c["compares"]) for c in doc["checks"] if c["pair"] == pair}
        assert {("activation alignment", "plans"), ("activation alignment", "fused"), ("RegMean merge", "fused")} <= routes
    for c in doc["checks"]:
        assert c["status"] == "compared" and c["equal"] is True and c["tensors"] > 0, c
        assert c["max_rel_error"] <= c["rtol"] and not c["differing"]
    assert {(w["pair"], w["route"]) for w in doc["weights_route"]} == {
        (p, r) for p in ("digits CNN (bundled)", "tiny Llama (random)") for r in ("weights", "weights, sinkhorn")}
    for w in doc["weights_route"]:  # takes --device: compared like the others
        assert w["status"] == "compared" and w["equal"] is True and w["tensors"] > 0, w
    t = doc["timing"]
    assert t["cpu_floor"]["cpu_s"] > 0 and t["device_gemm"]["products_wall_s"] > 0
    assert t["device_route"]["status"] == "ran"


def test_a_planted_difference_is_unequal(smoke, tmp_path):
    _, work = smoke
    plans = next(work.rglob("cpu/plans.safetensors"))
    fused = [f for f in work.rglob("fused/*.safetensors") if "llama" in str(f)][0].parent
    want = gpu_check.read_tensors(plans)
    assert gpu_check.compare_tensors(gpu_check.read_tensors(plans), want)["equal"]
    # a plan: two entries of an index vector swapped
    name = next(k for k, v in want.items() if not v.is_floating_point() and v.ndim == 1 and v.numel() > 1)
    got = dict(want)
    got[name] = want[name].clone()
    got[name][[0, 1]] = want[name][[1, 0]]
    result = gpu_check.compare_tensors(got, want)
    assert not result["equal"] and result["differing"][0].startswith(name)
    # a fused tensor: one entry moved by 1e-3 of the tensor's largest magnitude (over rtol), written and read back
    ref = gpu_check.read_tensors(fused)
    name = next(k for k, v in ref.items() if v.is_floating_point() and v.numel() > 1)
    x = ref[name].clone()
    x.view(-1)[0] += 1e-3 * float(x.abs().max())
    save_file({**ref, name: x}, str(tmp_path / "perturbed.safetensors"))
    result = gpu_check.compare_tensors(gpu_check.read_tensors(tmp_path / "perturbed.safetensors"), ref)
    assert not result["equal"] and result["max_rel_error"] > gpu_check.RTOL
    assert [d.split(" ")[0] for d in result["differing"]] == [name]
    # within the tolerance: equal; a missing tensor: unequal
    y = ref[name].clone()
    y.view(-1)[0] += 1e-6 * float(y.abs().max())
    assert gpu_check.compare_tensors({**ref, name: y}, ref)["equal"]
    assert not gpu_check.compare_tensors({k: v for k, v in ref.items() if k != name}, ref)["equal"]
    assert not gpu_check.compare_tensors({**ref, name: ref[name].to(torch.float64)}, ref)["equal"]
