"""--data from datasets (issue 31): parquet files and folders of shards, save_to_disk folders (Dataset and
DatasetDict with --split), and dataset ids in the Hugging Face datasets cache, read offline. The data is written
here with `datasets` / pyarrow themselves; the oracle is the rows written (and the library's own reader)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error, cli

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from otfuse_cli import inputs, tables  # noqa: E402
from otfuse_cli.data import check_source, load_records, source_record, subsample  # noqa: E402
from otfuse_cli.errors import OtfuseError  # noqa: E402

SENTIMENT = Path(__file__).resolve().parents[1] / "fixtures" / "sentiment"
BERT_A, BERT_B = SENTIMENT / "bert_a", SENTIMENT / "bert_b"
ROWS = [json.loads(line) for line in (SENTIMENT / "test.jsonl").read_text().splitlines()][:120]


@pytest.fixture(autouse=True)
def _quiet_datasets():
    datasets.disable_progress_bars()
    yield


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face datasets cache under tmp_path, offline."""
    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    return cache


def table(rows=ROWS):
    return datasets.Dataset.from_list(list(rows))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def refused(*args, fragment: str = ""):
    res = cli(*args)
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert_one_line_error(res.stderr, fragment)
    return res.stderr


# ---------------------------------------------------------------- what is read equals what was written


def test_parquet_rows_equal_the_rows_written(tmp_path):
    rows = [{"text": t, "label": i % 3, "score": i / 7, "tags": [i, i + 1], "note": None if i % 2 else "é ✓"}
            for i, t in enumerate(["a", "bb", "ccc ünïcode", "", "x" * 1000] * 40)]
    path = tmp_path / "mixed.parquet"
    table(rows).to_parquet(path, batch_size=17)  # many row groups
    assert pq.ParquetFile(path).metadata.num_row_groups > 5
    got = load_records(path)
    assert got == rows
    assert got == pq.read_table(path).to_pylist()  # the library's own reader agrees
    # a subsample picks the rows the same choice picks from the same rows as jsonl
    jsonl = write_jsonl(tmp_path / "mixed.jsonl", rows)
    for n, seed in ((1, 0), (13, 5), (199, 1), (10_000, 2)):
        assert load_records(path, max_samples=n, seed=seed) == load_records(jsonl, max_samples=n, seed=seed)


def test_evaluate_on_parquet_equals_evaluate_on_the_same_jsonl(tmp_path):
    jsonl = write_jsonl(tmp_path / "test.jsonl", ROWS)
    parquet = tmp_path / "test.parquet"
    table().to_parquet(parquet)
    docs = {}
    for name, data in (("jsonl", jsonl), ("parquet", parquet)):
        for extra in ((), ("--max-samples", "40", "--seed", "3")):
            res = cli("evaluate", BERT_A, "--data", data, "--json", *extra)
            assert res.exit_code == 0, res.output
            docs[name, extra] = json.loads(res.stdout)
    for extra in ((), ("--max-samples", "40", "--seed", "3")):
        a, b = docs["jsonl", extra], docs["parquet", extra]
        assert a["task"] == b["task"] == "classification"
        assert a["rows"] == b["rows"]  # accuracy, F1, ECE, NLL: identical
        assert a["data"]["samples"] == b["data"]["samples"] == (40 if extra else len(ROWS))
    doc = docs["parquet", ()]
    assert doc["data"] == {"path": str(parquet), "samples": len(ROWS), "split": None, "files": ["test.parquet"]}
    assert 0.5 < doc["rows"][0]["accuracy"] <= 1.0


