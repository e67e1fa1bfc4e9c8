"""The one way input files are opened (issue 30): what a path is, how big a small file may be, how deep its
JSON or YAML may nest, and how data files are read without holding more than one record at a time.

- check_input: every opener stats the path first (following symlinks) and takes regular files (and, where
  asked, folders) only. A FIFO named x.safetensors, /dev/zero behind a symlink or a socket would block a read
  forever or never end; they are refused in one line before anything opens them. open_regular then opens
  with O_NONBLOCK and checks the open descriptor again, so a path swapped for a FIFO in between cannot hang.
- read_small / load_json / load_yaml: files read whole and parsed into Python objects (config.json, shard
  indexes, adapter and tokenizer configs, recipes, model cards). Their size is checked with fstat before a
  byte is read, and their nesting before they are parsed: an 8 GiB sparse config.json used to take memory
  past 6 GiB, JSON nested 100,000 levels raised RecursionError.
- parse_json: the same depth limit for JSON held in strings (plan and stats metadata, jsonl records).
- iter_lines: data files (jsonl, csv, tsv, txt) in bounded chunks, whatever their line length; a line longer
  than RECORD_MAX_BYTES is refused as soon as it is seen.
- check_safetensors: a safetensors file's 8-byte header length is checked against the file and a cap before
  the header is read.

Errors are OtfuseError (one `error:` line, exit 2)."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Iterator

from otfuse_cli.errors import OtfuseError

MiB = 1 << 20
# Files read whole. The largest JSON read from a real model folder is a tokenizer.json (Gemma 3's is 33 MB;
# most are 0.5-10 MB); config.json files are kilobytes (a few MB with an ImageNet-21k id2label), a shard index
# of a trillion-parameter model is ~10 MB. 64 MiB is twice the largest real one, and the worst a hostile
# 64 MiB JSON can do ([{},{},...]: 22M empty dicts) is ~1.5 GB of Python objects: bounded, where an 8 GiB
# sparse file drove memory past 6 GiB before anything refused it.
JSON_MAX_BYTES = 64 * MiB
# A recipe is a few hundred bytes. PyYAML's pure-Python loader (used for its depth hook) keeps ~100 bytes of
# nodes per input byte, so 1 MiB of YAML stays near 100 MB.
YAML_MAX_BYTES = 1 * MiB
# Model cards (README.md), read to quote the anchor's title and card: prose, kilobytes.
TEXT_MAX_BYTES = 16 * MiB
# Nesting of JSON and YAML: real configs nest 3-6 levels (tokenizer.json ~6, a recipe 3). Python's json
# recurses once per level and fails near sys.getrecursionlimit() (1000, less inside a deep call stack);
# 100 leaves a wide margin on both sides.
MAX_DEPTH = 100
# YAML aliases let a few lines stand for an exponentially large tree (a "billion laughs"); a recipe expands
# to tens of nodes, so 100,000 is far beyond any real one and cheap to write out in provenance.
YAML_MAX_NODES = 100_000
# One record of a data file (a jsonl line, a csv row, a txt line). A whole book as one record is ~0.5-10 MB
# (PG-19's longest are ~10 MB) and a model reads at most its context (128k tokens: ~0.5 MB of text); 16 MiB
# holds any real record, while a hostile one costs at most its own size plus a tokenizer pass over it.
RECORD_MAX_BYTES = 16 * MiB
READ_CHUNK = 1 * MiB
# safetensors' own limit on its JSON header (MAX_HEADER_SIZE in the Rust reader), checked here first.
SAFETENSORS_HEADER_MAX = 100_000_000

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def over(path, what: str, size: int, limit: int) -> OtfuseError:
    """"<what> <path> is <size>, over the <limit> limit": in bytes where the rounded sizes would read alike."""
    if human(size) == human(limit):
        return OtfuseError(f"{what} {path} is {size:,} bytes, over the {limit:,}-byte limit for such a file")
    return OtfuseError(f"{what} {path} is {human(size)}, over the {human(limit)} limit for such a file")


def describe(mode: int) -> str:
    """What a st_mode is, in words ("a FIFO (named pipe)", "a folder", ...)."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_input(path: str | Path, what: str = "input", *, folder: bool = False, file: bool = True,
                missing: str | None = None) -> os.stat_result:
    """The stat of `path` (symlinks followed) when it is a regular file (file=True) or a folder (folder=True);
    otherwise one OtfuseError line saying what it is. missing: the message for a path that does not exist
    (default: "<what> not found: <path>")."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise OtfuseError(missing or f"{what} not found: {path}") from None
    except ValueError:  # an embedded NUL byte
        raise OtfuseError(f"{what} path {str(path)!r} holds a NUL byte") from None
    except OSError as e:
        raise OtfuseError(f"cannot read {path}: {e.strerror or e}") from None
    if (file and stat.S_ISREG(st.st_mode)) or (folder and stat.S_ISDIR(st.st_mode)):
        return st
    want = "a regular file or a folder" if file and folder else "a folder" if folder else "a regular file"
    raise OtfuseError(f"{what} {path} is {describe(st.st_mode)}, not {want}")


def open_regular(path: str | Path, what: str = "input"):
    """A binary file object for a regular file, opened without blocking and checked again once open (the
    path could have been swapped for a FIFO between the stat and the open)."""
    check_input(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise OtfuseError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OtfuseError(f"{what} {path} is {describe(st.st_mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small(path: str | Path, what: str = "file", limit: int = JSON_MAX_BYTES) -> bytes:
    """The bytes of a small regular file, its size checked before reading (and the read bounded too, in
    case the file grows meanwhile)."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise over(path, what, size, limit)
        try:
            # read() sizes its buffer by the request: ask for what fstat says (+1 to see growth), not the limit
            data = f.read(size + 1)
            if len(data) > size:  # it grew since fstat: read on, up to just past the limit
                data += f.read(limit + 1 - len(data))
        except OSError as e:
            raise OtfuseError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise OtfuseError(f"{what} {path} grew past the {human(limit)} limit while it was read")
    return data


