"""Checkpoint reading (every layout, dtypes, .bin safety) and writing (sharding, atomicity, determinism)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, cli, cli_subprocess
from otfuse_cli.checkpoint import open_checkpoint, parse_size, provenance, sha256_file, write_checkpoint
from otfuse_cli.errors import OtfuseError


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".otfuse-tmp-" in p.name or ".otfuse-old-" in p.name]


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 4, generator=g),
        "b.weight": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(3, generator=g).to(torch.float16),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),  # 0-d int64 (BatchNorm)
        "mask": torch.tensor([True, False, True]),
    }


# ---------------------------------------------------------------------------------------------- reading

def test_single_and_sharded_read_identically(tiny_bert):
    single = open_checkpoint(tiny_bert["single"])
    sharded = open_checkpoint(tiny_bert["sharded"])
    via_index = open_checkpoint(tiny_bert["sharded"] / "model.safetensors.index.json")
    via_file = open_checkpoint(tiny_bert["single"] / "model.safetensors")
    assert (single.format, sharded.format, via_index.format, via_file.format) == ("folder", "sharded", "sharded", "single")
    assert single.folder == tiny_bert["single"] and via_index.folder == tiny_bert["sharded"] and via_file.folder is None
    assert single.config["model_type"] == "bert" and via_file.config is None
    assert single.metadata.get("format") == "pt"
    assert single.keys() == sharded.keys() == via_index.keys() == sorted(single.keys())
    assert len(sharded.files()) > 3  # shards + index + config
    expected = tiny_bert["model"].state_dict()
    for name in single.keys():
        a, b = single.get(name), sharded.get(name)
        assert torch.equal(a, b) and torch.equal(a, expected[name])
        assert single.shape(name) == tuple(a.shape) and single.dtype(name) == a.dtype  # header == data
    assert single.num_parameters() == sharded.num_parameters() == tiny_bert["model"].num_parameters()
    assert set(single.state_dict()) == set(expected)


@pytest.mark.parametrize("how", ["safetensors", "writer", "bin"])
def test_dtypes_preserved(tmp_path, how):
    tensors = _mixed_tensors()
    if how == "safetensors":
        save_file(tensors, tmp_path / "m.safetensors")
        path = tmp_path / "m.safetensors"
    elif how == "writer":
        path = write_checkpoint(tmp_path / "m.safetensors", tensors, layout="file")
    else:
        torch.save(tensors, tmp_path / "m.bin")
        path = tmp_path / "m.bin"
    ck = open_checkpoint(path)
    for name, t in tensors.items():
        assert ck.dtype(name) == t.dtype and ck.shape(name) == tuple(t.shape)
        got = ck.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
    # integer and bool tensors are not parameters
    assert ck.num_parameters() == 8 * 4 + 4 * 4 + 3


def test_bin_folder_and_wrapped_state_dict(tmp_path, tiny_bert):
    sd = tiny_bert["model"].state_dict()
    folder = tmp_path / "binmodel"
    folder.mkdir()
    shutil.copy(tiny_bert["single"] / "config.json", folder)
    torch.save(sd, folder / "pytorch_model.bin")
    ck = open_checkpoint(folder)
    assert ck.format == "bin" and ck.config["model_type"] == "bert" and ck.folder == folder
    assert ck.keys() == sorted(sd) and all(torch.equal(ck.get(k), sd[k]) for k in sd)
    assert {p.name for p in ck.files()} == {"config.json", "pytorch_model.bin"}
    # training checkpoints wrap the weights: {"state_dict": ..., "epoch": 3}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "train.pt")
    assert open_checkpoint(tmp_path / "train.pt").keys() == sorted(sd)


class _Evil:
    """Unpickling this would call open(marker, 'w'): code execution a weights_only load must refuse."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bin_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "x": _Evil(marker)}, tmp_path / "evil.bin")
    with pytest.raises(OtfuseError, match="refusing to load .*evil.bin.*not plain tensors"):
        open_checkpoint(tmp_path / "evil.bin")
    assert not marker.exists()
    r = cli_subprocess("inspect", tmp_path / "evil.bin")
    assert r.returncode == 2 and r.stdout == ""
    assert_one_line_error(r.stderr, "refusing to load")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- bad inputs

