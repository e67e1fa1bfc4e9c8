"""Data from datasets (issue 31): `--data` as a parquet file, a folder of parquet shards, an Arrow folder written
by datasets' `save_to_disk` (a Dataset, or a DatasetDict: one folder per split), or the id of a dataset in the
Hugging Face datasets cache (`name` or `org/name`, `org/name:config` to pick a config; read offline).

Rows come in record batches through pyarrow (ParquetFile.iter_batches, one row group at a time; Arrow IPC streams
memory-mapped), never as a whole table: memory is one batch plus the records kept. With a subsample only the
row groups and batches holding a chosen row are decoded, and only the chosen rows become Python records. A row
whose text and binary cells pass inputs.RECORD_MAX_BYTES is refused, like a jsonl line of that size.

The records are plain dicts of the row's cells, so columns are chosen as for jsonl records (text / label /
source / target, --source-field / --target-field). The `datasets` package is imported only to resolve a
cached dataset id. Every bad input is one OtfuseError line."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from otfuse_cli import inputs, interrupts
from otfuse_cli.errors import OtfuseError

TABLE_SUFFIXES = (".parquet", ".arrow")
# Rows per batch decoded from a parquet row group: a batch of 256 short texts is tens of KB; of 256 book-sized
# records (inputs.RECORD_MAX_BYTES each) it is what reading those records costs anyway.
BATCH_ROWS = 256
# The Hub's shard names (push_to_hub, parquet exports): train-00000-of-00002.parquet
_SHARD = re.compile(r"^(?P<split>\w+(?:\.\w+)*)-\d{5}-of-\d{5}\.parquet$", re.IGNORECASE)
# A whole split in one file: train.parquet, test.parquet, ...
_SPLIT_NAMES = ("train", "validation", "valid", "dev", "test")
# How deep below a --data folder parquet files are looked for (a mistyped --data ~ must not walk the disk)
FOLDER_DEPTH = 3
# Hub repo ids (`name`, `org/name`), optionally `:config`
_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*(?::[\w.-]+)?$")


def looks_like_dataset_id(data: str) -> bool:
    """`name`, `org/name` or `org/name:config`, without a data file suffix (data.jsonl stays a file name)."""
    from otfuse_cli.data import RECORD_SUFFIXES, TENSOR_SUFFIXES

    suffix = Path(data.partition(":")[0]).suffix.lower()
    return bool(_ID.match(data)) and ".." not in data and suffix not in (*RECORD_SUFFIXES, *TENSOR_SUFFIXES,
                                                                          *TABLE_SUFFIXES)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0]


def _pa():
    import pyarrow  # noqa: F401  (a dependency of otfuse: say so plainly if an install lacks it)

    return pyarrow


@dataclass
class TableSource:
    """Rows of one split: `files` in reading order, all parquet or all Arrow IPC (kind)."""

    label: str  # what the user gave (a path or a dataset id), for messages and provenance
    files: list[Path]
    kind: str  # "parquet" | "arrow"
    split: str | None = None
    root: Path | None = None  # files are named relative to it in provenance

    @property
    def where(self) -> str:
        return f"{self.label} (split {self.split})" if self.split else self.label

    def _names(self) -> list[str]:
        out = []
        for f in self.files:
            try:
                out.append(f.relative_to(self.root).as_posix() if self.root else str(f))
            except ValueError:
                out.append(str(f))
        return out

    # ------------------------------------------------------------ reading

    def _refused(self, f: Path, e: BaseException) -> OtfuseError:
        what = "parquet" if self.kind == "parquet" else "an Arrow file"
        return OtfuseError(f"cannot read {f} as {what} ({_first_line(e)})")

    def _parquet(self, f: Path):
        import pyarrow.parquet as pq

        inputs.check_input(f, "data file", missing=f"data file not found: {f}")
        if os.stat(f).st_size == 0:
            raise OtfuseError(f"data file is empty: {f}")
        try:
            return pq.ParquetFile(str(f))
        except OtfuseError:
            raise
        except Exception as e:  # ArrowInvalid (not parquet), OSError, ...
            raise self._refused(f, e) from None

    def _chunks(self, f: Path) -> Iterator[tuple[int, object]]:
        """(rows, load) per row group (parquet) or record batch (Arrow): load() yields its record batches.
        A chunk that holds no wanted row is skipped without being decoded."""
        pa = _pa()
        if self.kind == "parquet":
            pf = self._parquet(f)
            try:
                meta = pf.metadata
                for g in range(meta.num_row_groups):
                    yield meta.row_group(g).num_rows, (lambda g=g: pf.iter_batches(batch_size=BATCH_ROWS,
                                                                                    row_groups=[g]))
            finally:
                pf.close()
            return
        inputs.check_input(f, "data file", missing=f"data file not found: {f}")
        if os.stat(f).st_size == 0:
            raise OtfuseError(f"data file is empty: {f}")
        try:
            with pa.memory_map(str(f)) as mm:  # zero-copy: a batch's buffers are read when its rows are
                try:
                    reader = pa.ipc.open_stream(mm)  # datasets writes IPC streams
                    batches = iter(reader)
                except pa.ArrowInvalid:
                    mm.seek(0)
                    file_reader = pa.ipc.open_file(mm)
                    batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
                for batch in batches:
                    yield batch.num_rows, (lambda b=batch: iter((b,)))
        except OtfuseError:
            raise
        except Exception as e:
            raise self._refused(f, e) from None

    def count(self) -> int:
        """Rows in the split (parquet: from the footers; Arrow: the batch headers)."""
        total = 0
        for f in self.files:
            if self.kind == "parquet":
                pf = self._parquet(f)
                try:
                    total += pf.metadata.num_rows
                finally:
                    pf.close()
            else:
                total += sum(rows for rows, _ in self._chunks(f))
        return total

    def _check_sizes(self, f: Path, batch, first_row: int) -> None:
        """A row whose text/binary cells pass inputs.RECORD_MAX_BYTES is refused (as a jsonl line would be)."""
        import numpy as np
        import pyarrow.compute as pc
        import pyarrow.types as pt

        sizes = np.zeros(batch.num_rows, np.int64)
        for column in batch.columns:
            t = column.type
            if pt.is_string(t) or pt.is_large_string(t) or pt.is_binary(t) or pt.is_large_binary(t):
                sizes += pc.binary_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        if batch.num_rows and int(sizes.max()) > inputs.RECORD_MAX_BYTES:
            row = first_row + int(np.argmax(sizes > inputs.RECORD_MAX_BYTES)) + 1
            raise OtfuseError(f"{self.where}: row {row} is larger than {inputs.human(inputs.RECORD_MAX_BYTES)}; "
                              "a record must be smaller")

    def records(self, keep: Sequence[int] | None = None) -> Iterator[dict]:
        """The rows as dicts, in file order; keep: sorted row indices (over the whole split) to yield only."""
        pa = _pa()
        wanted = iter(keep) if keep is not None else None
        nxt = next(wanted, None) if wanted is not None else None
        offset = 0
        for f in self.files:
            if wanted is not None and nxt is None:
                return
            for rows, load in self._chunks(f):
                interrupts.check()
                if wanted is not None and (nxt is None or nxt >= offset + rows):
                    offset += rows
                    continue
                batches = load()
                while True:
                    try:  # pyarrow's errors (a corrupt page, a bad batch) become one line; yields stay outside
                        batch = next(batches, None)
                        if batch is None:
                            break
                        self._check_sizes(f, batch, offset)
                        if wanted is None:
                            out = batch.to_pylist()
                        else:
                            idx = []
                            while nxt is not None and nxt < offset + batch.num_rows:
                                idx.append(nxt - offset)
                                nxt = next(wanted, None)
                            out = batch.take(pa.array(idx, pa.int64())).to_pylist() if idx else []
                    except OtfuseError:
                        raise
                    except Exception as e:
                        raise self._refused(f, e) from None
                    offset += batch.num_rows
                    yield from out

    # ------------------------------------------------------------ provenance

    def describe(self) -> dict:
        """{"file": what was given, "sha256", "split", "files"}: one file's own hash, or for several the hash of
        their names and hashes (in reading order)."""
        from otfuse_cli.checkpoint import sha256_file

        names = self._names()
        hashes = [sha256_file(f) for f in self.files]
        if len(hashes) == 1:
            digest = hashes[0]
        else:
            digest = hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in zip(names, hashes)).encode()).hexdigest()
        return {"file": self.label, "sha256": digest, "split": self.split, "files": names}

    def summary(self) -> dict:
        """What evaluate's JSON records next to the path (no hashing)."""
        return {"split": self.split, "files": self._names()}


