"""Bad input to align/fuse: one clear line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_one_line_error, cli
from models import mlp
from tiny_transformers import tiny_model


def save_mlp(path, widths, seed=0):
    save_file({k: v.contiguous() for k, v in mlp(widths, seed).state_dict().items()}, path)
    return path


def refuse(tmp_path, *args, fragment):
    out = tmp_path / "out"
    result = cli("fuse", *args, "-o", out)
    assert result.exit_code == 2, result.stdout
    assert_one_line_error(result.stderr, fragment)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_different_depth_is_refused(tmp_path):
    a = save_mlp(tmp_path / "a.safetensors", (20, 16, 12, 5))
    b = save_mlp(tmp_path / "b.safetensors", (20, 16, 5))
    refuse(tmp_path, a, b, fragment="structure")


def test_different_class_count_is_refused(tmp_path):
    a = save_mlp(tmp_path / "a.safetensors", (20, 16, 12, 5))
    b = save_mlp(tmp_path / "b.safetensors", (20, 16, 12, 7))
    refuse(tmp_path, a, b, fragment="must not move")


def test_nan_in_a_parent_is_reported(tmp_path):
    a = save_mlp(tmp_path / "a.safetensors", (20, 16, 12, 5))
    sd = {k: v.contiguous() for k, v in mlp((20, 16, 12, 5), 1).state_dict().items()}
    sd["2.weight"][0, 0] = float("nan")
    save_file(sd, tmp_path / "b.safetensors")
    refuse(tmp_path, a, tmp_path / "b.safetensors", fragment="NaN")
    result = cli("fuse", a, tmp_path / "b.safetensors", "-o", tmp_path / "avg", "--align", "none")
    assert result.exit_code == 2 and "NaN" in result.stderr


def test_different_families_are_refused(tmp_path):
    tiny_model("bert_cls").save_pretrained(tmp_path / "bert")
    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    refuse(tmp_path, tmp_path / "bert", tmp_path / "gpt2", fragment="model")


def test_different_vocabulary_is_refused(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "a")
    import transformers as T

    cfg = tiny_model("llama").config
    cfg.vocab_size = 48
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "b")
    refuse(tmp_path, tmp_path / "a", tmp_path / "b", fragment="must not move")


def test_different_depth_transformers_are_refused(tmp_path):
    tiny_model("bert_cls").save_pretrained(tmp_path / "a")
    tiny_model("bert_tok").save_pretrained(tmp_path / "b")  # 1 layer, token head
    refuse(tmp_path, tmp_path / "a", tmp_path / "b", fragment="structure")


def test_unknown_model_type_names_what_is_supported(tmp_path):
    tiny_model("bert_cls").save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["model_type"] = "funnel"
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    result = cli("inspect", "--spaces", tmp_path / "a")
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "funnel", "supported", "llama", "gpt2")


@pytest.mark.parametrize("args,fragment", [
    (["--weights", "1,2,3"], "--weights"),
    (["--solver", "magic"], "solver"),
    (["--anchor", "5"], "--anchor"),
    (["--merge", "median"], "merge"),
    (["--dtype", "int8"], "dtype"),
])
def test_bad_options_are_refused(tmp_path, args, fragment):
    a = save_mlp(tmp_path / "a.safetensors", (20, 16, 12, 5))
    b = save_mlp(tmp_path / "b.safetensors", (20, 16, 12, 5), seed=1)
    out = tmp_path / "out.safetensors"
    result = cli("fuse", a, b, "-o", out, *args)
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, fragment)
    assert not out.exists()


def test_existing_output_is_refused_before_any_work(tmp_path):
    a = save_mlp(tmp_path / "a.safetensors", (20, 16, 12, 5))
    b = save_mlp(tmp_path / "b.safetensors", (20, 16, 12, 5), seed=1)
    (tmp_path / "out.safetensors").write_text("precious")
    result = cli("fuse", a, b, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 2 and "--force" in result.stderr
    assert (tmp_path / "out.safetensors").read_text() == "precious"
    assert cli("fuse", a, b, "-o", tmp_path / "out.safetensors", "--force").exit_code == 0


def test_fused_output_is_deterministic_and_keeps_dtype(tmp_path):
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in mlp((20, 16, 12, 5)).state_dict().items()}
    save_file(sd, tmp_path / "a.safetensors")
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in mlp((20, 16, 12, 5), 1).state_dict().items()}
    save_file(sd, tmp_path / "b.safetensors")
    for name in ("f1", "f2"):
        assert cli("fuse", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o",
                   tmp_path / f"{name}.safetensors").exit_code == 0
    assert (tmp_path / "f1.safetensors").read_bytes() == (tmp_path / "f2.safetensors").read_bytes()
    from safetensors.torch import load_file

    fused = load_file(tmp_path / "f1.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in fused.values())
    assert cli("fuse", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", tmp_path / "f3.safetensors",
               "--dtype", "float32").exit_code == 0
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "f3.safetensors").values())