def _bad_inputs(tmp: Path, tiny_bert) -> dict[str, tuple[Path, str]]:
    """name -> (path, expected message fragment)."""
    out: dict[str, tuple[Path, str]] = {}
    out["missing"] = (tmp / "nope", "no such file or folder")
    (tmp / "empty").mkdir()
    (tmp / "empty" / "config.json").write_text("{}")
    out["no weights"] = (tmp / "empty", "no weights found")
    data = (tiny_bert["single"] / "model.safetensors").read_bytes()
    (tmp / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated"] = (tmp / "trunc.safetensors", "not a valid safetensors file")
    (tmp / "junk.safetensors").write_bytes(b"this is not a safetensors file at all")
    out["corrupted"] = (tmp / "junk.safetensors", "not a valid safetensors file")
    (tmp / "notes.txt").write_text("hello")
    out["unknown type"] = (tmp / "notes.txt", "unknown checkpoint file type")

    def index_dir(name: str, weight_map: dict) -> Path:
        d = tmp / name
        shutil.copytree(tiny_bert["sharded"], d)
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        idx["weight_map"].update(weight_map)
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
        return d

    first = "embeddings.word_embeddings.weight"
    out["missing shard"] = (index_dir("missingshard", {first: "model-00009-of-00009.safetensors"}), "is missing")
    # The escaping shard exists (a valid file): it must be refused by name, before any opening.
    shutil.copy(tiny_bert["single"] / "model.safetensors", tmp / "outside.safetensors")
    out["parent shard"] = (index_dir("parentshard", {first: "../outside.safetensors"}), "outside the model folder")
    out["absolute shard"] = (index_dir("absshard", {first: str(tmp / "outside.safetensors")}),
                             "outside the model folder")
    return out


def test_bad_inputs_raise_clear_errors(tmp_path, tiny_bert):
    for name, (path, fragment) in _bad_inputs(tmp_path, tiny_bert).items():
        with pytest.raises(OtfuseError) as info:
            open_checkpoint(path)
        msg = str(info.value)
        assert fragment in msg and "\n" not in msg, (name, msg)
        r = cli("inspect", path)  # same contract through the CLI
        assert r.exit_code == 2, (name, r.output)
        assert r.stdout == ""
        assert_one_line_error(r.stderr, fragment)


def test_bad_input_via_real_entry_point(tmp_path, tiny_bert):
    bad = _bad_inputs(tmp_path, tiny_bert)
    for name in ("truncated", "parent shard"):
        path, fragment = bad[name]
        r = cli_subprocess("inspect", path)
        assert r.returncode == 2, r.stderr
        assert_one_line_error(r.stderr, fragment)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("200kb") == 200_000
    assert parse_size("10MB") == 10**7
    assert parse_size("1GiB") == 2**30
    assert parse_size("1.5 MB") == 1_500_000
    assert parse_size("123") == 123
    for junk in ("", "abc", "5 parsecs", "-1GB", "0", "GB"):
        with pytest.raises(OtfuseError, match="invalid size"):
            parse_size(junk)


# ---------------------------------------------------------------------------------------------- writing

def _write_folder(target: Path, src, **kw) -> Path:
    prov = provenance("test", {"out": target.parent / "x", "widths": (1, 2), "dtype": torch.bfloat16}, [src])
    return write_checkpoint(target, ((k, src.get(k)) for k in src.keys()), layout="folder", source=src,
                            provenance=prov, **kw)


def test_write_is_byte_identical_and_round_trips(tmp_path, tiny_bert):
    src = open_checkpoint(tiny_bert["single"])
    a = _write_folder(tmp_path / "a", src, max_shard_size=parse_size("40KB"))
    b = _write_folder(tmp_path / "b", src, max_shard_size=parse_size("40KB"))
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    f1 = write_checkpoint(tmp_path / "f1.safetensors", src.state_dict(), layout="file")
    f2 = write_checkpoint(tmp_path / "f2.safetensors", src.state_dict(), layout="file")
    assert f1.read_bytes() == f2.read_bytes()
    for out in (a, f1):
        back = open_checkpoint(out)
        assert back.keys() == src.keys() and all(torch.equal(back.get(k), src.get(k)) for k in src.keys())
    assert _leftovers(tmp_path) == []


def test_sharded_write_loads_with_ecosystem(tmp_path, tiny_bert):
    from transformers import AutoModel

    src_dir = tmp_path / "src"
    shutil.copytree(tiny_bert["single"], src_dir)
    # assets that must travel, and files that must not
    (src_dir / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (src_dir / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    (src_dir / "spm.model").write_bytes(b"\x00sentencepiece")
    (src_dir / "training_args.bin").write_bytes(b"\x00" * 10)
    (src_dir / "otfuse.json").write_text("{}")
    src = open_checkpoint(src_dir)

    prov = provenance("fuse", {"alpha": 0.5}, [src])
    out = write_checkpoint(tmp_path / "out", ((k, src.get(k)) for k in src.keys()), layout="folder", source=src,
                           provenance=prov, max_shard_size=parse_size("20KB"),
                           config_overrides={"intermediate_size": 64, "otfuse_note": "x"})
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src.keys())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in src.state_dict().values())
    for s in shards:  # every shard: loadable by safetensors itself, within budget unless a lone big tensor
        tensors = load_file(s)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 20_000 or len(tensors) == 1
        meta = open_checkpoint(s).metadata
        assert meta["format"] == "pt" and json.loads(meta["otfuse"]) == prov

    model = AutoModel.from_pretrained(out)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], src.get(k)) for k in src.keys())

    # assets copied byte for byte; config key order kept, overrides applied; weights/otfuse.json not copied
    for name in ("vocab.txt", "tokenizer_config.json", "spm.model"):
        assert (out / name).read_bytes() == (src_dir / name).read_bytes()
    assert not (out / "training_args.bin").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert list(cfg)[: len(src.config)] == list(src.config) and cfg["otfuse_note"] == "x"
    assert json.loads((out / "otfuse.json").read_text()) == prov
    files = prov["inputs"][0]["files"]
    assert files["model.safetensors"] == hashlib.sha256((src_dir / "model.safetensors").read_bytes()).hexdigest()
    assert "vocab.txt" in files and "otfuse.json" not in files and "training_args.bin" not in files
    assert sha256_file(src_dir / "vocab.txt") == files["vocab.txt"]