# ---------------------------------------------------------------- resolving --data


def choose_split(splits: Sequence[str], split: str | None, where: str) -> str:
    """The split to read: --split, or the only one; otherwise one line naming the splits there are."""
    if split is None:
        if len(splits) == 1:
            return splits[0]
        raise OtfuseError(f"{where} holds the splits {', '.join(splits)}; choose one with --split")
    if split not in splits:
        raise OtfuseError(f"{where} has no split {split!r}; splits: {', '.join(splits) or 'none'}")
    return split


def _checked(source: TableSource) -> TableSource:
    """Every file of the split is a regular file (a FIFO named x.parquet would block its reader)."""
    for f in source.files:
        inputs.check_input(f, "data file", missing=f"data file not found: {f}")
    return source


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def _split_of(path: Path, folder: Path) -> str | None:
    """train-00000-of-00002.parquet, train.parquet or train/0000.parquet: split train; otherwise None."""
    if m := _SHARD.match(path.name):
        return m["split"]
    if path.stem.lower() in _SPLIT_NAMES:
        return path.stem
    parent = path.parent
    return parent.name if parent != folder and parent.name.lower() in _SPLIT_NAMES else None


def _parquet_folder(folder: Path, label: str, split: str | None) -> TableSource | None:
    """Parquet files in the folder and up to FOLDER_DEPTH folders below (hidden ones skipped: the Hub's
    data/train-00000-of-00002.parquet, the parquet export's default/train/0000.parquet), in natural order of
    their paths; named by split (see _split_of) they group into splits."""
    files = []
    try:
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
            depth = len(Path(dirpath).relative_to(folder).parts)
            dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(".")] if depth < FOLDER_DEPTH else []
            files += [Path(dirpath, n) for n in filenames if n.lower().endswith(".parquet") and not n.startswith(".")]
    except OSError as e:
        raise OtfuseError(f"cannot read {folder}: {e.strerror or e}") from None
    if not files:
        return None
    files.sort(key=lambda p: _natural(p.relative_to(folder)))
    splits = {f: _split_of(f, folder) for f in files}
    named = [f for f in files if splits[f] is not None]
    if not named:
        if split is not None:
            raise OtfuseError(f"--split {split}: the parquet files in {label} are not split shards "
                              "(<split>-00000-of-00002.parquet, train.parquet, ...); the folder is read whole")
        return _checked(TableSource(label, files, "parquet", None, folder))
    if len(named) != len(files):
        other = next(f for f in files if splits[f] is None)
        raise OtfuseError(f"{label} mixes split shards ({named[0].name}) with other parquet files "
                          f"({other.relative_to(folder).as_posix()}); give a folder of one kind or a file")
    names = list(dict.fromkeys(splits[f] for f in files))
    chosen = choose_split(names, split, label)
    return _checked(TableSource(label, [f for f in files if splits[f] == chosen], "parquet", chosen, folder))