def test_a_folder_of_shards_is_read_in_order(tmp_path):
    folder = tmp_path / "shards" / "data"
    folder.mkdir(parents=True)
    ds = table()
    # written last-first: the order comes from the names, not from the file system
    for i in reversed(range(4)):
        ds.select(range(i * 30, i * 30 + 30)).to_parquet(folder / f"train-{i:05d}-of-00004.parquet", batch_size=8)
    got = load_records(tmp_path / "shards")
    assert got == ROWS
    assert got == [r for f in sorted(folder.iterdir()) for r in pq.read_table(f).to_pylist()]
    info = source_record(tmp_path / "shards")
    assert info["split"] == "train"
    assert info["files"] == [f"data/train-{i:05d}-of-00004.parquet" for i in range(4)]
    # shards without split names: natural order (part-2 before part-10), the folder read whole
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in (10, 2, 1):
        table([{"text": f"row {i}", "label": i}]).to_parquet(plain / f"part-{i}.parquet")
    assert [r["label"] for r in load_records(plain)] == [1, 2, 10]
    # two splits of shards: --split picks one
    ds.select(range(5)).to_parquet(folder / "test-00000-of-00001.parquet")
    assert load_records(tmp_path / "shards", split="test") == ROWS[:5]
    assert load_records(tmp_path / "shards", split="train") == ROWS
    with pytest.raises(OtfuseError, match="holds the splits test, train; choose one with --split"):
        load_records(tmp_path / "shards")
    # the Hub's parquet export: <config>/<split>/0000.parquet
    export = tmp_path / "export" / "default"
    for split, rows in (("train", ROWS[:50]), ("validation", ROWS[50:])):
        (export / split).mkdir(parents=True)
        table(rows[:25]).to_parquet(export / split / "0000.parquet")
        table(rows[25:]).to_parquet(export / split / "0001.parquet")
    assert load_records(tmp_path / "export", split="validation") == ROWS[50:]
    assert load_records(tmp_path / "export", split="train") == ROWS[:50]


def test_save_to_disk_folder(tmp_path):
    ds = table()
    ds.save_to_disk(tmp_path / "saved", num_shards=3)
    assert len(list((tmp_path / "saved").glob("*.arrow"))) == 3
    assert load_records(tmp_path / "saved") == ROWS == datasets.load_from_disk(tmp_path / "saved").to_list()
    assert load_records(tmp_path / "saved", max_samples=9, seed=4) == load_records(
        write_jsonl(tmp_path / "same.jsonl", ROWS), max_samples=9, seed=4)
    info = source_record(tmp_path / "saved")
    assert info["files"] == [f"data-{i:05d}-of-00003.arrow" for i in range(3)] and len(info["sha256"]) == 64


def test_dataset_dict_and_split(tmp_path):
    dd = datasets.DatasetDict(train=table(ROWS[:100]), test=table(ROWS[100:]))
    dd.save_to_disk(tmp_path / "dd")
    assert load_records(tmp_path / "dd", split="test") == ROWS[100:]
    assert load_records(tmp_path / "dd", split="test") == datasets.load_from_disk(tmp_path / "dd")["test"].to_list()
    assert load_records(tmp_path / "dd", split="train") == ROWS[:100]
    with pytest.raises(OtfuseError, match=r"holds the splits train, test; choose one with --split"):
        load_records(tmp_path / "dd")
    with pytest.raises(OtfuseError, match=r"has no split 'dev'; splits: train, test"):
        load_records(tmp_path / "dd", split="dev")
    # one split: used without --split
    datasets.DatasetDict(validation=table(ROWS[:7])).save_to_disk(tmp_path / "one")
    assert load_records(tmp_path / "one") == ROWS[:7]
    assert source_record(tmp_path / "one")["split"] == "validation"
    # evaluate with --split records the split and files it read
    res = cli("evaluate", BERT_A, "--data", tmp_path / "dd", "--split", "test", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["data"] == {"path": str(tmp_path / "dd"), "samples": 20, "split": "test",
                           "files": ["test/data-00000-of-00001.arrow"]}
    ref = cli("evaluate", BERT_A, "--data", write_jsonl(tmp_path / "test.jsonl", ROWS[100:]), "--json")
    assert json.loads(ref.stdout)["rows"] == doc["rows"]


def _cache_entry(tmp_path: Path, name: str, splits: dict) -> None:
    """A dataset cached by the datasets library itself: load_dataset on a local folder of split shards named
    `name` writes the cache entry `name` (what loading a Hub dataset `name` writes, too)."""
    src = tmp_path / "sources" / name
    (src / "data").mkdir(parents=True)
    for split, rows in splits.items():
        table(rows).to_parquet(src / "data" / f"{split}-00000-of-00001.parquet")
    datasets.load_dataset(str(src), cache_dir=os.environ["HF_DATASETS_CACHE"])


def test_cached_dataset_id_offline(tmp_path, offline_cache, monkeypatch):
    _cache_entry(tmp_path, "toy", {"train": ROWS[:90], "test": ROWS[90:]})
    assert (offline_cache / "toy").is_dir()
    # a Hub id org/toy is cached under org___toy with the same layout
    shutil.copytree(offline_cache / "toy", offline_cache / "org___toy")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no file or folder named toy here
    for dataset_id in ("toy", "org/toy"):
        assert load_records(dataset_id, split="test") == ROWS[90:]
        assert load_records(dataset_id, split="train") == ROWS[:90]
        assert load_records(dataset_id, split="test") == datasets.load_dataset(
            dataset_id, split="test", cache_dir=str(offline_cache)).to_list()
        with pytest.raises(OtfuseError, match="holds the splits train, test; choose one with --split"):
            load_records(dataset_id)
    info = source_record("org/toy", "test")
    assert info["file"] == "org/toy" and info["split"] == "test"
    assert info["files"][0].startswith("org___toy/default/") and info["files"][0].endswith("/toy-test.arrow")
    res = cli("evaluate", BERT_A, "--data", "org/toy", "--split", "test", "--json")
    assert res.exit_code == 0, res.output
    assert res.stderr == ""  # datasets' cache messages stay out of otfuse's stderr
    doc = json.loads(res.stdout)
    assert doc["data"]["samples"] == 30 and doc["data"]["split"] == "test"
    ref = cli("evaluate", BERT_A, "--data", write_jsonl(tmp_path / "ref.jsonl", ROWS[90:]), "--json")
    assert json.loads(ref.stdout)["rows"] == doc["rows"]
    # several configs cached: name one as ID:CONFIG
    shutil.copytree(offline_cache / "toy" / "default", offline_cache / "toy" / "other")
    info_file = next((offline_cache / "toy" / "other").glob("*/*/dataset_info.json"))
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), "config_name": "other"}))
    with pytest.raises(OtfuseError, match=r"several configs in the datasets cache \(default, other\); name one "
                                          r"as --data toy:default"):
        load_records("toy", split="test")
    assert load_records("toy:other", split="test") == ROWS[90:]
    with pytest.raises(OtfuseError, match="no config 'nope' in the datasets cache; cached: default, other"):
        load_records("toy:nope", split="test")


