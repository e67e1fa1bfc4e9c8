"""Weight matching reads a BatchNorm channel's parameters, not its running statistics (measured choice:
benchmarks/bn_features.py). Oracle: a hidden permutation applied by hand in numpy to the tensors' axes as the
network's forward pass uses them, and the statistics' average computed here from that permutation."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import otfuse_cli as otf
from tests.models import cnn

META = {"format": "pt", "otfuse.arch": "cnn", "otfuse.activation": "relu", "otfuse.input_shape": "1,8,8"}


def permuted(sd: dict, p0: np.ndarray, p1: np.ndarray) -> dict:
    """The same network with conv 0's channels in order p0 and conv 4's in order p1 (numpy indexing)."""
    out = {k: v.numpy().copy() for k, v in sd.items()}
    for conv, bn, perm in (("0", "1", p0), ("4", "5", p1)):
        out[f"{conv}.weight"] = out[f"{conv}.weight"][perm]
        out[f"{conv}.bias"] = out[f"{conv}.bias"][perm]
        for name in ("weight", "bias", "running_mean", "running_var"):
            out[f"{bn}.{name}"] = out[f"{bn}.{name}"][perm]
    out["4.weight"] = out["4.weight"][:, p0]
    # the linear layer reads conv 4's channels as 8 channels x 2 x 2 positions, channel-major
    lin = out["9.weight"].reshape(10, 8, 4)[:, p1].reshape(10, 32)
    out["9.weight"] = lin
    return {k: torch.from_numpy(v.copy(order="C")) for k, v in out.items()}


def test_running_statistics_that_disagree_do_not_move_the_plan(tmp_path):
    a = {k: v.detach().clone().contiguous() for k, v in cnn(seed=3).state_dict().items()}
    rng = np.random.default_rng(11)
    p0, p1 = rng.permutation(6), rng.permutation(8)
    b = permuted(a, p0, p1)
    # parent B's statistics as another dataset would leave them: far from A's, in no channel order of A's
    for bn, width in (("1", 6), ("5", 8)):
        b[f"{bn}.running_mean"] = torch.from_numpy(rng.normal(0, 50, width).astype(np.float32))
        b[f"{bn}.running_var"] = torch.from_numpy(rng.uniform(1, 400, width).astype(np.float32))
    save_file(a, tmp_path / "a.safetensors", metadata=META)
    save_file(b, tmp_path / "b.safetensors", metadata=META)
    otf.fuse([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")], str(tmp_path / "f.safetensors"))
    fused = load_file(tmp_path / "f.safetensors")
    for name in ("0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "5.weight", "9.weight", "11.weight"):
        np.testing.assert_allclose(fused[name].numpy(), a[name].numpy(), rtol=0, atol=1e-6, err_msg=name)
    # the statistics travel with their channels and are averaged
    inv0, inv1 = np.argsort(p0), np.argsort(p1)
    for bn, inv in (("1", inv0), ("5", inv1)):
        for stat in ("running_mean", "running_var"):
            expected = (a[f"{bn}.{stat}"].numpy() + b[f"{bn}.{stat}"].numpy()[inv]) / 2
            np.testing.assert_allclose(fused[f"{bn}.{stat}"].numpy(), expected, rtol=1e-6, atol=1e-5)