def _saved_dataset(folder: Path, label: str, split: str | None, dict_split: str | None = None,
                   root: Path | None = None) -> TableSource:
    """A Dataset.save_to_disk folder: state.json lists its Arrow files in order."""
    state = inputs.load_json(folder / "state.json", "dataset state file")
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not files or not all(
            isinstance(x, dict) and isinstance(x.get("filename"), str) for x in files):
        raise OtfuseError(f"{folder / 'state.json'}: no list of data files (_data_files); not a save_to_disk "
                          "dataset folder")
    paths = []
    for entry in files:
        name = entry["filename"]
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise OtfuseError(f"{folder / 'state.json'}: data file name {name!r} is not a file name in the folder")
        paths.append(folder / name)
    own = state.get("_split") if isinstance(state.get("_split"), str) else None
    if dict_split is not None:
        own = dict_split
    elif split is not None and split != own:
        held = f"split {own!r}" if own else "no named split"
        raise OtfuseError(f"--split {split}: {label} is one saved Dataset ({held}); --split picks a split of a "
                          "DatasetDict folder, a folder of split shards or a dataset id")
    return _checked(TableSource(label, paths, "arrow", own, root or folder))


def _folder(folder: Path, label: str, split: str | None) -> TableSource:
    if (folder / "dataset_dict.json").exists():
        info = inputs.load_json(folder / "dataset_dict.json", "dataset dict file")
        splits = info.get("splits") if isinstance(info, dict) else None
        if not isinstance(splits, list) or not all(isinstance(s, str) and s and "/" not in s and s not in (".", "..")
                                                   for s in splits):
            raise OtfuseError(f"{folder / 'dataset_dict.json'}: no list of split names (splits)")
        if not splits:
            raise OtfuseError(f"{label}: the DatasetDict holds no splits")
        chosen = choose_split(splits, split, label)
        sub = folder / chosen
        inputs.check_input(sub, "split folder", folder=True, file=False,
                           missing=f"{label}: split {chosen!r} is listed but its folder {sub} is missing")
        if not (sub / "state.json").exists():
            raise OtfuseError(f"{sub}: no state.json; not a save_to_disk split folder")
        return _saved_dataset(sub, label, split, dict_split=chosen, root=folder)
    if (folder / "state.json").exists():
        return _saved_dataset(folder, label, split)
    if source := _parquet_folder(folder, label, split):
        return source
    raise OtfuseError(f"data folder {label} holds no parquet files, no save_to_disk dataset (state.json) and no "
                      "DatasetDict (dataset_dict.json)")


