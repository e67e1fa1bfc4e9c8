"""Small shared helpers: tiny HF checkpoints on disk and CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One compute thread, here and in every otfuse the tests start: the suite's time then does not depend on how
# busy the machine is (torch's default, a thread per core, made commands 2-7x slower on a loaded machine) and
# in-process and subprocess runs reduce in the same order.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def make_tiny_bert(path: Path, hidden: int = 32, intermediate: int = 64, layers: int = 2, seed: int = 0,
                   max_shard_size: str | None = None):
    """Save a tiny randomly initialised BertModel with save_pretrained; returns the model."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=intermediate, max_position_embeddings=64)
    model = BertModel(cfg).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """One tiny BERT saved twice: `single` (model.safetensors) and `sharded` (20KB shards + index)."""
    root = tmp_path_factory.mktemp("tiny_bert")
    model = make_tiny_bert(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return {"model": model, "single": root / "single", "sharded": root / "sharded"}


def cli(*args: str):
    """Run the CLI in-process (typer's CliRunner; stdout and stderr kept apart)."""
    from typer.testing import CliRunner

    from otfuse_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def cli_subprocess(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m otfuse_cli ...` for real: the entry point, exit code and stderr as a user sees them."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "otfuse_cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for frag in fragments:
        assert frag in lines[0], (frag, stderr)
