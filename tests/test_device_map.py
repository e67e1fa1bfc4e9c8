"""--device-map: activation alignment of models that do not fit one device, through accelerate's device maps.
On this CPU-only machine a small memory budget sends layers to disk; the plans must be those of the model
held whole, and the offloaded model must compute what its own forward code computes."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import save_file

from conftest import assert_one_line_error, cli
from models import mlp
from permute import save_permuted_copy
from tiny_transformers import save_tokenizer, sentences, tiny_model
from otfuse_cli import AlignOptions, DataOptions, align, runnable
from otfuse_cli.alignment.plans import load_plans
from otfuse_cli.checkpoint import open_checkpoint

BUDGET = {"cpu": 30_000}  # bytes: the embeddings stay in memory, the transformer blocks go to disk


def test_offloaded_layers_give_the_same_plans(tmp_path, monkeypatch):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "a")
    save_tokenizer(tmp_path / "a")
    save_permuted_copy(tmp_path / "a", tmp_path / "b", seed=4)
    (tmp_path / "t.txt").write_text("\n".join(sentences(40)) + "\n")
    monkeypatch.setattr(runnable, "MAX_MEMORY", BUDGET)

    placed = runnable.load_runnable(open_checkpoint(tmp_path / "a"), device_map="auto")
    assert "disk" in placed.module.hf_device_map.values()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(placed.module(input_ids=ids).logits, model(input_ids=ids).logits)

    plans = {}
    for device_map in (None, "auto"):
        out = tmp_path / f"{device_map}.safetensors"
        align([str(tmp_path / "a"), str(tmp_path / "b")], str(out), options=AlignOptions(align="activations"),
              data=DataOptions(data=str(tmp_path / "t.txt"), samples=40, device_map=device_map))
        plans[device_map], _ = load_plans(out)
    whole, spread = plans[None][1], plans["auto"][1]
    assert set(whole) == set(spread)
    for space, plan in whole.items():
        assert torch.equal(plan.hard_index(), spread[space].hard_index()), space
        assert np.isclose(plan.stats["cost_after"], spread[space].stats["cost_after"], rtol=1e-6, atol=1e-9)
    assert all(p.stats["cost_after"] < 1e-6 * max(p.stats["cost_before"], 1e-12) for p in spread.values()
               if p.stats.get("cost_before", 0) > 0)  # a permuted copy: every unit finds its twin


def test_device_map_needs_a_model_folder(tmp_path):
    sd = {k: v.contiguous() for k, v in mlp().state_dict().items()}
    for name in "ab":
        save_file(sd, tmp_path / f"{name}.safetensors")
    save_file({"x": torch.randn(16, 20)}, tmp_path / "x.safetensors")
    result = cli("fuse", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", tmp_path / "f.safetensors",
                 "--align", "activations", "--data", tmp_path / "x.safetensors", "--device-map", "auto")
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "Hugging Face model folder")
    assert not (tmp_path / "f.safetensors").exists()


def test_device_map_without_activations_is_refused(tmp_path):
    sd = {k: v.contiguous() for k, v in mlp().state_dict().items()}
    for name in "ab":
        save_file(sd, tmp_path / f"{name}.safetensors")
    result = cli("align", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", tmp_path / "p.safetensors",
                 "--device-map", "auto")
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "--device-map")