def _cached_dataset(data: str, split: str | None) -> TableSource:
    """A dataset id in the Hugging Face datasets cache, found offline by datasets' own cache builder."""
    import importlib.util

    repo, _, config = data.partition(":")
    if importlib.util.find_spec("datasets") is None:
        raise OtfuseError(f"data file not found: {data} (read as a dataset id, it comes from the Hugging Face "
                          "datasets cache, which needs the datasets package: pip install 'otfuse-cli[datasets]')")
    try:
        import datasets
        from datasets.naming import camelcase_to_snakecase, filenames_for_dataset_split
        from datasets.packaged_modules.cache.cache import Cache
    except ImportError as e:  # a datasets too old (or too new) for its offline cache builder
        raise OtfuseError(f"cannot read dataset ids with this datasets package ({datasets_version()}): "
                          f"{_first_line(e)}") from None
    cache_dir = os.environ.get("HF_DATASETS_CACHE") or str(datasets.config.HF_DATASETS_CACHE)
    parts = repo.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = Path(cache_dir).expanduser() / "___".join(parts)
    try:  # <cache>/<org>___<name>/<config>/<version>/<hash>/
        configs = sorted({p.parent.parent.name for p in root.glob("*/*/*") if p.is_dir()}) if root.is_dir() else []
    except OSError as e:
        raise OtfuseError(f"cannot read the datasets cache at {root}: {e.strerror or e}") from None
    if not configs:
        raise OtfuseError(f"data file not found: {data}, and no dataset {repo!r} in the Hugging Face datasets cache "
                          f"({cache_dir}); otfuse reads datasets offline: load it once with datasets.load_dataset, "
                          "or give a file or folder")
    if config and config not in configs:
        raise OtfuseError(f"dataset {repo!r} has no config {config!r} in the datasets cache; cached: "
                          f"{', '.join(configs)}")
    if not config and len(configs) > 1:
        raise OtfuseError(f"dataset {repo!r} has several configs in the datasets cache ({', '.join(configs)}); "
                          f"name one as --data {repo}:{configs[0]}")
    logger = datasets.utils.logging
    verbosity = logger.get_verbosity()
    logger.set_verbosity_error()  # "Found the latest cached dataset configuration ..." is not for our stderr
    try:
        builder = Cache(cache_dir=cache_dir, repo_id=repo, dataset_name=repo.split("/")[-1],
                        config_name=config or configs[0], version="auto", hash="auto")
        split_infos = builder.info.splits
    except Exception as e:
        raise OtfuseError(f"cannot read dataset {data!r} from the datasets cache ({_first_line(e)})") from None
    finally:
        logger.set_verbosity(verbosity)
    if not split_infos:
        raise OtfuseError(f"dataset {data!r} in the datasets cache ({builder.cache_dir}) records no splits")
    chosen = choose_split(list(split_infos), split, f"dataset {data!r}")
    info = split_infos[chosen]
    files = [Path(f) for f in filenames_for_dataset_split(builder.cache_dir, dataset_name=builder.dataset_name,
                                                           split=chosen, filetype_suffix="arrow",
                                                           shard_lengths=info.shard_lengths)]
    for f in files:
        inputs.check_input(f, "cached data file",
                           missing=f"dataset {data!r}: the cache lists split {chosen!r} but {f} is missing")
    return TableSource(data, files, "arrow", chosen, Path(cache_dir).expanduser())


def datasets_version() -> str:
    try:
        from importlib.metadata import version

        return f"datasets {version('datasets')}"
    except Exception:
        return "datasets"


def open_source(data: str | os.PathLike, split: str | None = None) -> TableSource | None:
    """The table `data` names (parquet file or folder, save_to_disk folder, DatasetDict folder with `split`,
    cached dataset id), resolved but not read; None for the other data files (jsonl, csv, npz, ...), which
    data.py reads. A path that exists is a path; an id is looked up only when no such file or folder exists."""
    data = os.fspath(data)
    path = Path(data)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except (ValueError, OSError):  # a NUL byte, a permission error: inputs.check_input says which
        return None
    if st is None:
        return _cached_dataset(data, split) if looks_like_dataset_id(data) else None
    if stat.S_ISDIR(st.st_mode):
        return _folder(path, data, split)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        return None
    inputs.check_input(path, "data file", missing=f"data file not found: {path}")
    if split is not None:
        raise no_split(data, split)
    return TableSource(data, [path], "parquet" if suffix == ".parquet" else "arrow", None, path.parent)


def no_split(data: str, split: str) -> OtfuseError:
    return OtfuseError(f"--split {split}: {data} is a single file; --split picks a split of a DatasetDict folder, "
                       "a folder of split shards or a dataset id")