def test_uncached_id_and_missing_datasets_package_are_one_line(tmp_path, offline_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = refused("evaluate", BERT_A, "--data", "org/not-cached", "--split", "test")
    assert "data file not found: org/not-cached, and no dataset 'org/not-cached' in the Hugging Face datasets " \
           f"cache ({offline_cache})" in err
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "datasets" else find_spec(name, *a))
    refused("evaluate", BERT_A, "--data", "org/not-cached", fragment="needs the datasets package")
    # a file name is a file name: never looked up as an id
    refused("evaluate", BERT_A, "--data", "missing.parquet", fragment="data file not found: missing.parquet")


# ---------------------------------------------------------------- every command that takes --data


def test_align_and_stats_on_datasets_record_what_was_read(tmp_path):
    dd = datasets.DatasetDict(train=table(ROWS[:40]), test=table(ROWS[40:60]))
    dd.save_to_disk(tmp_path / "dd")
    plans = tmp_path / "plans.safetensors"
    res = cli("align", BERT_A, BERT_B, "-o", plans, "--align", "activations", "--data", tmp_path / "dd",
              "--split", "train", "--samples", "16", "--max-tokens", "256")
    assert res.exit_code == 0, res.output
    from safetensors import safe_open

    with safe_open(plans, "pt") as f:
        data = json.loads(f.metadata()["otfuse.plans"])["data"]
    assert data["file"] == str(tmp_path / "dd") and data["split"] == "train" and data["samples"] == 16
    assert data["files"] == ["train/data-00000-of-00001.arrow"]
    assert data["sha256"] == source_record(tmp_path / "dd", "train")["sha256"]
    # the same plans from the same rows as jsonl
    jsonl = write_jsonl(tmp_path / "train.jsonl", ROWS[:40])
    res = cli("align", BERT_A, BERT_B, "-o", tmp_path / "ref.safetensors", "--align", "activations", "--data",
              jsonl, "--samples", "16", "--max-tokens", "256")
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    mine, ref = load_file(plans), load_file(tmp_path / "ref.safetensors")
    assert mine.keys() == ref.keys() and all((mine[k] == ref[k]).all() for k in mine)
    res = cli("stats", BERT_A, "--data", tmp_path / "dd", "--split", "test", "-o", tmp_path / "a.stats.safetensors",
              "--kind", "gram", "--samples", "8", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)["data"]
    assert info["split"] == "test" and info["samples"] == 8 and info["files"] == ["test/data-00000-of-00001.arrow"]