# Files of a model folder that otfuse or transformers read whole (configs, tokenizers, the card): each is
# checked against its cap when the folder is opened, before any loader sees it.
WHOLE_READ = frozenset({
    "config.json", "generation_config.json", "adapter_config.json", "model.safetensors.index.json",
    "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "preprocessor_config.json", "processor_config.json", "chat_template.json",
    "chat_template.jinja", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "README.md"})


def check_model_folder(folder: str | Path) -> None:
    """A model folder holds regular files and folders: a FIFO, device or socket among its entries is refused
    (a loader that opened it would block or never finish), and the files read whole (WHOLE_READ) must be
    within their caps. Dangling symlinks are left alone: nothing can open them."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise OtfuseError(f"cannot read {folder}: {e.strerror or e}") from None
    for entry in entries:
        try:
            st = os.stat(entry.path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise OtfuseError(f"cannot read {entry.path}: {e.strerror or e}") from None
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode):
            raise OtfuseError(f"{entry.path} is {describe(st.st_mode)}; a model folder holds regular files and "
                              "folders only")
        limit = TEXT_MAX_BYTES if entry.name == "README.md" else JSON_MAX_BYTES
        if entry.name in WHOLE_READ and st.st_size > limit:
            raise over(entry.path, "model file", st.st_size, limit)


# ---------------------------------------------------------------- JSON

# A JSON string, or an unterminated one up to the end (possessive: linear time whatever the input).
_STRING = re.compile(rb'"(?:[^"\\]++|\\[\s\S]?)*+(?:"|\Z)')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_CHUNK = 1 << 22


def too_deep(raw: bytes | str, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON text nests arrays/objects deeper than `limit`: brackets outside strings, counted in
    linear time before the recursive parser sees them. For text that is not JSON the answer does not
    matter (the parser refuses it)."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if raw.count(b"[") + raw.count(b"{") <= limit:  # the usual case: too few brackets to nest that deep
        return False
    skeleton = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if skeleton.count(b"[") + skeleton.count(b"{") <= limit:
        return False
    import numpy as np

    step = np.zeros(256, np.int64)
    step[list(b"[{")] = 1
    step[list(b"]}")] = -1
    brackets = np.frombuffer(skeleton, np.uint8)
    depth = 0
    for start in range(0, len(brackets), _DEPTH_CHUNK):
        running = np.cumsum(step[brackets[start:start + _DEPTH_CHUNK]]) + depth
        if int(running.max()) > limit:
            return True
        depth = int(running[-1])
    return False


def parse_json(text: str | bytes, where: str, limit: int = MAX_DEPTH):
    """json.loads with the nesting limit; OtfuseError "cannot parse <where>: ..." for anything it refuses
    (syntax, depth, an integer of more than 4300 digits). Text longer than JSON_MAX_BYTES is refused unread."""
    if len(text) > JSON_MAX_BYTES:
        raise OtfuseError(f"cannot parse {where}: {human(len(text))} of JSON, over the {human(JSON_MAX_BYTES)} "
                          "limit")
    if too_deep(text, limit):
        raise OtfuseError(f"cannot parse {where}: JSON nested deeper than {limit} levels")
    try:
        return json.loads(text)
    except RecursionError:  # last resort: the pre-scan above should have said so
        raise OtfuseError(f"cannot parse {where}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise OtfuseError(f"cannot parse {where}: {e}") from None


def load_json(path: str | Path, what: str = "JSON file", limit: int = JSON_MAX_BYTES):
    """A small JSON file: size capped before reading, UTF-8, nesting limited."""
    data = read_small(path, what, limit)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OtfuseError(f"cannot parse {path}: {e}") from None
    return parse_json(text, str(path))


# ---------------------------------------------------------------- YAML


def load_yaml(path: str | Path, what: str = "YAML file", limit: int = YAML_MAX_BYTES):
    """A small YAML file (safe constructors only): size capped before reading, nesting limited while it is
    composed (before any recursion can run away), aliases limited in what they expand to."""
    import yaml

    data = read_small(path, what, limit)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OtfuseError(f"{path} is not valid YAML: not UTF-8 ({e.reason} at byte {e.start})") from None
    loader = _limited_loader(yaml)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, path)
        return loader.construct_document(node)
    except OtfuseError:
        raise
    except _TooDeep as e:
        raise OtfuseError(f"{path} is not valid YAML for otfuse: nested deeper than {MAX_DEPTH} levels (line "
                          f"{e.line})") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:  # int() of 5000 digits, bad dates...
        raise OtfuseError(f"{path} is not valid YAML: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    except RecursionError:  # last resort: the limits above should have said so
        raise OtfuseError(f"{path} is not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()


class _TooDeep(Exception):
    def __init__(self, line: int):
        self.line = line


_LOADER = None


def _limited_loader(yaml):
    """SafeLoader whose composer refuses nesting beyond MAX_DEPTH (the pure-Python loader: libyaml's composer
    has no hook)."""
    global _LOADER
    if _LOADER is None:
        class DepthLimitedLoader(yaml.SafeLoader):
            depth = 0

            def compose_node(self, parent, index):
                self.depth += 1
                try:
                    if self.depth > MAX_DEPTH:
                        raise _TooDeep(self.peek_event().start_mark.line + 1)
                    return super().compose_node(parent, index)
                finally:
                    self.depth -= 1
        _LOADER = DepthLimitedLoader
    return _LOADER


def _children(node) -> list:
    value = node.value
    if isinstance(value, list):
        return [x for item in value for x in (item if isinstance(item, tuple) else (item,))]
    return []


def _check_expansion(root, path) -> None:
    """The tree the node graph stands for once aliases are expanded: at most YAML_MAX_NODES nodes,
    MAX_DEPTH levels, and no alias inside its own anchor (a cycle). Iterative, sizes memoised per node."""
    memo: dict[int, tuple[int, int]] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            kids = [memo[id(k)] for k in _children(node)]
            size = 1 + sum(s for s, _ in kids)
            depth = 1 + max((d for _, d in kids), default=0)
            if size > YAML_MAX_NODES:
                raise OtfuseError(f"{path} is not valid YAML for otfuse: its aliases expand to more than "
                                  f"{YAML_MAX_NODES:,} nodes")
            if depth > MAX_DEPTH:
                raise OtfuseError(f"{path} is not valid YAML for otfuse: its aliases nest deeper than "
                                  f"{MAX_DEPTH} levels")
            memo[key] = (size, depth)
            continue
        if key in memo:
            continue
        if key in on_path:
            raise OtfuseError(f"{path} is not valid YAML for otfuse: an alias refers to its own anchor")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in memo)


# ---------------------------------------------------------------- data files and safetensors headers


def iter_lines(path: str | Path, what: str = "data file", limit: int = RECORD_MAX_BYTES,
               chunk: int = READ_CHUNK) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset of the line, the line's bytes without its \\n) of a regular file read in
    chunks of `chunk` bytes: memory holds one line at most, and a line longer than `limit` bytes is refused
    as soon as that many bytes of it have been read."""
    with open_regular(path, what) as f:
        pending: list[bytes] = []
        pending_len = number = offset = 0

        def too_long() -> OtfuseError:
            return OtfuseError(f"{path}:{number + 1}: line longer than {human(limit)}; a record must be smaller")

        while True:
            try:
                block = f.read(chunk)
            except OSError as e:
                raise OtfuseError(f"cannot read {path}: {e.strerror or e}") from None
            if not block:
                break
            start = 0
            while (end := block.find(b"\n", start)) != -1:
                if pending_len + end - start > limit:
                    raise too_long()
                line = b"".join(pending) + block[start:end] if pending else block[start:end]
                pending, pending_len = [], 0
                number += 1
                yield number, offset, line
                offset += len(line) + 1
                start = end + 1
            if start < len(block):
                pending.append(block[start:])
                pending_len += len(block) - start
                if pending_len > limit:
                    raise too_long()
        if pending:
            yield number + 1, offset, b"".join(pending)


def safetensors_problem(path: str | Path, what: str = "safetensors file") -> str | None:
    """Why `path` cannot be a safetensors file, judged from its size and its first 8 bytes (the header's
    length, checked against the file and safetensors' 100 MB cap before any header is read); None if it may
    be one. A path that is not a regular file is refused outright (OtfuseError)."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            head = f.read(8)
        except OSError as e:
            raise OtfuseError(f"cannot read {path}: {e.strerror or e}") from None
    if len(head) < 8:
        return f"{size} bytes: shorter than the 8-byte header length"
    n = int.from_bytes(head, "little")
    if n > SAFETENSORS_HEADER_MAX:
        return f"its header length says {n:,} bytes, over the {SAFETENSORS_HEADER_MAX:,}-byte limit"
    if n > size - 8:
        return f"its header length says {n:,} bytes; the file holds {size - 8:,} after it"
    if n < 2:
        return f"its header length says {n} bytes"
    return None


def check_safetensors(path: str | Path, what: str = "safetensors file") -> None:
    """OtfuseError "<path> is not a valid safetensors file (<why>)" unless safetensors_problem finds none."""
    if problem := safetensors_problem(path, what):
        raise OtfuseError(f"{path} is not a valid safetensors file ({problem})")
