"""`--dry-run` prints the plan of work from the headers alone: it reads no weight (every tensor read is made
to fail), writes nothing, and its widths and feature counts are those of the model's own shapes. A 7B-shaped
pair is written as sparse files (a real safetensors header over a hole), so the test needs no 27 GB."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import REPO, cli, cli_subprocess

LLAMA_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 11008, "vocab_size": 32000}


def sparse_llama(folder: Path, c: dict) -> Path:
    """A LlamaForCausalLM folder whose weights are a valid safetensors header followed by a hole."""
    h, d, kv, f = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"], c["num_key_value_heads"], \
        c["intermediate_size"]
    shapes = {"model.embed_tokens.weight": [c["vocab_size"], h], "model.norm.weight": [h],
              "lm_head.weight": [c["vocab_size"], h]}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv * d, h],
                       p + "self_attn.v_proj.weight": [kv * d, h], p + "self_attn.o_proj.weight": [h, h],
                       p + "mlp.gate_proj.weight": [f, h], p + "mlp.up_proj.weight": [f, h],
                       p + "mlp.down_proj.weight": [h, f], p + "input_layernorm.weight": [h],
                       p + "post_attention_layernorm.weight": [h]})
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 2 * int(__import__("math").prod(shape))
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    folder.mkdir(parents=True)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    (folder / "config.json").write_text(json.dumps({**c, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                    "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    return folder


@pytest.fixture()
def no_weight_reads(monkeypatch):
    from otfuse_cli.checkpoint.reader import Checkpoint

    def refuse(self, name):
        raise AssertionError(f"--dry-run read tensor {name}")
    monkeypatch.setattr(Checkpoint, "get", refuse)


def test_dry_run_of_a_7b_pair_reads_no_weight(tmp_path, no_weight_reads):
    a, b = sparse_llama(tmp_path / "a", LLAMA_7B), sparse_llama(tmp_path / "b", LLAMA_7B)
    result = cli("fuse", a, b, "-o", tmp_path / "out", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert not (tmp_path / "out").exists()
    # Llama-2-7B has 6,738,415,616 parameters with 32 KV heads; 8 KV heads make k and v 1024 x 4096
    assert doc["parameters"] == 6_738_415_616 - 32 * 2 * (4096 - 1024) * 4096
    widths = {s["kind"]: s["width"] for s in doc["spaces"]}
    assert widths["residual"] == [4096, 4096] and widths["ffn"] == [11008, 11008]
    residual = next(s for s in doc["spaces"] if s["kind"] == "residual")
    # every tensor touching the residual stream, per residual unit: embeddings and head (vocab each), per
    # layer q, k, v, o, gate, up, down columns/rows and two norms, and the final norm
    per_layer = 4096 + 1024 + 1024 + 4096 + 11008 + 11008 + 11008 + 2
    assert residual["plain_features"] == 2 * 32000 + 32 * per_layer + 1
    assert sum(s["kind"] == "ffn" for s in doc["spaces"]) == 32
    assert doc["peak_bytes_estimate"] < 24 * 2**30


def test_dry_run_table_and_align(tmp_path, no_weight_reads):
    bert = REPO / "fixtures" / "sentiment"
    result = cli("align", bert / "bert_a", bert / "bert_b", "-o", tmp_path / "p.safetensors", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "plan of work" in result.stdout and "residual" in result.stdout and "0.ffn" in result.stdout
    assert not (tmp_path / "p.safetensors").exists()


def test_a_file_larger_than_a_process_may_map_is_named_as_such(tmp_path):
    """A single safetensors file larger than RAM + swap (sparse here) cannot be memory-mapped under the kernel's
    heuristic overcommit; the error says that and how to shard, not that the file is invalid."""
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() != "0":
        pytest.skip("only the heuristic overcommit refuses one map larger than RAM + swap")
    meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    limit = sum(int(meminfo[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))
    n = (4 * limit) // 2  # bf16 elements: four times what may be mapped
    header = json.dumps({"w": {"dtype": "BF16", "shape": [n], "data_offsets": [0, 2 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(8 + len(header) + 2 * n)
    r = cli_subprocess("inspect", path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "larger than this machine lets one file be memory-mapped" in r.stderr and "max_shard_size" in r.stderr


def test_dry_run_cost_flops_equal_the_products_alignment_runs(tmp_path, monkeypatch):
    """The dry run's GFLOP per space against torch's own count of the matrix products a full (refining) solve
    of that space runs (torch.utils.flop_counter), on a GQA Llama pair: 8 query heads in 2 key/value groups,
    whose grouped grams are G = 4 times a plain head channel's products (the estimate once missed that)."""
    import torch
    import transformers as T
    from torch.utils.flop_counter import FlopCounterMode

    import otfuse_cli as otf
    from otfuse_cli import pipeline
    from otfuse_cli.alignment import engine
    from otfuse_cli.workplan import plan_of_work

    cfg = T.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                        num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=False, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0)
    for k in range(2):
        torch.manual_seed(k)
        T.LlamaForCausalLM(cfg).save_pretrained(tmp_path / f"m{k}")
    parents = pipeline.open_parents([str(tmp_path / "m0"), str(tmp_path / "m1")])
    options = otf.AlignOptions(refine=1)
    spaces = plan_of_work(parents, options, False)["spaces"]
    counted, current = {}, {}
    make_provider, cost = pipeline.feature_provider, engine.unit_cost

    def provider(*args, **kwargs):
        p = make_provider(*args, **kwargs)
        features = p.features

        def counted_features(k, plans, first_pass, **kw):
            with FlopCounterMode(display=False) as fc:
                out = features(k, plans, first_pass, **kw)
            current.update(space=k, full=not first_pass, flops=fc.get_total_flops())
            return out

        p.features = counted_features
        return p

    def counted_cost(*args, **kwargs):
        with FlopCounterMode(display=False) as fc:
            out = cost(*args, **kwargs)
        if current.get("full"):  # a refining solve reads every entry, as the estimate counts
            counted[current["space"]] = current["flops"] + fc.get_total_flops()
        return out

    monkeypatch.setattr(pipeline, "feature_provider", provider)
    monkeypatch.setattr(engine, "unit_cost", counted_cost)
    pipeline.compute_plans(parents, options, otf.DataOptions())
    assert any(s["kind"] == "heads" for s in spaces)
    for k, s in enumerate(spaces):
        assert counted[k] == pytest.approx(s["cost_gflops"] * 1e9, rel=1e-9), s["space"]