def test_recipe_data_section_takes_a_dataset(tmp_path, offline_cache, monkeypatch):
    from otfuse_cli.recipe import _group

    recipe = tmp_path / "jobs" / "r.yaml"
    recipe.parent.mkdir()
    (recipe.parent / "shards").mkdir()
    group = _group("data", {"data": "shards", "split": "train"}, recipe)
    assert group.data == str(recipe.parent / "shards") and group.split == "train"  # a folder beside the recipe
    group = _group("data", {"data": "org/toy", "split": "test"}, recipe)
    assert group.data == "org/toy" and group.split == "test"  # no such path there: a dataset id
    assert _group("data", {"data": "calib.jsonl"}, recipe).data == str(recipe.parent / "calib.jsonl")


# ---------------------------------------------------------------- bad input: one line, exit 2


def test_bad_datasets_are_one_line(tmp_path, monkeypatch):
    t = tmp_path
    table([{"text": r["text"]} for r in ROWS[:10]]).to_parquet(t / "nolabel.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}),
                   t / "norows.parquet")
    (t / "empty.parquet").write_bytes(b"")
    (t / "garbage.parquet").write_bytes(b"this is not parquet at all" * 10)
    good = t / "good.parquet"
    table(ROWS[:10]).to_parquet(good)
    (t / "truncated.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    datasets.DatasetDict(train=table(ROWS[:5]), test=table(ROWS[5:9])).save_to_disk(t / "dd")
    table(ROWS[:5]).save_to_disk(t / "saved")
    shutil.copytree(t / "saved", t / "corrupt")
    arrow = next((t / "corrupt").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:40])
    shutil.copytree(t / "saved", t / "lost")
    next((t / "lost").glob("*.arrow")).unlink()
    (t / "nothing").mkdir()
    (t / "nothing" / "readme.txt").write_text("hi")
    (t / "mixed").mkdir()
    table(ROWS[:3]).to_parquet(t / "mixed" / "train-00000-of-00001.parquet")
    table(ROWS[:3]).to_parquet(t / "mixed" / "extra.parquet")
    (t / "split_of_saved").mkdir()
    E = ("evaluate", BERT_A, "--data")
    cases = [
        ((*E, t / "nolabel.parquet", "--task", "classification"), "missing field 'label'"),
        ((*E, t / "norows.parquet"), "data has no records"),
        ((*E, t / "empty.parquet"), "data file is empty"),
        ((*E, t / "garbage.parquet"), "cannot read"),
        ((*E, t / "truncated.parquet"), "cannot read"),
        ((*E, t / "corrupt"), "cannot read"),
        ((*E, t / "lost"), "data file not found"),
        ((*E, t / "dd"), "holds the splits train, test; choose one with --split"),
        ((*E, t / "dd", "--split", "dev"), "has no split 'dev'; splits: train, test"),
        ((*E, t / "saved", "--split", "test"), "one saved Dataset"),
        ((*E, good, "--split", "train"), "is a single file"),
        ((*E, SENTIMENT / "test.jsonl", "--split", "train"), "is a single file"),
        ((*E, SENTIMENT.parent / "digits" / "test.safetensors", "--split", "train"), "is a single file"),
        ((*E, t / "nothing"), "holds no parquet files"),
        ((*E, t / "mixed"), "mixes split shards"),
        (("fuse", BERT_A, BERT_B, "-o", t / "o", "--split", "train"), "--split"),
        (("align", BERT_A, BERT_B, "-o", t / "p.safetensors", "--align", "activations", "--data", t / "dd"),
         "choose one with --split"),
        (("align", BERT_A, BERT_B, "-o", t / "p.safetensors", "--data", t / "dd", "--split", "train"),
         "does not apply"),
        (("stats", BERT_A, "--data", t / "dd", "--split", "dev", "-o", t / "s.safetensors"), "has no split 'dev'"),
        (("compress", BERT_A, "-o", t / "c", "--width", "ffn=32", "--align", "activations", "--data",
          t / "nolabel.parquet", "--split", "x"), "is a single file"),
    ]
    for args, fragment in cases:
        refused(*args, fragment=fragment)
    assert not any((t / n).exists() for n in ("o", "p.safetensors", "s.safetensors", "c"))
    # a row larger than the record limit is refused like a jsonl line of that size
    monkeypatch.setattr(inputs, "RECORD_MAX_BYTES", 100)
    first = next(i for i, r in enumerate(ROWS[:10], 1) if len(r["text"].encode()) > 100)
    refused(*E, good, fragment=f"good.parquet: row {first} is larger than 100 bytes")


