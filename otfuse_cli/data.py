"""Sample and evaluation data: text records (.jsonl/.csv/.tsv/.txt), tensors (.npz/.safetensors), and tables from
datasets (parquet files and folders, save_to_disk folders, cached dataset ids: tables.py), whose rows become the
same records.

Shared by `evaluate` and by activation-based alignment. Every bad input is one OtfuseError line.
"""

from __future__ import annotations

import contextvars
import csv
import io
import json
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import torch

from otfuse_cli import inputs, interrupts, tables
from otfuse_cli.errors import OtfuseError

RECORD_SUFFIXES = (".jsonl", ".csv", ".tsv", ".txt")
TENSOR_SUFFIXES = (".npz", ".safetensors")


def is_tensor_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in TENSOR_SUFFIXES


def _check_file(path: Path, kinds: Sequence[str]) -> None:
    """A regular file (never a FIFO or device: inputs.check_input) of a known kind, not empty."""
    st = inputs.check_input(path, "data file", missing=f"data file not found: {path}")
    if path.suffix.lower() not in kinds:
        raise OtfuseError(f"unknown data file type {path.suffix or '(none)'!r} for {path} "
                          f"(expected one of {', '.join(RECORD_SUFFIXES + TENSOR_SUFFIXES + tables.TABLE_SUFFIXES)}, "
                          "a dataset folder or a cached dataset id)")
    if st.st_size == 0:
        raise OtfuseError(f"data file is empty: {path}")


def subsample(items: Sequence, max_samples: int | None, seed: int = 0) -> list:
    """A seeded subsample of at most max_samples items, kept in file order (deterministic)."""
    if max_samples is not None and max_samples < 1:
        raise OtfuseError(f"max_samples must be at least 1, got {max_samples}")
    if max_samples is None or len(items) <= max_samples:
        return list(items)
    idx = sorted(random.Random(seed).sample(range(len(items)), max_samples))
    return [items[i] for i in idx]


def _decoded(path: Path, number: int, offset: int, raw: bytes) -> str:
    """One line as text: UTF-8 (a BOM from a spreadsheet export tolerated at the start of the file)."""
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw, offset = raw[3:], offset + 3
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OtfuseError(f"{path} is not UTF-8 text ({e.reason} at byte {offset + e.start})") from None


def _text_values(path: Path, where: int, record: dict) -> dict:
    """A record's text must be text: JSON's \\ud800 escapes decode to lone UTF-16 surrogates, which no
    tokenizer (and no UTF-8 writer) accepts."""
    for key, value in record.items():
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise OtfuseError(f"{path}:{where}: field {key!r} holds a lone UTF-16 surrogate "
                                  f"({value[e.start]!r}), not text") from None
    return record


