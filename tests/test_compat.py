"""One compatibility judgement: `otfuse inspect` calls a pair fusable exactly when `otfuse fuse` accepts it,
and when it does not, both give the same one-line reason."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_one_line_error, cli
from models import mlp
from otfuse_cli.arch.compat import check_interpolatable, judge
from otfuse_cli.checkpoint import open_checkpoint
from otfuse_cli.errors import OtfuseError

BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)

# name -> how to build it: ("bert", config overrides, seed) | ("distilbert"|"gpt2", seed) | ("mlp", widths, seed)
MODELS = {
    "bert": ("bert", {}, 0),
    "bert_seed1": ("bert", {}, 1),
    "bert_vocab": ("bert", {"vocab_size": 120}, 1),
    "bert_deep": ("bert", {"num_hidden_layers": 3}, 1),
    "bert_wide": ("bert", {"hidden_size": 48, "num_attention_heads": 3, "intermediate_size": 96}, 1),  # head_dim 16
    "bert_cls2": ("bert", {"num_labels": 2}, 0),
    "bert_cls3": ("bert", {"num_labels": 3}, 1),
    "distilbert": ("distilbert", 1),
    "gpt2": ("gpt2", 1),
    "mlp": ("mlp", (20, 16, 12, 5), 0),
    "mlp_seed1": ("mlp", (20, 16, 12, 5), 1),
    "mlp_wide": ("mlp", (20, 24, 12, 5), 1),
    "mlp_deep": ("mlp", (20, 16, 12, 8, 5), 1),
    "mlp_classes": ("mlp", (20, 16, 12, 7), 1),
    "mlp_inputs": ("mlp", (10, 16, 12, 5), 1),
}

# (A, B, compatible, verdict, fragment of the reason when incompatible)
PAIRS = [
    ("bert", "bert_seed1", True, "identical layout", None),
    ("bert", "bert_wide", True, "heterogeneous widths", None),
    ("bert_wide", "bert", True, "heterogeneous widths", None),
    ("bert", "bert_vocab", False, "incompatible", "must not move"),
    # different label sets: the bodies fuse, each parent keeping its own classifier (one folder each)
    ("bert_cls2", "bert_cls3", True, "shared body, different task heads", None),
    ("bert", "bert_deep", False, "incompatible", "structure"),
    ("bert_cls2", "distilbert", False, "incompatible", "distilbert model"),
    ("bert", "gpt2", False, "incompatible", "gpt2 model"),
    ("mlp", "mlp_seed1", True, "identical layout", None),
    ("mlp", "mlp_wide", True, "heterogeneous widths", None),
    ("mlp", "mlp_deep", False, "incompatible", "structure"),
    ("mlp", "mlp_classes", False, "incompatible", "must not move"),
    ("mlp", "mlp_inputs", False, "incompatible", "must not move"),
]


def build(path, recipe):
    import transformers as T

    kind, *args = recipe
    torch.manual_seed(args[-1])
    if kind == "mlp":
        path = path.with_suffix(".safetensors")
        save_file({k: v.contiguous() for k, v in mlp(args[0], args[1]).state_dict().items()}, path)
        return path
    if kind == "bert":
        config = T.BertConfig(**{**BERT, **args[0]})
        cls = T.BertForSequenceClassification if "num_labels" in args[0] else T.BertModel
    elif kind == "distilbert":
        config, cls = T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                         max_position_embeddings=64, num_labels=2), T.DistilBertForSequenceClassification
    else:
        config, cls = T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                                  eos_token_id=0), T.GPT2LMHeadModel
    cls(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    return {name: build(root / name, recipe) for name, recipe in MODELS.items()}


@pytest.mark.parametrize("a, b, compatible, verdict, fragment", PAIRS, ids=[f"{a}-{b}" for a, b, *_ in PAIRS])
def test_inspect_agrees_with_fuse(models, tmp_path, a, b, compatible, verdict, fragment):
    r = cli("inspect", models[a], models[b], "--json")
    assert r.exit_code == 0, r.stderr  # an incompatible pair is a finding, not an error
    c = json.loads(r.stdout)["comparison"]
    assert (c["compatible"], c["verdict"], c["heterogeneous"]) == (compatible, verdict, verdict == "heterogeneous widths")

    out = tmp_path / ("out.safetensors" if a.startswith("mlp") else "out")
    fused = cli("fuse", models[a], models[b], "-o", out)
    if compatible:
        assert fused.exit_code == 0, fused.stderr
        assert out.exists() and c["reason"] is None
    else:
        assert fused.exit_code == 2, fused.stdout
        assert_one_line_error(fused.stderr, fragment)
        assert fused.stderr == f"error: {c['reason']}\n"  # the very message inspect reported
        assert not out.exists()
        human = " ".join(cli("inspect", models[a], models[b]).stdout.split())
        assert "why: model 1 (" in human and fragment in human


def test_judge_reports_first_incompatible_model_and_build_failures(models, tmp_path):
    ckpts = [open_checkpoint(models[n]) for n in ("bert", "bert_wide", "bert_deep")]
    v = judge(ckpts)
    assert not v["compatible"] and v["reason"].startswith("model 2 ") and "structure" in v["reason"]
    assert judge(ckpts[:2])["heterogeneous"] and judge(ckpts[:1])["verdict"] == "identical layout"

    odd = tmp_path / "odd"  # a model_type no family declares: the Spec cannot be built
    build(odd, MODELS["bert"])
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-type"}))
    v = judge([ckpts[0], open_checkpoint(odd)])
    assert v["verdict"] == "incompatible" and "unsupported model_type 'no-such-type'" in v["reason"]


@pytest.mark.parametrize("b, fragment", [("bert_seed1", None), ("bert_wide", "same widths"),
                                         ("bert_vocab", "must not move"), ("gpt2", "gpt2 model")])
def test_check_interpolatable(models, b, fragment):
    a, other = open_checkpoint(models["bert"]), open_checkpoint(models[b])
    if fragment is None:
        check_interpolatable(a, other)
        return
    with pytest.raises(OtfuseError, match=fragment) as err:
        check_interpolatable(a, other)
    assert str(err.value).startswith("cannot interpolate: ") and "\n" not in str(err.value)


# ---------------------------------------------------------------- config fields that change the function

SENT = __import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures" / "sentiment"


def _edit_json(path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, indent=1))


def _rename_token(doc) -> None:
    vocab = doc["model"]["vocab"]
    word = next(w for w in vocab if w.isalpha())
    vocab["zz" + word] = vocab.pop(word)


FUNCTION_CHANGES = {  # file -> edit, the field the refusal must name
    "activation": ("config.json", lambda c: c.update(hidden_act="relu"), "hidden_act ('gelu' vs 'relu')"),
    "norm epsilon": ("config.json", lambda c: c.update(layer_norm_eps=1e-5), "layer_norm_eps"),
    "pad token": ("config.json", lambda c: c.update(pad_token_id=1), "pad_token_id (0 vs 1)"),
    "tokenizer vocabulary": ("tokenizer.json", _rename_token, "tokenizer tokenizer.json"),
    "lower-casing": ("tokenizer_config.json", lambda c: c.update(do_lower_case=True),
                     "tokenizer tokenizer_config.json"),
}


@pytest.mark.parametrize("file, change, named", FUNCTION_CHANGES.values(), ids=FUNCTION_CHANGES.keys())
def test_parents_whose_config_changes_the_function_are_refused_unless_allowed(tmp_path, file, change, named):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(SENT / "bert_b", b)
    _edit_json(b / file, change)
    a = SENT / "bert_a"
    fused = cli("fuse", a, b, "-o", tmp_path / "out")
    assert fused.exit_code == 2 and not (tmp_path / "out").exists()
    assert_one_line_error(fused.stderr, named, "--allow-config-mismatch")
    assert cli("align", a, b, "-o", tmp_path / "p.safetensors").exit_code == 2
    assert cli("inspect", a, b, "--check").exit_code == 3
    interp = cli("evaluate", "--interpolate", a, b, "--data", SENT / "test.jsonl", "--steps", "2")
    assert interp.exit_code == 2 and named in interp.stderr
    allowed = cli("fuse", a, b, "-o", tmp_path / "out", "--allow-config-mismatch")
    assert allowed.exit_code == 0, allowed.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_act"] == "gelu"  # the anchor's


def test_the_activation_field_really_changes_the_function():
    """The premise, from transformers itself: the same weights under hidden_act relu compute something else."""
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(SENT / "bert_a")).eval()
    config = transformers.AutoConfig.from_pretrained(str(SENT / "bert_a"), hidden_act="relu")
    other = transformers.AutoModelForSequenceClassification.from_pretrained(str(SENT / "bert_a"),
                                                                            config=config).eval()
    ids = torch.tensor([[2, 40, 41, 42, 3]])
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, other(input_ids=ids).logits, atol=1e-4)


def test_config_written_differently_but_computing_the_same_is_accepted(tmp_path):
    """A default left implicit, reordered keys, and tokenizer settings that do not change tokenisation
    (padding, truncation, model_max_length) are not mismatches."""
    import shutil

    b = tmp_path / "b"
    shutil.copytree(SENT / "bert_b", b)
    _edit_json(b / "config.json", lambda c: [c.pop("layer_norm_eps"), c.update(dict(reversed(list(c.items()))))])
    _edit_json(b / "tokenizer.json", lambda t: t.update(truncation={"max_length": 32, "strategy": "LongestFirst",
                                                                    "stride": 0, "direction": "Right"}))
    _edit_json(b / "tokenizer_config.json", lambda t: t.update(model_max_length=512))
    assert judge([open_checkpoint(SENT / "bert_a"), open_checkpoint(b)])["verdict"] == "identical layout"
    result = cli("fuse", SENT / "bert_a", b, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_allow_config_mismatch_without_interpolation_is_refused():
    result = cli("evaluate", SENT / "bert_a", "--data", SENT / "test.jsonl", "--allow-config-mismatch")
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "--allow-config-mismatch", "--interpolate")