def test_a_fifo_among_the_shards_is_refused(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    table(ROWS[:3]).to_parquet(tmp_path / "train-00000-of-00002.parquet")
    os.mkfifo(tmp_path / "train-00001-of-00002.parquet")
    with pytest.raises(OtfuseError, match="FIFO"):
        check_source(tmp_path)
    with pytest.raises(OtfuseError, match="FIFO"):
        load_records(tmp_path)


# ---------------------------------------------------------------- streaming


def test_parquet_is_streamed_in_batches_not_materialised(tmp_path, monkeypatch):
    """Only ParquetFile.iter_batches reads rows, one row group at a time; with a subsample only the row groups
    that hold a chosen row are decoded, and neither Arrow's nor Python's memory grows with the file."""
    import tracemalloc

    n, group = 40_000, 500
    path = tmp_path / "big.parquet"
    text = pa.array([f"review {i} " + "w" * 200 for i in range(n)])
    pq.write_table(pa.table({"text": text, "label": pa.array([i % 2 for i in range(n)])}), path,
                   row_group_size=group)
    del text
    size_decoded = n * 210
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == n // group

    def forbidden(*a, **k):
        raise AssertionError("the whole table (or a whole row group) was read")

    for name in ("read", "read_row_group", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, name, forbidden)
    monkeypatch.setattr(pq, "read_table", forbidden)
    calls, peak = [], [0]
    pool = pa.default_memory_pool()
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        for batch in real(self, *args, **kwargs):
            peak[0] = max(peak[0], pool.bytes_allocated())
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    base = pool.bytes_allocated()
    tracemalloc.start()
    try:
        got = load_records(path, max_samples=10, seed=1)
        _, py_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(got) == 10 and all(r["text"].startswith("review ") for r in got)
    assert calls and all(c.get("batch_size") == tables.BATCH_ROWS and len(c.get("row_groups")) == 1 for c in calls)
    assert len(calls) <= 10  # only the row groups holding a chosen row
    assert py_peak < size_decoded / 20, py_peak  # not the file's rows as Python objects
    assert peak[0] - base < size_decoded / 10, (peak[0], base)  # nor the file as Arrow buffers
    # a full read goes through every row group, still batch by batch
    calls.clear()
    seen = sum(1 for _ in tables.open_source(path).records())
    assert seen == n and len(calls) == meta.num_row_groups
    assert peak[0] - base < size_decoded / 10


def test_arrow_folders_are_read_batch_by_batch(tmp_path):
    """save_to_disk folders (and the datasets cache) are memory-mapped Arrow streams: a subsample turns only
    its rows into Python objects, and Arrow allocates no copy of the file."""
    import tracemalloc

    n = 40_000
    ds = datasets.Dataset.from_dict({"text": [f"review {i} " + "w" * 200 for i in range(n)],
                                     "label": [i % 2 for i in range(n)]})
    ds.save_to_disk(tmp_path / "saved", num_shards=2)
    del ds
    size_decoded = n * 210
    pool = pa.default_memory_pool()
    base = pool.bytes_allocated()
    # resolved first: reading state.json (inputs.read_small) reserves its 64 MiB cap for a moment, untouched
    source = tables.open_source(tmp_path / "saved")
    tracemalloc.start()
    try:
        got = list(source.records(subsample(range(source.count()), 10, 2)))
        _, py_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == load_records(tmp_path / "saved", max_samples=10, seed=2)
    assert [int(r["text"].split()[1]) % 2 for r in got] == [r["label"] for r in got]
    assert py_peak < size_decoded / 20, py_peak
    assert pool.bytes_allocated() - base < size_decoded / 10
    assert len(load_records(tmp_path / "saved")) == n