def test_small_model_gets_one_file_and_shared_storage_is_fine(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"emb.weight": base, "head.weight": base, "row": base[1], "col": base[:, 1]}  # tied + views
    out = write_checkpoint(tmp_path / "m", tensors, layout="folder")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    back = load_file(out / "model.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def _failing(src, exc: BaseException, after: int):
    for i, k in enumerate(src.keys()):
        if i == after:
            raise exc
        yield k, src.get(k)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
@pytest.mark.parametrize("layout", ["folder", "file"])
def test_interrupted_write_leaves_nothing(tmp_path, tiny_bert, exc, layout):
    src = open_checkpoint(tiny_bert["single"])
    target = tmp_path / ("out" if layout == "folder" else "out.safetensors")
    with pytest.raises(type(exc)):
        # small shards: several are already on disk when the failure comes
        write_checkpoint(target, _failing(src, exc, after=30), layout=layout, source=src,
                         max_shard_size=parse_size("10KB"))
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_existing_target_refused_unless_force(tmp_path, tiny_bert):
    src = open_checkpoint(tiny_bert["single"])
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(OtfuseError, match="exists; use --force to overwrite"):
        write_checkpoint(target, src.state_dict(), layout="folder")
    assert (target / "keep.txt").read_text() == "old"
    # a failing forced write keeps the old output untouched
    with pytest.raises(RuntimeError):
        write_checkpoint(target, _failing(src, RuntimeError("x"), 5), layout="folder", force=True)
    assert (target / "keep.txt").read_text() == "old"
    write_checkpoint(target, src.state_dict(), layout="folder", force=True)
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert _leftovers(tmp_path) == []
    f = tmp_path / "f.safetensors"
    f.write_bytes(b"old")
    with pytest.raises(OtfuseError, match="exists"):
        write_checkpoint(f, src.state_dict(), layout="file")
    write_checkpoint(f, src.state_dict(), layout="file", force=True)
    assert open_checkpoint(f).keys() == src.keys()
    assert _leftovers(tmp_path) == []


def test_writer_rejects_bad_tensors(tmp_path):
    with pytest.raises(OtfuseError, match="no tensors"):
        write_checkpoint(tmp_path / "e", {}, layout="folder")
    with pytest.raises(OtfuseError, match="given twice"):
        write_checkpoint(tmp_path / "d", [("a", torch.zeros(1)), ("a", torch.zeros(1))], layout="folder")
    with pytest.raises(OtfuseError, match="not a tensor"):
        write_checkpoint(tmp_path / "n", {"a": [1, 2]}, layout="file")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OtfuseError, match="cannot write"):  # parent is a file: OS error -> one clear line
        write_checkpoint(tmp_path / "afile" / "out", {"a": torch.zeros(1)}, layout="folder")


