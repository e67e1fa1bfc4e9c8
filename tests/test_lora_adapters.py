"""PEFT LoRA adapter folders read as checkpoints (otfuse_cli/checkpoint/adapter.py).

The oracle is PEFT itself: every tensor the adapter checkpoint yields equals PEFT's merge_and_unload() of the
same adapter over the same base, and a `fuse --align none` of two adapters runs (through transformers) like
the average of the two PEFT-merged models. Tiny BERT, Llama and GPT-2 bases cover modules_to_save, LoRA-only biases,
lora_B biases, rank/alpha patterns, rsLoRA, embedding LoRA, GPT-2's Conv1D (fan_in_fan_out) and a base whose names
carry a prefix the adapter's lack.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, cli
from otfuse_cli.checkpoint import open_checkpoint
from otfuse_cli.checkpoint.adapter import open_adapter
from otfuse_cli.errors import OtfuseError
from otfuse_cli.runnable import load_runnable

peft = pytest.importorskip("peft")

BERT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32, num_labels=3)
LLAMA = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=24, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
GPT2 = dict(vocab_size=40, n_embd=16, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)


def _base(cls, config, path, seed=0):
    torch.manual_seed(seed)
    cls(config).eval().save_pretrained(path)


def _adapter(cls, base, out, seed, wrap=None, bin_file=False, **lora):
    """A trained-looking adapter: PEFT zero-initialises lora_B, so every adapter tensor is randomised; returns
    PEFT's own merge (the oracle) as a state dict."""
    model = cls.from_pretrained(str(base)).eval()
    with warnings.catch_warnings():  # PEFT's notes (embedding layers saved, lora_B biases taken for shards)
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(wrap(model) if wrap else model, peft.LoraConfig(**lora))
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    torch.nn.init.normal_(p, std=0.2)
        peft_model.save_pretrained(out, safe_serialization=not bin_file)
    with torch.no_grad():
        return {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    _base(T.BertForSequenceClassification, T.BertConfig(**BERT), root / "bert")
    _base(T.LlamaForCausalLM, T.LlamaConfig(**LLAMA), root / "llama")
    _base(T.GPT2LMHeadModel, T.GPT2Config(**GPT2), root / "gpt2")
    bert_targets = ["query", "key", "value", "dense"]  # attention projections and both MLP layers (+ pooler)
    oracles = {
        "bert_a": _adapter(T.BertForSequenceClassification, root / "bert", root / "bert_a", 1, r=4, lora_alpha=8,
                           target_modules=bert_targets, modules_to_save=["classifier"], bias="lora_only"),
        "bert_b": _adapter(T.BertForSequenceClassification, root / "bert", root / "bert_b", 2, r=4, lora_alpha=6,
                           target_modules=bert_targets, modules_to_save=["classifier"], lora_bias=True,
                           rank_pattern={"value": 2}, alpha_pattern={r"layer\.1\.attention\.self\.query": 16}),
        "llama": _adapter(T.LlamaForCausalLM, root / "llama", root / "llama_a", 3, bin_file=True, r=4,
                          lora_alpha=4, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj", "embed_tokens"]),
        "gpt2": _adapter(T.GPT2LMHeadModel, root / "gpt2", root / "gpt2_a", 4, r=2, lora_alpha=5, use_rslora=True,
                         fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]),
        # PEFT on the classifier's BertModel: its names lack the base file's "bert." prefix
        "bert_inner": _adapter(T.BertForSequenceClassification, root / "bert", root / "bert_inner", 5,
                               wrap=lambda m: m.bert, r=2, lora_alpha=2, target_modules=["query", "value"]),
    }
    # the base named relative to the adapter folder, as a moved pair of folders would have it
    cfg_path = root / "bert_b" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "base_model_name_or_path": "../bert"}))
    return root, oracles


def _assert_close(got, want, name):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), name


@pytest.mark.parametrize("adapter, oracle, prefix", [
    ("bert_a", "bert_a", ""), ("bert_b", "bert_b", ""), ("llama_a", "llama", ""), ("gpt2_a", "gpt2", ""),
    ("bert_inner", "bert_inner", "bert."),
])
def test_every_tensor_equals_peft_merge(zoo, adapter, oracle, prefix):
    root, oracles = zoo
    want = oracles[oracle]
    with open_checkpoint(root / adapter) as ckpt:
        assert ckpt.format == "lora adapter" and ckpt.config["model_type"] == ckpt.hf_config.model_type
        changed = 0
        for name in ckpt.keys():
            got = ckpt.get(name)
            assert ckpt.shape(name) == tuple(got.shape) and ckpt.dtype(name) == got.dtype
            if name.startswith(prefix):
                _assert_close(got, want[name.removeprefix(prefix)], name)
            changed += not torch.equal(got, ckpt.base.get(name))
        assert changed >= 4  # the merge did something (oracle equality alone would pass on a no-op adapter)


def test_files_name_adapter_and_base_from_the_base_folder(zoo):
    root, _ = zoo
    ckpt = open_checkpoint(root / "bert_b")
    rel = {f.relative_to(ckpt.folder).as_posix() for f in ckpt.files()}
    assert {"../bert_b/adapter_model.safetensors", "../bert_b/adapter_config.json", "model.safetensors",
            "config.json"} <= rel
    assert all(f.is_file() for f in ckpt.files())
    assert ckpt.num_parameters() == ckpt.base.num_parameters()
    assert ckpt.size_on_disk() > ckpt.base.size_on_disk()
    assert open_checkpoint(root / "bert_b" / "adapter_model.safetensors").format == "lora adapter"
    assert (root / "llama_a" / "adapter_model.bin").is_file()  # the .bin form is read too


