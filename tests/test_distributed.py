"""Data-parallel statistics (otfuse_cli/distributed.py): two local processes launched like torchrun (gloo on
CPU) give what one process gives: `stats` Gram and Fisher files equal to float64 rounding, activation plans
identical and fused tensors equal; a rank that fails makes both fail with exit 2, one `error:` line, nothing
written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import cli

ROOT = Path(__file__).resolve().parents[1]
DIGITS, SENTIMENT = ROOT / "fixtures" / "digits", ROOT / "fixtures" / "sentiment"
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")},
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def one(*args: str):
    """One process: the reference, run in this process (the N = 1 case of the same code)."""
    return cli(*args)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "otfuse_cli", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)


def two_ranks(args0: list[str], args1: list[str]) -> list[subprocess.CompletedProcess]:
    """Two processes with the environment torchrun gives its workers (env:// rendezvous), each with its own
    command line, so that each rank's exit code and stderr can be read."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, args in enumerate((args0, args1)):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "otfuse_cli", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def _metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _close(a: dict, b: dict, rtol: float) -> float:
    """The largest difference relative to each tensor's own scale; a and b must hold the same names."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        scale = float(a[k].double().abs().max()) or 1.0
        worst = max(worst, float((a[k].double() - b[k].double()).abs().max()) / scale)
    assert worst <= rtol, worst
    return worst


def test_stats_of_two_ranks_are_those_of_one(tmp_path):
    """Digit MLP (Gram + Fisher, 100 samples: batches of 32, 32 | 32, 4) and BERT (Gram over tokens without
    padding): the summed float64 statistics agree to rounding, the sample count is the whole sample's."""
    for name, model, data, extra in (("mlp", DIGITS / "mlp_a.safetensors", DIGITS / "calib.safetensors",
                                      ["--samples", "100"]),
                                     ("bert", SENTIMENT / "bert_a", SENTIMENT / "calib.jsonl",
                                      ["--samples", "80", "--kind", "gram"])):
        single, double = tmp_path / f"{name}1.safetensors", tmp_path / f"{name}2.safetensors"
        r1 = one("stats", str(model), "--data", str(data), "-o", str(single), *extra)
        args = ["stats", str(model), "--data", str(data), "-o", str(double), "--json", *extra]
        r2 = torchrun(*args) if name == "mlp" else two_ranks(args, args)[0]  # the launcher, or its environment
        assert r1.exit_code == 0, r1.stderr
        assert r2.returncode == 0, r2.stderr
        assert r2.stdout.count('"world_size": 2') == 1  # one JSON document: rank 0's
        summary = json.loads(r2.stdout[r2.stdout.index("{"):r2.stdout.rindex("}") + 1])
        assert summary["world_size"] == 2 and summary["data"]["samples"] == int(extra[1])
        _close(load_file(single), load_file(double), rtol=1e-12)
        a, b = (json.loads(_metadata(p)["otfuse"])["options"] for p in (single, double))
        assert a["counts"] == b["counts"] and (a["world_size"], b["world_size"]) == (1, 2)


def test_activation_alignment_of_two_ranks_is_that_of_one(tmp_path):
    """BERT plans (heads, FFN, residual stream) identical; the fused digit MLP equal to float32 rounding."""
    args = ["fixtures/sentiment/bert_a", "fixtures/sentiment/bert_b", "--align", "activations", "--data",
            "fixtures/sentiment/calib.jsonl", "--samples", "80"]
    assert one("align", *args, "-o", str(tmp_path / "p1.safetensors")).exit_code == 0
    r2 = torchrun("align", *args, "-o", str(tmp_path / "p2.safetensors"))
    assert r2.returncode == 0, r2.stderr
    p1, p2 = load_file(tmp_path / "p1.safetensors"), load_file(tmp_path / "p2.safetensors")
    assert p1.keys() == p2.keys() and all(torch.equal(p1[k], p2[k]) for k in p1)
    data1, data2 = (json.loads(_metadata(tmp_path / p)["otfuse.plans"])["data"] for p in ("p1.safetensors",
                                                                                           "p2.safetensors"))
    assert (data1.pop("world_size"), data2.pop("world_size")) == (1, 2) and data1 == data2

    args = [str(DIGITS / "mlp_a.safetensors"), str(DIGITS / "mlp_b.safetensors"), "--align", "activations",
            "--data", str(DIGITS / "calib.safetensors"), "--samples", "100"]
    assert one("fuse", *args, "-o", str(tmp_path / "f1.safetensors")).exit_code == 0
    r2 = two_ranks(*[["fuse", *args, "-o", str(tmp_path / "f2.safetensors")]] * 2)
    assert [r.returncode for r in r2] == [0, 0], r2[0].stderr
    _close(load_file(tmp_path / "f1.safetensors"), load_file(tmp_path / "f2.safetensors"), rtol=1e-6)


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failing_rank_fails_every_rank(tmp_path, failing):
    """Only one rank sees a broken data file (a real fault, not a test hook): both exit 2, one `error:` line
    (rank 0's, naming the failed rank's problem), no output written."""
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    out = tmp_path / "s.safetensors"

    def args(data):
        return ["stats", str(SENTIMENT / "bert_a"), "--data", str(data), "-o", str(out), "--kind", "gram",
                "--samples", "64"]
    good = SENTIMENT / "calib.jsonl"
    runs = two_ranks(args(bad if failing == 0 else good), args(bad if failing == 1 else good))
    assert [r.returncode for r in runs] == [2, 2], [r.stderr for r in runs]
    lines = [line for r in runs for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and runs[0].stderr.startswith("error:"), [r.stderr for r in runs]
    assert "broken.jsonl" in lines[0]
    assert not runs[1].stdout and not runs[1].stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]