def _plan_of(src):
    return [(k, src.dtype(k), src.shape(k)) for k in src.keys()]


@pytest.mark.parametrize("layout", ["folder", "file"])
def test_planned_write_streams_the_same_bytes_in_any_order(tmp_path, tiny_bert, layout):
    src = open_checkpoint(tiny_bert["single"])
    name = "out" if layout == "folder" else "out.safetensors"
    kw = {"layout": layout, "source": src, "max_shard_size": parse_size("20KB")}
    buffered = write_checkpoint(tmp_path / "buffered" / name, ((k, src.get(k)) for k in src.keys()), **kw)
    shuffled = list(reversed(src.keys()))  # arrival order does not matter: every tensor has its planned place
    streamed = write_checkpoint(tmp_path / "streamed" / name, ((k, src.get(k)) for k in shuffled),
                                planned=_plan_of(src), **kw)
    files = sorted(p.relative_to(buffered) for p in buffered.rglob("*")) if layout == "folder" else [Path()]
    assert files == (sorted(p.relative_to(streamed) for p in streamed.rglob("*")) if layout == "folder" else [Path()])
    for f in files:
        assert (buffered / f).read_bytes() == (streamed / f).read_bytes(), f
    shards = sorted(streamed.glob("*.safetensors")) if layout == "folder" else [streamed]
    assert layout == "file" or len(shards) > 2
    back = {k: v for s in shards for k, v in load_file(s).items()}  # safetensors' own reader is the oracle
    assert back.keys() == set(src.keys()) and all(torch.equal(back[k], src.get(k)) for k in src.keys())


def test_planned_write_holds_no_tensor_once_written(tmp_path, tiny_bert):
    import weakref

    src = open_checkpoint(tiny_bert["single"])
    alive = []

    def tensors():
        for k in src.keys():  # no gc.collect(): a tensor freed only by the cycle collector counts as held
            alive.append(sum(r() is not None for r in refs))
            t = src.get(k).clone()
            refs.append(weakref.ref(t.untyped_storage()))  # the storage outlives views and detached copies
            yield k, t
            del t

    refs: list = []
    write_checkpoint(tmp_path / "streamed", tensors(), layout="folder", planned=_plan_of(src), max_shard_size="1GB")
    assert len(alive) == len(src.keys()) > 10 and max(alive) == 0  # one shard, yet nothing buffered
    refs.clear(), alive.clear()
    write_checkpoint(tmp_path / "buffered", tensors(), layout="folder", max_shard_size="1GB")
    assert max(alive) == len(src.keys()) - 1  # the control: without a plan the shard is buffered


def test_planned_write_refuses_what_was_not_planned(tmp_path, tiny_bert):
    src = open_checkpoint(tiny_bert["single"])
    plan, keys = _plan_of(src), src.keys()
    cases = {"planned": [(k, src.get(k)) for k in keys[:-1]],  # one never comes
             "was not planned": [(k, src.get(k)) for k in keys] + [("extra", torch.zeros(1))],
             "written where": [(k, src.get(k).double() if i == 3 else src.get(k)) for i, k in enumerate(keys)]}
    for match, items in cases.items():
        for layout, name in (("folder", "out"), ("file", "out.safetensors")):
            with pytest.raises(ValueError, match=match):
                write_checkpoint(tmp_path / name, iter(items), layout=layout, planned=plan, max_shard_size="20KB")
            assert list(tmp_path.iterdir()) == []