def test_runnable_runs_the_merged_weights(zoo):
    root, oracles = zoo
    reference = T.LlamaForCausalLM(T.LlamaConfig(**LLAMA)).eval()
    reference.load_state_dict(oracles["llama"])
    ids = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    runnable = load_runnable(open_checkpoint(root / "llama_a"))
    with torch.no_grad():
        got, want = runnable.module(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_inspect_and_fuse_two_adapters(zoo, tmp_path):
    root, oracles = zoo
    r = cli("inspect", root / "bert_a", "--json")
    assert r.exit_code == 0, r.stderr
    (summary,) = json.loads(r.stdout)["models"]
    assert summary["format"] == "lora adapter" and summary["model_type"] == "bert"
    assert cli("inspect", root / "bert_a").exit_code == 0

    out = tmp_path / "fused"
    r = cli("fuse", root / "bert_a", root / "bert_b", "-o", out, "--align", "none")
    assert r.exit_code == 0, r.stderr
    fused = T.BertForSequenceClassification.from_pretrained(str(out)).eval()
    average = {k: (oracles["bert_a"][k] + oracles["bert_b"][k]) / 2 for k in oracles["bert_a"]}
    reference = T.BertForSequenceClassification(T.BertConfig(**BERT)).eval()
    reference.load_state_dict(average)
    ids = torch.randint(1, 60, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(fused(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)
    inputs = json.loads((out / "otfuse.json").read_text())["inputs"]
    assert {"../bert_a/adapter_model.safetensors", "model.safetensors"} <= set(inputs[0]["files"])


def test_explicit_base(zoo, tmp_path):
    root, oracles = zoo
    folder = tmp_path / "moved"
    shutil.copytree(root / "bert_a", folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/bert-tiny"}))
    with pytest.raises(OtfuseError, match="pass the base explicitly"):
        open_checkpoint(folder)
    ckpt = open_adapter(folder, base=root / "bert")
    _assert_close(ckpt.get("classifier.weight"), oracles["bert_a"]["classifier.weight"], "classifier")


def _broken(root, tmp_path, config=None, tensors=None):
    folder = tmp_path / "adapter"
    shutil.copytree(root / "bert_a", folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    if tensors:
        weights = folder / "adapter_model.safetensors"
        save_file(tensors(load_file(weights)), weights)
    return folder


def _rename_first_lora(tensors):
    out = {}
    for k, v in tensors.items():
        out[k.replace("layer.0.attention.self.query.", "layer.0.attention.self.nothing.")] = v
    return out


@pytest.mark.parametrize("config, tensors, fragment", [
    ({"base_model_name_or_path": "org/not-here"}, None, "pass the base explicitly"),
    ({"use_dora": True}, None, "DoRA (use_dora) is not supported"),
    ({"peft_type": "IA3"}, None, "otfuse reads LoRA adapters only"),
    (None, _rename_first_lora, "self.nothing.base_layer.bias' (bert.encoder.layer.0.attention.self.nothing.bias) "
                               "matches no tensor"),
    (None, lambda t: {**t, "base_model.model.classifier.weight": torch.zeros(5, 32)}, "has shape (5, 32)"),
    (None, lambda t: {k: v[..., None, None] if ".0.attention.self.query.lora_A" in k else v for k, v in t.items()},
     "is a convolution LoRA"),
])
def test_bad_adapters_fail_in_one_line(zoo, tmp_path, config, tensors, fragment):
    root, _ = zoo
    folder = _broken(root, tmp_path, config, tensors)
    out = tmp_path / "out"
    r = cli("fuse", folder, root / "bert_b", "-o", out, "--align", "none")
    assert r.exit_code == 2, r.stderr
    assert_one_line_error(r.stderr, fragment)
    assert not out.exists()


def test_adapters_naming_a_hub_base_merge_as_task_vectors_over_fuse_base(zoo, tmp_path):
    """Two adapters whose config names a hub id: `fuse --base` reads them over the local base, and task
    arithmetic gives base + lambda * sum_k (PEFT's merge_k - base), the heads (modules_to_save) included."""
    root, oracles = zoo
    moved = []
    for name in ("bert_a", "bert_b"):
        shutil.copytree(root / name, tmp_path / name)
        cfg = json.loads((tmp_path / name / "adapter_config.json").read_text())
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/x"}))
        moved.append(tmp_path / name)
    out = tmp_path / "merged"
    r = cli("fuse", *moved, "-o", out, "--base", root / "bert", "--merge", "task-arithmetic", "--scale", "0.5",
            "--heads", "merge", "--align", "none")
    assert r.exit_code == 0, r.stderr
    base = load_file(root / "bert" / "model.safetensors")
    fused = load_file(out / "model.safetensors")
    for k, v in fused.items():
        if not v.is_floating_point():
            continue
        want = base[k] + 0.5 * sum(oracles[n][k] - base[k] for n in ("bert_a", "bert_b"))
        _assert_close(v, want, k)