def _jsonl(path: Path):
    for number, offset, raw in inputs.iter_lines(path):
        text = _decoded(path, number, offset, raw)
        if not text.strip():
            continue
        if inputs.too_deep(raw):
            raise OtfuseError(f"{path}:{number}: JSON nested deeper than {inputs.MAX_DEPTH} levels")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise OtfuseError(f"{path}:{number}: malformed JSON line ({e.msg})") from None
        except ValueError as e:  # an integer of more than 4300 digits
            raise OtfuseError(f"{path}:{number}: malformed JSON line ({e})") from None
        except RecursionError:  # last resort: too_deep should have said so
            raise OtfuseError(f"{path}:{number}: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise OtfuseError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        yield _text_values(path, number, obj)


def _table(path: Path, delimiter: str):
    """csv/tsv rows as records. Lines come in bounded chunks (inputs.iter_lines) and a row, which quoted
    newlines may spread over several lines, is refused once it passes inputs.RECORD_MAX_BYTES; csv's own
    field limit is raised to the same size while reading (its default, 128 KiB, refused real long texts
    with a traceback)."""
    row_bytes = [0]
    line = [1]

    def lines():
        for number, offset, raw in inputs.iter_lines(path):
            line[0] = number
            row_bytes[0] += len(raw) + 1
            if row_bytes[0] > inputs.RECORD_MAX_BYTES:
                raise OtfuseError(f"{path}:{number}: a row longer than {inputs.human(inputs.RECORD_MAX_BYTES)}; "
                                  "a record must be smaller")
            # split again at a lone \r, as a file opened with newline="" is (old Mac line ends)
            yield from io.StringIO(_decoded(path, number, offset, raw) + "\n", newline="")

    limit = csv.field_size_limit()
    csv.field_size_limit(inputs.RECORD_MAX_BYTES)
    try:
        reader = csv.DictReader(lines(), delimiter=delimiter)
        try:
            fields = reader.fieldnames
            row_bytes[0] = 0
            if not fields:
                raise OtfuseError(f"data file is empty: {path}")
            for row in reader:
                row_bytes[0] = 0
                if None in row:  # more cells than header columns: a mis-split file
                    raise OtfuseError(f"{path}:{reader.line_num}: row has more cells than the header "
                                      f"({len(fields)} columns)")
                yield {k: v for k, v in row.items()}
        except csv.Error as e:  # a NUL byte, a field past the limit, a stray quote at the end...
            raise OtfuseError(f"{path}:{line[0]}: not a readable {path.suffix.lstrip('.')} row ({e})") from None
    finally:
        csv.field_size_limit(limit)


def _text_lines(path: Path):
    for number, offset, raw in inputs.iter_lines(path):
        text = _decoded(path, number, offset, raw)
        text = text[:-1] if text.endswith("\r") else text
        if text.strip():
            yield {"text": text}


def _records(path: Path):
    """The file's records, one at a time (memory: one record)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl(path)
    if suffix in (".csv", ".tsv"):
        return _table(path, "\t" if suffix == ".tsv" else ",")
    return _text_lines(path)


def check_source(data: str | Path, split: str | None = None) -> None:
    """--data names something readable, checked before any model loads: a regular data file (a FIFO or device
    would block its reader), or a table (tables.open_source: parquet, save_to_disk folder, cached dataset id)
    whose split exists."""
    if tables.open_source(data, split) is None:
        if split is not None:
            raise tables.no_split(str(data), split)
        inputs.check_input(data, "data file", missing=f"data file not found: {data}")


def source_record(data: str | Path, split: str | None = None) -> dict:
    """What data was read, for provenance: {"file", "sha256"} for a data file; a table adds "split" and
    "files" (its sha256 covers every file read)."""
    if (source := tables.open_source(data, split)) is not None:
        return source.describe()
    from otfuse_cli.checkpoint import sha256_file

    return {"file": str(data), "sha256": sha256_file(data)}


def source_summary(data: str | Path, split: str | None = None) -> dict:
    """{"split", "files"} of a table (for evaluate's JSON), {} for a data file."""
    source = tables.open_source(data, split)
    return source.summary() if source is not None else {}


def _table_records(source: "tables.TableSource", max_samples: int | None, seed: int) -> list[dict[str, Any]]:
    """A table's records: the rows subsample() would pick from all of them, decoded batch by batch."""
    count = source.count()
    if not count:
        raise OtfuseError(f"data has no records: {source.where}")
    keep = None if max_samples is None or count <= max_samples else subsample(range(count), max_samples, seed)
    return list(source.records(keep))


def load_records(path: str | Path, *, max_samples: int | None = None, seed: int = 0,
                 split: str | None = None) -> list[dict[str, Any]]:
    """Records from .jsonl (one object per line), .csv/.tsv (header row) or .txt ({"text": line}), read in
    bounded chunks (a record above inputs.RECORD_MAX_BYTES is refused). Every record is checked; with
    max_samples only the seeded subsample is kept (a second pass picks it once the count is known), so a
    large file costs memory for max_samples records, not for all of them. Tables (parquet, save_to_disk
    folders, cached dataset ids; `split` picks a split) give their rows as records, read in batches."""
    if max_samples is not None and max_samples < 1:
        raise OtfuseError(f"max_samples must be at least 1, got {max_samples}")
    if (source := tables.open_source(path, split)) is not None:
        return _table_records(source, max_samples, seed)
    if split is not None:
        raise tables.no_split(str(path), split)
    path = Path(path)
    _check_file(path, RECORD_SUFFIXES)
    records: list[dict[str, Any]] = []
    count = 0
    for record in _records(path):
        count += 1
        if max_samples is None or count <= max_samples:
            records.append(record)
        elif records:
            records = []  # more than max_samples: only counted now, picked in a second pass
    if not count:
        raise OtfuseError(f"data file has no records: {path}")
    if max_samples is None or count <= max_samples:
        return records
    keep = subsample(range(count), max_samples, seed)  # the indices subsample(all records) would pick
    wanted = iter(keep)
    next_index = next(wanted, None)
    for index, record in enumerate(_records(path)):
        if index == next_index:
            records.append(record)
            next_index = next(wanted, None)
            if next_index is None:
                break
    return records


def fields_of(records: list[dict]) -> list[str]:
    """Field names present in every record (the usable ones), in first-record order."""
    common = set(records[0])
    for r in records[1:]:
        common &= set(r)
    return [k for k in records[0] if k in common]


def require_fields(records: list[dict], fields: Sequence[str], path: str | Path = "data") -> None:
    """OtfuseError naming the missing field and the fields that do exist."""
    have = fields_of(records)
    for f in fields:
        if f not in have:
            where = next((i for i, r in enumerate(records, 1) if f not in r), None)
            detail = f" (missing from record {where})" if where and any(f in r for r in records) else ""
            raise OtfuseError(f"{path}: missing field {f!r}{detail}; fields present: {', '.join(have) or 'none'}")


def load_tensors(path: str | Path, *, max_samples: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Arrays from .npz or .safetensors; needs `x` (inputs), `y` (labels) optional, same first dim."""
    path = Path(path)
    _check_file(path, TENSOR_SUFFIXES)
    if path.suffix.lower() == ".npz":
        import numpy as np
        try:
            with np.load(path, allow_pickle=False) as z:
                out = {k: torch.from_numpy(z[k].copy()) for k in z.files}
        except Exception as e:  # bad zip, object arrays (pickle refused), ...
            raise OtfuseError(f"cannot read {path} as .npz ({type(e).__name__}: {e})") from None
    else:
        from safetensors.torch import load_file
        if problem := inputs.safetensors_problem(path, "data file"):
            raise OtfuseError(f"cannot read {path} as safetensors ({problem})")
        try:
            out = load_file(str(path))
        except Exception as e:
            raise OtfuseError(f"cannot read {path} as safetensors ({e})") from None
    if "x" not in out:
        raise OtfuseError(f"{path}: missing array 'x'; arrays present: {', '.join(sorted(out)) or 'none'}")
    n = out["x"].shape[0] if out["x"].dim() else 0
    if n == 0 or out["x"].numel() == 0:
        raise OtfuseError(f"{path}: array 'x' holds no samples")
    if out["x"].is_complex():
        raise OtfuseError(f"{path}: 'x' holds {str(out['x'].dtype).removeprefix('torch.')} values; inputs are real "
                          "numbers")
    if "y" in out and (out["y"].dim() != 1 or out["y"].shape[0] != n):
        raise OtfuseError(f"{path}: 'y' has shape {tuple(out['y'].shape)}, expected ({n},) to match 'x'")
    if "y" in out and (out["y"].dtype == torch.bool or out["y"].is_complex()):
        raise OtfuseError(f"{path}: 'y' holds {str(out['y'].dtype).removeprefix('torch.')} values; labels are "
                          "integer class indices")
    for name in ("x", "y"):
        if name in out:
            check_finite(out[name], f"{path}: array {name!r}")
    if max_samples is not None:
        idx = torch.tensor(subsample(list(range(n)), max_samples, seed))
        out = {k: (v[idx] if v.dim() and v.shape[0] == n else v) for k, v in out.items()}
    return out


def check_finite(t: torch.Tensor, what: str) -> None:
    """NaN/Inf inputs would give NaN activations and metrics, silently: refused, naming the first sample."""
    if not (t.is_floating_point() or t.is_complex()):
        return
    bad = ~torch.isfinite(t)
    if bad.any():
        sample = int(bad.reshape(len(t), -1).any(1).nonzero()[0, 0]) if t.dim() else 0
        raise OtfuseError(f"{what} holds NaN or Inf values (first in sample {sample}, {int(bad.sum())} in all)")


_TRUNCATION: contextvars.ContextVar[dict | None] = contextvars.ContextVar("otfuse_truncation", default=None)


@contextmanager
def counting_truncation():
    """{texts, cut, limit}: how many texts tokenize_texts saw inside this block and how many it cut short (to
    the model's position limit or --max-length), so the caller can say so instead of cutting silently."""
    record = {"texts": 0, "cut": 0, "limit": None}
    token = _TRUNCATION.set(record)
    try:
        yield record
    finally:
        _TRUNCATION.reset(token)


def truncation_note(record: dict, what: str = "texts") -> str | None:
    if not record["cut"]:
        return None
    return f"{record['cut']} of {record['texts']} {what} were cut to {record['limit']} tokens"


def _count_truncation(tokenizer, max_length: int, **inputs) -> None:
    """Inside counting_truncation: count the texts of `inputs` (the tokenizer's own keywords) and those longer
    than max_length."""
    if (record := _TRUNCATION.get()) is None:
        return
    full = tokenizer(**inputs, truncation=False, verbose=False)["input_ids"]
    record["texts"] += len(full)
    record["cut"] += sum(len(ids) > max_length for ids in full)
    record["limit"] = max_length if record["limit"] is None else min(record["limit"], max_length)


def tokenize_texts(tokenizer, texts: Sequence[str], text_pairs: Sequence[str] | None = None,
                   max_length: int = 128, **kwargs) -> dict[str, torch.Tensor]:
    """A padded, truncated batch (input_ids, attention_mask, ...) as torch tensors; inside
    counting_truncation, texts longer than max_length are counted."""
    if tokenizer.pad_token is None:
        # GPT-style tokenizers have no pad token; padded positions are masked out anyway.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise OtfuseError("the tokenizer has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    pairs = list(text_pairs) if text_pairs is not None else None
    _count_truncation(tokenizer, max_length, text=list(texts), text_pair=pairs)
    return dict(tokenizer(list(texts), pairs, padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt", **kwargs))


def tokenize_targets(tokenizer, texts: Sequence[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    """Target sentences of a translation pair, tokenized as the model's labels (`text_target`: mBART and
    Marian switch to the target language's tokens), padded and truncated like tokenize_texts."""
    _count_truncation(tokenizer, max_length, text_target=list(texts))
    return dict(tokenizer(text_target=list(texts), padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt"))


def batched(n: int, batch_size: int):
    """Slices covering range(n) in order."""
    if batch_size < 1:
        raise OtfuseError(f"batch size must be at least 1, got {batch_size}")
    for start in range(0, n, batch_size):
        interrupts.check()  # a batch is a unit of work
        yield slice(start, min(start + batch_size, n))
