"""Data loading: formats, deterministic subsampling, and one clear OtfuseError per bad input."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from otfuse_cli.data import load_records, load_tensors, require_fields, subsample, tokenize_texts
from otfuse_cli.errors import OtfuseError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_formats(tmp_path):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    j = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_records(j) == rows
    c = write(tmp_path / "d.csv", "text,label\n\"a, x\",1\nb,0\n")
    assert load_records(c) == [{"text": "a, x", "label": "1"}, {"text": "b", "label": "0"}]
    t = write(tmp_path / "d.tsv", "source\ttarget\nhi\tmoi\n")
    assert load_records(t) == [{"source": "hi", "target": "moi"}]
    x = write(tmp_path / "d.txt", "one\n\n  \ntwo\n")
    assert load_records(x) == [{"text": "one"}, {"text": "two"}]


def test_subsample_is_seeded_and_ordered(tmp_path):
    j = write(tmp_path / "d.jsonl", "\n".join(json.dumps({"text": str(i)}) for i in range(100)))
    a = load_records(j, max_samples=10, seed=3)
    assert a == load_records(j, max_samples=10, seed=3) and len(a) == 10
    assert [int(r["text"]) for r in a] == sorted(int(r["text"]) for r in a)
    assert a != load_records(j, max_samples=10, seed=4)
    assert subsample([1, 2], 5) == [1, 2]


def test_tensors(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((4, 3), np.float32), y=np.arange(4))
    t = load_tensors(tmp_path / "d.npz")
    assert t["x"].shape == (4, 3) and t["y"].tolist() == [0, 1, 2, 3]
    save_file({"x": torch.zeros(6, 2), "y": torch.arange(6)}, str(tmp_path / "d.safetensors"))
    t = load_tensors(tmp_path / "d.safetensors", max_samples=3, seed=1)
    assert t["x"].shape == (3, 2) and t["y"].tolist() == sorted(t["y"].tolist())


@pytest.mark.parametrize("name,content,match", [
    ("missing.jsonl", None, "not found"),
    ("empty.jsonl", "", "empty"),
    ("blank.jsonl", "\n\n", "no records"),
    ("bad.jsonl", '{"text": "a"}\n{"text": oops}\n', r"bad.jsonl:2: malformed JSON"),
    ("list.jsonl", '[1, 2]\n', r"list.jsonl:1: expected a JSON object"),
    ("data.xyz", "x", "unknown data file type '.xyz'"),
    ("data.parquet", "x", r"cannot read .*data.parquet as parquet"),  # a table (tests/test_data_datasets.py)
    ("header.csv", "text,label\n", "no records"),
    ("ragged.csv", "text\na,b\n", r"ragged.csv:2: row has more cells"),
])
def test_record_errors(tmp_path, name, content, match):
    p = tmp_path / name
    if content is not None:
        write(p, content)
    with pytest.raises(OtfuseError, match=match):
        load_records(p)


def test_not_utf8(tmp_path):
    p = tmp_path / "d.txt"
    p.write_bytes(b"\xff\xfe\xfa bad")
    with pytest.raises(OtfuseError, match="not UTF-8"):
        load_records(p)


def test_missing_field_names_the_fields(tmp_path):
    recs = load_records(write(tmp_path / "d.jsonl", '{"text": "a", "y": 1}\n'))
    with pytest.raises(OtfuseError, match=r"missing field 'label'.*fields present: text, y"):
        require_fields(recs, ["text", "label"], "d.jsonl")
    recs = [{"text": "a", "label": 1}, {"text": "b"}]
    with pytest.raises(OtfuseError, match="missing from record 2"):
        require_fields(recs, ["label"])


def test_tensor_errors(tmp_path):
    np.savez(tmp_path / "nox.npz", inputs=np.ones(3))
    with pytest.raises(OtfuseError, match="missing array 'x'; arrays present: inputs"):
        load_tensors(tmp_path / "nox.npz")
    np.savez(tmp_path / "bady.npz", x=np.ones((3, 2)), y=np.ones(4))
    with pytest.raises(OtfuseError, match=r"'y' has shape \(4,\)"):
        load_tensors(tmp_path / "bady.npz")
    write(tmp_path / "junk.npz", "not a zip")
    with pytest.raises(OtfuseError, match="cannot read .* as .npz"):
        load_tensors(tmp_path / "junk.npz")
    write(tmp_path / "junk.safetensors", "not safetensors")
    with pytest.raises(OtfuseError, match="cannot read .* as safetensors"):
        load_tensors(tmp_path / "junk.safetensors")
    with pytest.raises(OtfuseError, match="unknown data file type"):
        load_tensors(write(tmp_path / "d.jsonl", "{}"))
    with pytest.raises(OtfuseError, match="max_samples must be at least 1"):
        subsample([1], 0)


def test_tokenize_texts_pads_with_mask():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, "[EOS]": 1, "a": 2, "b": 3}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]")
    enc = tokenize_texts(tok, ["a b a", "b"], max_length=8)  # no pad token: falls back to eos
    assert enc["input_ids"].tolist() == [[2, 3, 2], [3, 1, 1]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_records_split_at_newlines_only(tmp_path):
    """Real IMDB reviews hold U+2028, U+0085 and \\x1c inside their text: str.splitlines() broke such a jsonl
    line in two ("malformed JSON line"). The expected records come from the json and csv modules themselves."""
    import csv
    import io

    texts = ["a line\u2028separator", "next\x85line", "file\x1cseparator", "plain"]
    jsonl = tmp_path / "odd.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": 1}, ensure_ascii=False) + "\n" for t in texts),
                     encoding="utf-8")
    assert [r["text"] for r in load_records(jsonl)] == texts
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(b'{"text": "x"}\r\n{"text": "y"}\r\n')
    assert [r["text"] for r in load_records(crlf)] == ["x", "y"]
    table = tmp_path / "quoted.csv"
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["text", "label"])
    writer.writerows([["two\nlines", "0"], ["sep\u2028here", "1"]])
    table.write_text(buf.getvalue(), encoding="utf-8")
    assert [r["text"] for r in load_records(table)] == [r["text"] for r in csv.DictReader(io.StringIO(buf.getvalue()))]
