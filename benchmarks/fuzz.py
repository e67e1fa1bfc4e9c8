"""Seeded fuzzing of otfuse's inputs: mutated checkpoints, config.json files and data files run through
`inspect`, `fuse`, `evaluate` and `compress` (issue 14), and hostile inputs (issue 30, about 15% of the cases):
sparse size bombs, FIFOs and devices, JSON and YAML nested thousands deep, hostile option values, through those
commands and `run` (see HOSTILE_KINDS).

Every case copies the few real fixtures it needs (digit MLPs/CNNs, sentiment BERTs, a slice of their data)
into its own folder, mutates one file with a seeded mutation, runs one command in-process (typer's
CliRunner: an uncaught exception is a traceback) and checks the contract:

- exit code 0 or 2, never anything else, never a hang (per-case alarm);
- on 2: exactly one stderr line starting `error: `, no traceback, nothing new in the case folder;
- on 0: the output (fuse, compress) loads with otfuse's own reader and, for model folders, with
  transformers' AutoConfig, every floating tensor finite; `--json` output (inspect, evaluate) is strict JSON
  whose numbers are finite or null; nothing else new in the case folder;
- no silent acceptance of non-finite input: exit 0 from fuse, compress or evaluate when the mutated input
  (checkpoint or data file) holds NaN/Inf (inspect, which only describes a file, may);
- every input byte-identical afterwards (sha256).

    python benchmarks/fuzz.py --cases 2000 --seed 0            # summary table, then every failing case
    python benchmarks/fuzz.py --case 123 --seed 0 --keep DIR   # replay one case, keep its folder

The same case number and seed always give the same mutation and command. tests/test_fuzz.py imports this
module and runs a few hundred cases in the suite.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "fixtures"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODELS = {  # family -> (mutable model, its unmutated partner, data file, layout)
    "mlp": ("mlp_a.safetensors", "mlp_b.safetensors", "digits.safetensors", "file"),
    "cnn": ("cnn_a.safetensors", "cnn_b.safetensors", "digits.safetensors", "file"),
    "bert": ("bert_a", "bert_b", "sent.jsonl", "folder"),
}
COMMANDS = ("inspect", "fuse", "evaluate", "compress")
ALL_COMMANDS = (*COMMANDS, "run")  # hostile recipes run too
DEFAULT_TIMEOUT = 120


# ---------------------------------------------------------------- the corpus


def build_corpus(root: Path) -> Path:
    """The unmutated inputs every case copies from: real fixtures, 64 digits, 32 reviews."""
    from safetensors.torch import load_file, save_file

    root.mkdir(parents=True, exist_ok=True)
    for name in ("mlp_a", "mlp_b", "cnn_a", "cnn_b"):
        shutil.copyfile(FIX / "digits" / f"{name}.safetensors", root / f"{name}.safetensors")
    for name in ("bert_a", "bert_b"):
        if not (root / name).exists():
            shutil.copytree(FIX / "sentiment" / name, root / name)
    d = load_file(FIX / "digits" / "test.safetensors")
    save_file({"x": d["x"][:64].contiguous(), "y": d["y"][:64].contiguous()}, root / "digits.safetensors")
    lines = (FIX / "sentiment" / "test.jsonl").read_text(encoding="utf-8").splitlines()[:32]
    (root / "sent.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# ---------------------------------------------------------------- mutations


def _split(raw: bytes) -> tuple[int, bytes, bytes]:
    n = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else 0
    return n, raw[8:8 + n], raw[8 + n:]


def _join(header, data: bytes) -> bytes:
    hb = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return len(hb).to_bytes(8, "little") + hb + data


def _flip(raw: bytes, lo: int, hi: int, rng: random.Random, k: int) -> tuple[bytes, str]:
    b = bytearray(raw)
    hi = min(hi, len(b))
    if hi <= lo:
        return raw, "nothing to flip"
    where = sorted(rng.randrange(lo, hi) for _ in range(k))
    for i in where:
        if rng.random() < 0.5:
            b[i] ^= 1 << rng.randrange(8)
        else:
            b[i] = rng.randrange(256)
    return bytes(b), "at " + ",".join(map(str, where))


def _tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def st_header_json(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A structured change to the safetensors header JSON, data bytes untouched."""
    n, hb, data = _split(raw)
    try:
        header = json.loads(hb)
    except ValueError:
        return st_flip_header(raw, rng)
    names = _tensor_names(header)
    name = rng.choice(names)
    entry = header[name]
    op = rng.choice(["dtype", "shape", "offsets", "delete", "rename", "extra", "metadata", "metadata_type",
                     "whole", "entry_type"])
    if op == "dtype":
        entry["dtype"] = rng.choice(["F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "XYZ", 7,
                                     None])
    elif op == "shape":
        shape = list(entry["shape"])
        choice = rng.choice(["drop", "add", "zero", "negative", "double", "string", "float", "swap", "huge"])
        if choice == "drop" and shape:
            shape.pop(rng.randrange(len(shape)))
        elif choice == "add":
            shape.insert(rng.randrange(len(shape) + 1), rng.choice([1, 2]))
        elif choice == "zero" and shape:
            shape[rng.randrange(len(shape))] = 0
        elif choice == "negative" and shape:
            shape[rng.randrange(len(shape))] *= -1
        elif choice == "double" and shape:
            shape[rng.randrange(len(shape))] *= 2
        elif choice == "string" and shape:
            shape[0] = str(shape[0])
        elif choice == "float" and shape:
            shape[0] = shape[0] + 0.5
        elif choice == "swap" and len(shape) > 1:
            shape = shape[::-1]
        elif choice == "huge":
            shape = [2**62] + shape[1:]
        entry["shape"] = shape
        op += f" {choice}"
    elif op == "offsets":
        a, b = entry["data_offsets"]
        choice = rng.choice(["shift", "swap", "short", "long", "negative", "beyond", "string"])
        entry["data_offsets"] = {"shift": [a + 4, b + 4], "swap": [b, a], "short": [a, max(a, b - 4)],
                                 "long": [a, b + 4], "negative": [-a - 8, b], "beyond": [a, len(data) + 64],
                                 "string": [str(a), b]}[choice]
        op += f" {choice}"
    elif op == "delete":
        del header[name]
    elif op == "rename":
        header[rng.choice([name + ".x", name.replace("weight", "bias"), "", "../" + name, name.upper()])] = \
            header.pop(name)
    elif op == "extra":
        header[rng.choice(["extra.weight", name.rsplit(".", 1)[0] + ".extra", "0.weight2"])] = copy.deepcopy(entry)
    elif op == "metadata":
        meta = header.setdefault("__metadata__", {})
        key = rng.choice(["otfuse.arch", "otfuse.input_shape", "otfuse.activation", "format"])
        meta[key] = rng.choice({"otfuse.arch": ["cnn", "mlp", "resnet", "bogus", ""],
                                "otfuse.input_shape": ["1,28", "0,28,28", "a,b,c", "-1,28,28", "3,28,28", "1,14,14",
                                                       "", "1,28,28,1"],
                                "otfuse.activation": ["gelu", "tanh", "swish", ""],
                                "format": ["tf", "np", ""]}[key])
        op += f" {key}={meta[key]!r}"
    elif op == "metadata_type":
        header["__metadata__"] = rng.choice([[], 5, "x", None, {"otfuse.arch": 3}])
    elif op == "whole":
        return _join(rng.choice([b"{}", b"[]", b'"x"', b"null", b"{" * 64]), data), f"header {op}"
    elif op == "entry_type":
        header[name] = rng.choice([[], "x", None, {"dtype": entry["dtype"]}])
    return _join(header, data), f"header {op} on {name!r}"


def st_flip_header(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    n, _, _ = _split(raw)
    out, where = _flip(raw, 0, 8 + n, rng, rng.choice([1, 1, 2, 4]))
    return out, f"header byte flip {where}"


def st_flip_data(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    n, _, _ = _split(raw)
    out, where = _flip(raw, 8 + n, len(raw), rng, rng.choice([1, 4, 16, 64]))
    return out, f"data byte flip {where}"


def st_truncate(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    n, _, _ = _split(raw)
    cut = rng.choice([rng.randrange(0, 8), rng.randrange(8, 8 + n + 1), rng.randrange(8 + n, len(raw)),
                      len(raw) - rng.randrange(1, 9)])
    return raw[:cut], f"truncated to {cut} of {len(raw)} bytes"


def st_extend(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    k = rng.choice([1, 7, 8, 1000])
    return raw + bytes(rng.randrange(256) for _ in range(k)), f"{k} bytes appended"


def _tensors(raw: bytes):
    from safetensors.torch import load

    return load(raw)


def _save(tensors: dict, raw: bytes) -> bytes:
    from safetensors.torch import save

    n, hb, _ = _split(raw)
    meta = json.loads(hb).get("__metadata__")
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def st_nonfinite(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    import torch

    t = _tensors(raw)
    names = [k for k, v in t.items() if v.is_floating_point() and v.numel()]
    name = rng.choice(names)
    v = t[name].clone()
    value = rng.choice([float("nan"), float("inf"), float("-inf")])
    k = rng.choice([1, 1, 3, v.numel()])
    idx = torch.randperm(v.numel(), generator=torch.Generator().manual_seed(rng.randrange(2**31)))[:k]
    v.view(-1)[idx] = value
    t[name] = v
    return _save(t, raw), f"{k} x {value} in {name!r}"


def st_semantic(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A valid safetensors file describing a different or broken model (zero-size, other shape or dtype,
    missing or extra tensor, huge values)."""
    import torch

    t = _tensors(raw)
    name = rng.choice(sorted(t))
    v = t[name]
    op = rng.choice(["zero_size", "reshape", "dtype", "drop", "extra", "huge", "scalar", "int"])
    if op == "zero_size":
        shape = list(v.shape) or [1]
        shape[rng.randrange(len(shape))] = 0
        t[name] = torch.zeros(shape, dtype=v.dtype)
    elif op == "reshape":
        shape = list(v.shape) or [1]
        i = rng.randrange(len(shape))
        shape[i] = max(1, shape[i] + rng.choice([-1, 1, 3]))
        t[name] = torch.randn(shape).to(v.dtype) if v.is_floating_point() else torch.zeros(shape, dtype=v.dtype)
    elif op == "dtype":
        t[name] = v.to(rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8,
                                   torch.bool, torch.uint8]))
    elif op == "drop" and len(t) > 1:
        del t[name]
    elif op == "extra":
        t[name + rng.choice(["_extra", ".extra", "2"])] = v.clone()
    elif op == "huge" and v.is_floating_point():
        t[name] = v * rng.choice([1e30, 3e38, 1e4]) if v.dtype == torch.float32 else v
    elif op == "scalar":
        t[name] = torch.tensor(1.0).to(v.dtype)
    elif op == "int":
        t[name] = (v * 100).round().to(torch.int32) if v.is_floating_point() else v
    return _save(t, raw), f"{op} on {name!r}"


ST_MUTATORS = {"flip_header": st_flip_header, "flip_data": st_flip_data, "truncate": st_truncate,
               "extend": st_extend, "header_json": st_header_json, "nonfinite": st_nonfinite,
               "semantic": st_semantic}
ST_WEIGHTS = {"flip_header": 3, "flip_data": 3, "truncate": 2, "extend": 1, "header_json": 5, "nonfinite": 2,
              "semantic": 4}

CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
               "max_position_embeddings", "type_vocab_size", "model_type", "architectures", "id2label",
               "label2id", "num_labels", "hidden_act", "layer_norm_eps", "pad_token_id", "hidden_dropout_prob",
               "attention_probs_dropout_prob", "position_embedding_type", "torch_dtype", "dtype"]


def config_mutation(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    if rng.random() < 0.1:
        if rng.random() < 0.5:
            cut = rng.randrange(len(raw))
            return raw[:cut], f"config.json truncated to {cut} bytes"
        out, where = _flip(raw, 0, len(raw), rng, 2)
        return out, f"config.json byte flip {where}"
    cfg = json.loads(raw)
    key = rng.choice(CONFIG_KEYS)
    old = cfg.get(key)
    op = rng.choice(["string", "negative", "zero", "list", "dict", "null", "float", "bool", "huge", "delete",
                     "swap", "other"])
    if op == "delete":
        cfg.pop(key, None)
    else:
        new = {
            "string": str(old) if old is not None else "x",
            "negative": -old if isinstance(old, (int, float)) and not isinstance(old, bool) and old else -1,
            "zero": 0,
            "list": [old] if not isinstance(old, list) else old + old,
            "dict": {"value": old},
            "null": None,
            "float": (old + 0.5) if isinstance(old, (int, float)) and not isinstance(old, bool) else 0.5,
            "bool": True,
            "huge": 2**40,
            "swap": (old[0] if isinstance(old, list) and old else list(old.values()) if isinstance(old, dict)
                     else [old]),
            "other": rng.choice([1, 3, 7, 32, 63, 65, 128, 2048, "gpt2", "llama", "relu", "swish", 1e-300]),
        }[op]
        cfg[key] = new
    return json.dumps(cfg, indent=2).encode(), f"config {key}: {op} (was {old!r})"


def tokenizer_mutation(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    if rng.random() < 0.5:
        cut = rng.randrange(len(raw))
        return raw[:cut], f"tokenizer.json truncated to {cut}"
    out, where = _flip(raw, 0, len(raw), rng, 4)
    return out, f"tokenizer.json byte flip {where}"


def digits_mutation(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    import torch

    if rng.random() < 0.55:
        kind = rng.choices(list(ST_MUTATORS), weights=list(ST_WEIGHTS.values()))[0]
        out, what = ST_MUTATORS[kind](raw, rng)
        return out, f"data {kind}: {what}"
    t = _tensors(raw)
    x, y = t["x"], t["y"]
    op = rng.choice(["label_high", "label_negative", "label_float", "x_flat", "x_int", "x_empty", "y_2d",
                     "x_channels", "x_huge", "y_missing", "x_nan_rows", "y_short"])
    if op == "label_high":
        y = y.clone()
        y[rng.randrange(len(y))] = rng.choice([10, 11, 1000])
    elif op == "label_negative":
        y = y.clone()
        y[rng.randrange(len(y))] = -1
    elif op == "label_float":
        y = y.float() + 0.5
    elif op == "x_flat":
        x = x.reshape(len(x), -1)
    elif op == "x_int":
        x = (x * 255).to(torch.uint8)
    elif op == "x_empty":
        x, y = x[:0], y[:0]
    elif op == "y_2d":
        y = y[:, None]
    elif op == "x_channels":
        x = x.repeat(1, 3, 1, 1)
    elif op == "x_huge":
        x = x * 1e30
    elif op == "y_missing":
        return _save({"x": x}, raw), "data: y removed"
    elif op == "x_nan_rows":
        x = x.clone()
        x[: rng.randrange(1, 4)] = float("nan")
    elif op == "y_short":
        y = y[:-3]
    return _save({"x": x.contiguous(), "y": y.contiguous()}, raw), f"data: {op}"


def jsonl_mutation(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    lines = raw.decode("utf-8").splitlines()
    op = rng.choice(["flip", "truncate", "malformed", "no_label", "label_value", "text_value", "empty", "bom_garbage",
                     "no_text", "long_text", "blank_lines", "extra_field"])
    i = rng.randrange(len(lines))
    if op == "flip":
        out, where = _flip(raw, 0, len(raw), rng, rng.choice([1, 4]))
        return out, f"jsonl byte flip {where}"
    if op == "truncate":
        cut = rng.randrange(len(raw))
        return raw[:cut], f"jsonl truncated to {cut}"
    if op == "empty":
        return b"", "jsonl empty"
    if op == "bom_garbage":
        return b"\xef\xbb\xbf" + bytes(rng.randrange(256) for _ in range(64)), "jsonl garbage after a BOM"
    if op == "blank_lines":
        return b"\n\n  \n", "jsonl of blank lines"
    if op == "malformed":
        lines[i] = lines[i][: len(lines[i]) // 2]
    else:
        rec = json.loads(lines[i])
        if op == "no_label":
            rec.pop("label", None)
        elif op == "label_value":
            rec["label"] = rng.choice([2, -1, 1.5, "positive", "great", None, [1], True, 10**30])
        elif op == "text_value":
            rec["text"] = rng.choice([None, 5, ["a"], {"t": 1}, ""])
        elif op == "no_text":
            rec.pop("text", None)
        elif op == "long_text":
            rec["text"] = "word " * 5000
        elif op == "extra_field":
            rec["text_pair"] = rng.choice([None, "other text", 3])
        lines[i] = json.dumps(rec)
    return ("\n".join(lines) + "\n").encode("utf-8"), f"jsonl line {i + 1}: {op}"


# ---------------------------------------------------------------- cases


@dataclass
class Case:
    number: int
    seed: int
    family: str = ""
    target: str = ""        # file mutated, relative to the case folder
    mutation: str = ""
    command: str = ""
    args: list = field(default_factory=list)   # with {d} for the case folder
    hostile: str = ""       # a hostile-input kind (HOSTILE_KINDS) instead of a mutation of a real file

    def argv(self, folder: Path) -> list[str]:
        return [a.replace("{d}", str(folder)) for a in self.args]

    def line(self) -> str:
        return f"#{self.number} {self.command} [{self.family}] {self.target}: {self.mutation}"


def make_case(number: int, seed: int) -> Case:
    """The case's mutation target, mutator and command, drawn from (seed, number) alone."""
    rng = random.Random(f"otfuse-fuzz:{seed}:{number}")
    case = Case(number, seed)
    family = rng.choice(["mlp", "mlp", "cnn", "bert", "bert"])
    model, partner, data, layout = MODELS[family]
    case.family = family
    on_data = rng.random() < 0.25
    if on_data:
        case.target = data
        case.command = rng.choice(["evaluate", "evaluate", "fuse", "compress"])
    else:
        if family == "bert":
            case.target = rng.choices([f"{model}/model.safetensors", f"{model}/config.json",
                                       f"{model}/tokenizer.json"], weights=[6, 5, 1])[0]
        else:
            case.target = model
        case.command = rng.choice(COMMANDS)
    m, p, dat = "{d}/" + model, "{d}/" + partner, "{d}/" + data
    out = "{d}/out" + (".safetensors" if layout == "file" else "")
    shrink = ["--width", "ffn=64"] if family == "bert" else ["--ratio", "0.5"]
    if case.command == "inspect":
        case.args = ["inspect", "--spaces", "--json", m] + ([p] if rng.random() < 0.3 else [])
    elif case.command == "evaluate":
        case.args = ["evaluate", m, "--data", dat, "--json"] + (["--max-samples", "32"] if family == "bert" else [])
    elif case.command == "fuse":
        pair = [m, p] if rng.random() < 0.7 else [p, m]
        extra = ["--refine", "2"]
        if on_data:
            extra = (["--repair", "--data", dat] if family == "cnn" and rng.random() < 0.5
                     else ["--align", "activations", "--data", dat, "--samples", "32"])
        case.args = ["fuse", *pair, "-o", out, "--json", *extra]
    else:
        extra = ["--align", "activations", "--data", dat, "--samples", "32"] if on_data else []
        case.args = ["compress", m, "-o", out, "--json", *shrink, *extra]
    hostile = random.Random(f"otfuse-fuzz-hostile:{seed}:{number}")  # its own stream: other cases stay as they were
    if hostile.random() < HOSTILE_SHARE:
        hostile_case(case, hostile)
    return case


# ---------------------------------------------------------------- hostile inputs (issue 30)

# Inputs built to hang a command, exhaust its memory or overflow its parser, rather than mutations of real files:
#   sparse_bomb       an 8 GiB (or 64 GiB, or just over the cap) sparse file in a small-file or data slot, or a
#                     safetensors header length that claims gigabytes;
#   fifo              a FIFO, /dev/zero or a socket where a file is read;
#   deep_json         JSON nested 101 to 100,000 levels: config.json, an index, a jsonl record, plan and stats
#                     metadata, a safetensors header;
#   deep_yaml         recipes nested 101 to 5,000 levels, alias bombs and cycles, unparseable scalars;
#   bad_option_value  a hostile value for an option: empty, NaN, 10**30, 5000 digits, non-UTF-8 bytes...
HOSTILE_SHARE = 0.15
HOSTILE_KINDS = {"sparse_bomb": 3, "fifo": 2, "deep_json": 3, "deep_yaml": 2, "bad_option_value": 4}
GIB = 1 << 30
# slot -> (file, relative to the case folder, "{m}" the mutable model; the command family that reads it)
HOSTILE_SLOTS = {
    "bert": {"config.json": ("{m}/config.json", "model"), "index": ("{m}/model.safetensors.index.json", "model"),
             "tokenizer.json": ("{m}/tokenizer.json", "model"), "weights": ("{m}/model.safetensors", "model"),
             "generation_config.json": ("{m}/generation_config.json", "model"), "README.md": ("{m}/README.md", "model"),
             "jsonl": ("sent.jsonl", "data"), "plan": ("plan.safetensors", "plan"),
             "stats": ("stats.safetensors", "stats"), "recipe": ("job.yaml", "run")},
    "file": {"weights": ("{m}", "model"), "data": ("digits.safetensors", "data"), "plan": ("plan.safetensors", "plan"),
             "stats": ("stats.safetensors", "stats"), "recipe": ("job.yaml", "run")},
}
DEEP_SLOTS = {"bert": ("config.json", "index", "jsonl", "plan", "stats", "weights"),
              "file": ("weights", "plan", "stats")}
OPTION_VALUES = ["", " ", "0", "-1", "1.5", "nan", "inf", "-inf", "1e400", "1e300", "3.5e38", str(10**30), "abc",
                 "1,", "9" * 5000, "\udcff", "1e-320"]
OPTIONS = {  # command -> [(flag, what makes the flag read)]
    "fuse": [("--weights", []), ("--sketch", []), ("--refine", []), ("--reg", ["--solver", "sinkhorn"]),
             ("--max-iter", ["--solver", "sinkhorn"]), ("--anchor", []), ("--time-limit", []),
             ("--max-shard-size", []), ("--samples", ["--align", "activations", "--data", "{dat}"]),
             ("--max-tokens", ["--align", "activations", "--data", "{dat}"]),
             ("--max-length", ["--align", "activations", "--data", "{dat}"]),
             ("--seed", ["--align", "activations", "--data", "{dat}"]), ("--data", ["--align", "activations"]),
             ("--regmean-alpha", ["--merge", "regmean", "--data", "{dat}"]),
             ("--scale", ["--base", "{m}", "--merge", "task-arithmetic"]),
             ("--density", ["--base", "{m}", "--merge", "ties"]), ("--dtype", []), ("-o", [])],
    "compress": [("--ratio", []), ("--width", []), ("--seed", ["--ratio", "0.5"]), ("-o", ["--ratio", "0.5"])],
    "evaluate": [("--max-samples", []), ("--batch-size", []), ("--max-length", []), ("--fail-under", []),
                 ("--steps", ["--interpolate", "{m}", "{p}"]), ("--ensemble-of", ["{p}"])],
}
OUTPUT_NAMES = ["", ".", "..", "x" * 300 + ".safetensors", "\udcffout.safetensors", "/".join(["y" * 200] * 25)]
PLAN_FLAGS = [("--solver", "sinkhorn"), ("--metric", "cosine"), ("--marginals", "l1"), ("--cost-norm", "max"),
              ("--refine", "2"), ("--max-iter", "10"), ("--reg", "0.5"), ("--sketch", "64")]


def hostile_case(case: Case, rng: random.Random) -> None:
    """Turn the case into a hostile one (its family kept): which kind, which slot, which command."""
    model, partner, data, layout = MODELS[case.family]
    where = "bert" if layout == "folder" else "file"
    case.hostile = kind = rng.choices(list(HOSTILE_KINDS), weights=list(HOSTILE_KINDS.values()))[0]
    m, p, dat = "{d}/" + model, "{d}/" + partner, "{d}/" + data
    out = "{d}/out" + (".safetensors" if layout == "file" else "")
    if kind == "bad_option_value":
        case.target = ""
        if rng.random() < 0.15:  # --align none with an option of the solve: nothing would read it
            flag, value = rng.choice(PLAN_FLAGS)
            case.command, case.args = "fuse", ["fuse", m, p, "-o", out, "--align", "none", flag, value]
            return
        case.command = rng.choice(list(OPTIONS))
        flag, needs = rng.choice(OPTIONS[case.command])
        value = rng.choice(OUTPUT_NAMES if flag == "-o" else OPTION_VALUES)
        if flag == "-o":
            value = value if value.strip(" .") == "" else "{d}/" + value
        needs = [a.replace("{dat}", dat).replace("{m}", m).replace("{p}", p) for a in needs]
        if case.command == "fuse":
            case.args = ["fuse", m, p, *(["-o", out] if flag != "-o" else []), "--json", *needs, flag, value]
        elif case.command == "compress":
            shrink = [] if flag in ("--ratio", "--width") or "--ratio" in needs else ["--ratio", "0.5"]
            case.args = ["compress", m, *(["-o", out] if flag != "-o" else []), "--json", *shrink, *needs, flag, value]
        else:
            case.args = ["evaluate", *([] if "--interpolate" in needs else [m]), *needs, "--data", dat, "--json",
                         flag, value]
        return
    slots = HOSTILE_SLOTS[where] if kind != "deep_json" else {k: HOSTILE_SLOTS[where][k] for k in DEEP_SLOTS[where]}
    if kind == "deep_yaml":
        slots = {"recipe": HOSTILE_SLOTS[where]["recipe"]}
    slot = rng.choice(sorted(slots))
    target, reader = slots[slot]
    case.target = target.replace("{m}", model)
    if reader == "model":
        case.command = rng.choice(COMMANDS)
        case.args = {"inspect": ["inspect", "--json", m], "evaluate": ["evaluate", m, "--data", dat, "--json"],
                     "fuse": ["fuse", m, p, "-o", out, "--json"],
                     "compress": ["compress", m, "-o", out, "--json",
                                  *(["--width", "ffn=64"] if where == "bert" else ["--ratio", "0.5"])]}[case.command]
    elif reader == "data":
        case.command = rng.choice(["evaluate", "fuse"])
        case.args = (["evaluate", m, "--data", "{d}/" + case.target, "--json"] if case.command == "evaluate" else
                     ["fuse", m, p, "-o", out, "--json", "--align", "activations", "--data", "{d}/" + case.target])
    elif reader == "plan":
        case.command = "fuse"
        case.args = ["fuse", m, p, "-o", out, "--json", "--plan", "{d}/" + case.target]
    elif reader == "stats":
        case.command = "fuse"
        case.args = ["fuse", m, p, "-o", out, "--json", "--merge", rng.choice(["regmean", "fisher"]),
                     "--stats", "{d}/" + case.target, "--stats", "{d}/" + case.target]
    else:
        case.command = "run"
        case.args = ["run", "{d}/" + case.target, "--json"]


def _nested_json(depth: int, rng: random.Random) -> str:
    opens, closes = [], []
    for _ in range(depth):
        obj = rng.random() < 0.5
        opens.append('{"k": ' if obj else "[")
        closes.append("}" if obj else "]")
    return "".join(opens) + "1" + "".join(reversed(closes))


def _recipe(case: Case, folder: Path, extra: str = "") -> str:
    model, partner, _, layout = MODELS[case.family]
    out = folder / ("out" + (".safetensors" if layout == "file" else ""))
    return f"command: fuse\nmodels: [{folder / model}, {folder / partner}]\noutput: {out}\n{extra}"


def _deep_yaml(case: Case, folder: Path, rng: random.Random) -> tuple[str, str]:
    depth = rng.choice([101, 150, 1000, 5000])
    style = rng.choice(["flow list", "flow map", "block list", "block map", "laughs", "alias chain", "alias cycle",
                        "digits", "date", "binary"])
    if style == "flow list":
        value = "[" * depth + "]" * depth
    elif style == "flow map":
        value = "{a: " * depth + "1" + "}" * depth
    elif style == "block list":
        value = "\n" + "".join("  " * i + "-\n" for i in range(1, depth + 1)) + "  " * (depth + 1) + "x"
    elif style == "block map":
        value = "\n" + "".join("  " * i + "a:\n" for i in range(1, depth + 1)) + "  " * (depth + 1) + "x"
    if style in ("flow list", "flow map", "block list", "block map"):
        key = rng.choice(["models", "options", "data", "unknown"])
        return _recipe(case, folder).replace(f"\n{key}:", "\nignored:") + f"{key}: {value}\n", f"{style}, depth {depth} in {key}"
    if style == "laughs":
        levels = rng.choice([5, 9, 12])
        text = "l0: &l0 [lol]\n" + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n"
                                            for i in range(1, levels + 1))
        return text + _recipe(case, folder, f"options: *l{levels}\n"), f"alias bomb, 10^{levels} nodes"
    if style == "alias chain":
        text = "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, depth + 1))
        return text + _recipe(case, folder, f"data: *a{depth}\n"), f"alias chain {depth} deep"
    if style == "alias cycle":
        return _recipe(case, folder, "options: &o {align: weights, x: *o}\n"), "alias inside its own anchor"
    if style == "digits":
        return _recipe(case, folder, "anchor: 1" + "0" * 5000 + "\n"), "an integer of 5001 digits"
    if style == "date":
        return _recipe(case, folder, "options: {refine: 2021-13-45}\n"), "an impossible date"
    return _recipe(case, folder, "options: {refine: !!binary x}\n"), "bad !!binary"


def _sparse(path: Path, size: int, head: bytes = b"") -> None:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(max(size, len(head)))


def _special(path: Path, rng: random.Random) -> str:
    variant = rng.choice(["FIFO", "FIFO", "/dev/zero", "/dev/null", "socket"])
    if variant == "FIFO":
        os.mkfifo(path)
    elif variant == "socket" and len(os.fsencode(str(path))) < 100:
        import socket

        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    else:
        variant = variant if variant != "socket" else "/dev/zero"
        os.symlink(variant, path)
    return variant


def hostile_mutation(case: Case, folder: Path, rng: random.Random) -> str:
    """Build the hostile input of a hostile case in its folder; returns its description."""
    kind = case.hostile
    if kind == "bad_option_value":
        return f"bad_option_value: {' '.join(a[:40] for a in case.args[-2:])!r}"
    path = folder / case.target
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "deep_yaml":
        text, what = _deep_yaml(case, folder, rng)
        path.write_text(text)
        return f"deep_yaml: {what}"
    if kind == "fifo":
        return f"fifo: {case.target} is {_special(path, rng)}"
    if kind == "sparse_bomb":
        from otfuse_cli import inputs

        cap = {".json": inputs.JSON_MAX_BYTES, ".yaml": inputs.YAML_MAX_BYTES, ".md": inputs.TEXT_MAX_BYTES,
               ".jsonl": inputs.RECORD_MAX_BYTES}.get(path.suffix, GIB)
        size = rng.choice([cap + 1, GIB, 8 * GIB, 8 * GIB, 64 * GIB])
        head = b""
        if path.suffix == ".safetensors" and rng.random() < 0.5:
            head = rng.choice([2 * GIB, 100_000_001, size]).to_bytes(8, "little")  # a header claiming gigabytes
        elif path.suffix == ".jsonl" and rng.random() < 0.5:
            head = (FIX / "sentiment" / "test.jsonl").read_bytes()[:4096].rsplit(b"\n", 1)[0] + b"\n"
        _sparse(path, size, head)
        return f"sparse_bomb: {case.target} of {size:,} bytes" + (f", {len(head)} real bytes first" if head else "")
    # deep_json
    depth = rng.choice([101, 128, 1000, 100_000])
    deep = _nested_json(depth, rng)
    if path.suffix == ".jsonl":
        path.write_text('{"text": "fine", "label": 1}\n{"text": "deep", "label": ' + deep + "}\n")
    elif path.name in ("plan.safetensors", "stats.safetensors"):
        from safetensors.torch import save_file
        import torch

        key = "otfuse.plans" if path.name == "plan.safetensors" else "otfuse"
        save_file({"x": torch.zeros(2)}, path, metadata={key: deep})
    elif path.suffix == ".safetensors":  # the header itself
        path.write_bytes(_join(b'{"__metadata__": {"x": "y"}, "deep": ' + deep.encode() + b"}", b""))
    else:
        path.write_text('{"weight_map": {}, "deep": ' + deep + "}")
    return f"deep_json: {case.target} nested {depth} levels"


def apply_mutation(case: Case, folder: Path) -> None:
    rng = random.Random(f"otfuse-fuzz-mutation:{case.seed}:{case.number}")
    if case.hostile:
        case.mutation = hostile_mutation(case, folder, rng)
        return
    path = folder / case.target
    raw = path.read_bytes()
    name = path.name
    if name == "config.json":
        out, what = config_mutation(raw, rng)
    elif name == "tokenizer.json":
        out, what = tokenizer_mutation(raw, rng)
    elif name == "digits.safetensors":
        out, what = digits_mutation(raw, rng)
    elif name.endswith(".jsonl"):
        out, what = jsonl_mutation(raw, rng)
    else:
        kind = rng.choices(list(ST_MUTATORS), weights=list(ST_WEIGHTS.values()))[0]
        try:
            out, what = ST_MUTATORS[kind](raw, rng)
        except (ValueError, IndexError):  # e.g. no float tensor to poison: fall back to a byte flip
            out, what = st_flip_data(raw, rng)
        what = f"{kind}: {what}"
    path.write_bytes(out)
    case.mutation = what


def holds_nonfinite(path: Path) -> bool:
    """Whether a (possibly mutated) safetensors file loads and holds NaN/Inf in a floating tensor (never asked
    of a FIFO, a device or a size bomb: reading those is what is under test)."""
    import stat

    if not path.name.endswith(".safetensors"):
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size > BIG_FILE:
        return False
    try:
        import torch

        for v in _tensors(path.read_bytes()).values():
            if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
                return True
    except Exception:  # noqa: BLE001 - does not load: not a silent acceptance question
        return False
    return False


# ---------------------------------------------------------------- running and judging


class CaseTimeout(BaseException):
    pass


@contextlib.contextmanager
def alarm(seconds: int):
    def fire(signum, frame):
        raise CaseTimeout()
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_cli(argv: list[str], timeout: int = DEFAULT_TIMEOUT) -> dict:
    from typer.testing import CliRunner

    from otfuse_cli.cli import app

    t0 = time.monotonic()
    try:
        with alarm(timeout):
            r = CliRunner().invoke(app, argv)
    except CaseTimeout:
        return {"code": None, "stdout": "", "stderr": "", "traceback": "", "hang": True,
                "seconds": time.monotonic() - t0}
    tb = ""
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        tb = "".join(traceback.format_exception(*r.exc_info))
    return {"code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr, "traceback": tb, "hang": False,
            "seconds": time.monotonic() - t0}


BIG_FILE = 64 << 20


def _digest(p: Path, st: os.stat_result) -> str:
    if st.st_size <= BIG_FILE:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    # a (sparse) size bomb: hashing 8 GiB before and after every case would be the whole run; its size, mtime
    # and first and last MiB stand for it
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(-(1 << 20), os.SEEK_END)
        h.update(f.read())
    return "big:" + h.hexdigest()


def sha_tree(root: Path) -> dict[str, str]:
    """Every entry under root: sha256 of regular files (see _digest for large ones), link targets, folders, and
    the kind of anything else (FIFOs, sockets, devices are never opened: reading a FIFO blocks)."""
    import stat

    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = _digest(p, st)
            else:
                out[rel] = f"special:{stat.S_IFMT(st.st_mode):o}"
    return out


def strict_json_problems(text: str) -> list[str]:
    def refuse(token):
        raise ValueError(f"bare {token} token")
    try:
        doc = json.loads(text, parse_constant=refuse)
    except ValueError as e:
        return [f"--json output is not strict JSON ({str(e)[:80]})"]
    bad = []

    def walk(x):
        if isinstance(x, float) and not math.isfinite(x):
            bad.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(doc)
    return ["non-finite number in --json output"] if bad else []


def output_problems(path: Path) -> list[str]:
    """A published checkpoint: loads with otfuse's reader (inspect --spaces) and AutoConfig, all finite."""
    import torch
    from safetensors.torch import load_file

    if not path.exists():
        return ["exit 0 but no output"]
    if path.is_dir() and not any(path.glob("*.safetensors")) and any(p.is_dir() for p in path.iterdir()):
        # fuse kept each parent's own task head: one model folder per parent, each checked as an output
        return [f"{m.name}: {x}" for m in sorted(p for p in path.iterdir() if p.is_dir()) for x in output_problems(m)]
    problems = []
    r = run_cli(["inspect", "--spaces", "--json", str(path)])
    if r["code"] != 0:
        lines = r["stderr"].strip().splitlines() or r["traceback"].strip().splitlines()[-1:] or [f"exit {r['code']}"]
        problems.append(f"output does not load: {lines[0]}"[:200])
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    for f in files:
        try:
            for k, v in load_file(f).items():
                if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
                    problems.append(f"output tensor {k!r} is not finite")
                    break
        except Exception as e:  # noqa: BLE001
            problems.append(f"output {f.name} does not load: {e}"[:200])
    if path.is_dir() and (path / "config.json").is_file():
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(str(path))
        except Exception as e:  # noqa: BLE001
            problems.append(f"output config.json does not load: {type(e).__name__}: {e}"[:200])
    return problems


def prepare(case: Case, corpus: Path, folder: Path) -> None:
    model, partner, data, _ = MODELS[case.family]
    for name in (model, partner, data):
        src = corpus / name
        if src.is_dir():
            shutil.copytree(src, folder / name)
        else:
            shutil.copyfile(src, folder / name)


def run_case(case: Case, corpus: Path, work: Path, timeout: int = DEFAULT_TIMEOUT, keep: bool = False) -> dict:
    """Build, mutate, run and judge one case. Returns a JSON-able record; `problems` empty means it held."""
    folder = Path(tempfile.mkdtemp(prefix=f"case{case.number:05d}-", dir=work))
    try:
        prepare(case, corpus, folder)
        apply_mutation(case, folder)
        nonfinite = holds_nonfinite(folder / case.target)
        before = sha_tree(folder)
        r = run_cli(case.argv(folder), timeout)
        after = sha_tree(folder)
        out = folder / ("out" + (".safetensors" if MODELS[case.family][3] == "file" else ""))
        outputs = {"out", "out.safetensors"} if case.command in ("fuse", "compress", "run") else set()
        problems: list[str] = []
        kinds: set[str] = set()
        changed = sorted(k for k in before if after.get(k) != before[k])
        if changed:
            problems.append("inputs changed: " + ", ".join(changed[:5]))
            kinds.add("input_changed")
        if r["hang"]:
            problems.append(f"hang: still running after {timeout} s")
            kinds.add("hang")
        elif r["traceback"] or r["code"] not in (0, 2) or "Traceback" in r["stderr"]:
            last = (r["traceback"].strip().splitlines() or [f"exit {r['code']}"])[-1]
            problems.append(f"traceback: {last}"[:300])
            kinds.add("traceback")
        elif r["code"] == 2:
            lines = r["stderr"].strip().splitlines()
            if len(lines) != 1 or not lines[0].startswith("error: "):
                problems.append(f"error output is {len(lines)} lines: {r['stderr'][:200]!r}")
                kinds.add("error_format")
            new = sorted(set(after) - set(before))
            if new:
                problems.append("new files after an error: " + ", ".join(new[:5]))
                kinds.add("leftover")
        else:  # exit 0
            new = sorted(k for k in set(after) - set(before) if k.split("/")[0] not in outputs)
            if new:
                problems.append("unexpected new files: " + ", ".join(new[:5]))
                kinds.add("leftover")
            if case.command in ("fuse", "compress", "run"):
                bad = output_problems(out)
                if bad:
                    problems += bad
                    kinds.add("bad_output")
            else:
                bad = strict_json_problems(r["stdout"])
                if bad:
                    problems += bad
                    kinds.add("bad_output")
            if nonfinite and case.command != "inspect":  # inspect only describes a file; the others use it
                problems.append("silently accepted non-finite input")
                kinds.add("silent_nonfinite")
        lines = r["stderr"].strip().splitlines()
        return {"case": asdict(case), "line": case.line(), "code": r["code"], "hang": r["hang"],
                "first_line": lines[0][:300] if lines else "", "problems": problems, "kinds": sorted(kinds),
                "nonfinite_input": nonfinite, "seconds": round(r["seconds"], 3), "folder": str(folder)}
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- many cases


def _limit_memory(gb: float) -> None:
    """Cap this process's address space: a mutation that makes otfuse allocate without bound (a config asking
    for 2**40 layers) then fails with MemoryError in its case instead of waking the OOM killer."""
    if gb and gb > 0:
        import resource

        limit = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _worker_main(corpus: str, work: str, timeout: int, seed: int, memory_gb: float) -> None:
    """`fuzz.py --worker ...`: read case numbers on stdin, answer `start N` then the record as one JSON line.
    The protocol runs on a private copy of stdout; fd 1 itself goes to stderr, so nothing a library prints
    can garble it."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import torch

    torch.set_num_threads(1)
    _limit_memory(memory_gb)
    for line in sys.stdin:
        number = int(line)
        proto.write(f"start {number}\n")
        rec = run_case(make_case(number, seed), Path(corpus), Path(work), timeout)
        proto.write(json.dumps(rec) + "\n")


def _died(number: int, seed: int, how: str, folder_hint: str = "") -> dict:
    case = make_case(number, seed)
    return {"case": asdict(case), "line": case.line(), "code": None, "hang": how.startswith("hang"),
            "first_line": "", "problems": [how], "kinds": ["hang" if how.startswith("hang") else "crash"],
            "nonfinite_input": False, "seconds": None, "folder": folder_hint}


class _Worker:
    def __init__(self, corpus: Path, work: Path, timeout: int, seed: int, memory_gb: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-B", str(Path(__file__).resolve()), "--worker", str(corpus), str(work), str(timeout),
             str(seed), str(memory_gb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env=dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")))
        self.case: int | None = None
        self.since = 0.0

    def give(self, number: int) -> None:
        self.case, self.since = number, time.monotonic()
        self.proc.stdin.write(f"{number}\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        with contextlib.suppress(Exception):
            self.proc.kill()
        self.proc.wait()


def run_many(numbers, seed: int, jobs: int = 2, timeout: int = DEFAULT_TIMEOUT, work: Path | None = None,
             progress=None, memory_gb: float = 4.0) -> list[dict]:
    """Run cases in `jobs` worker processes (jobs=0: in this process). A worker that dies (a segfault, the
    OOM killer) or stops answering is replaced, and its case is recorded as a crash or a hang, so one bad
    case never stalls or ends the run. Records come back in case order."""
    import selectors

    own = work is None
    work = Path(tempfile.mkdtemp(prefix="otfuse-fuzz-")) if own else work
    try:
        corpus = build_corpus(work / "corpus")
        todo = list(numbers)
        records: list[dict] = []

        def done(rec):
            records.append(rec)
            if progress:
                progress(rec)

        if jobs <= 0:
            for n in todo:
                done(run_case(make_case(n, seed), corpus, work, timeout))
            return sorted(records, key=lambda r: r["case"]["number"])
        todo.reverse()
        sel = selectors.DefaultSelector()
        workers: list[_Worker] = []

        def spawn():
            w = _Worker(corpus, work, timeout, seed, memory_gb)
            workers.append(w)
            sel.register(w.proc.stdout, selectors.EVENT_READ, w)
            if todo:
                w.give(todo.pop())
            else:
                w.case = None

        def retire(w: _Worker, how: str | None):
            sel.unregister(w.proc.stdout)
            w.stop()
            workers.remove(w)
            if how and w.case is not None:
                done(_died(w.case, seed, how))
            if todo:
                spawn()

        for _ in range(min(jobs, len(todo))):
            spawn()
        while workers:
            for key, _ in sel.select(timeout=1.0):
                w: _Worker = key.data
                line = w.proc.stdout.readline()
                if not line:  # the worker died mid-case
                    w.proc.wait()
                    retire(w, f"crash: the process died ({_signal_name(w.proc.returncode)})")
                    continue
                if line.startswith("start "):
                    continue
                done(json.loads(line))
                if todo:
                    w.give(todo.pop())
                else:
                    w.case = None
                    retire(w, None)
            for w in list(workers):  # stuck where the in-process alarm cannot reach (inside C code)
                if w.case is not None and time.monotonic() - w.since > timeout + 60:
                    retire(w, f"hang: no answer after {timeout + 60} s (worker killed)")
        return sorted(records, key=lambda r: r["case"]["number"])
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _signal_name(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit {code}"


def summarize(records: list[dict]) -> dict:
    kinds = ("traceback", "crash", "hang", "silent_nonfinite", "input_changed", "error_format", "leftover",
             "bad_output")
    s = {"cases": len(records), "exit 0": sum(r["code"] == 0 for r in records),
         "exit 2": sum(r["code"] == 2 for r in records)}
    for k in kinds:
        s[k] = sum(k in r["kinds"] for r in records)
    s["nonfinite inputs"] = sum(r["nonfinite_input"] for r in records)
    s["failed cases"] = sum(bool(r["problems"]) for r in records)
    return s


LABELS = {"cases": "cases", "exit 0": "exit 0", "exit 2": "exit 2", "traceback": "tracebacks (exit ≠ 0/2)",
          "crash": "crashes (process died: segfault, OOM kill)", "hang": "hangs (timeout)", "silent_nonfinite": "silent acceptances of non-finite input",
          "input_changed": "inputs changed", "error_format": "errors not one `error:` line",
          "leftover": "files left behind", "bad_output": "exit 0 with a bad output / non-strict JSON",
          "nonfinite inputs": "(cases whose input held NaN/Inf)", "failed cases": "failed cases (any of the above)"}


def table(summary: dict) -> str:
    rows = ["| | count |", "|---|---:|"] + [f"| {LABELS[k]} | {v} |" for k, v in summary.items()]
    return "\n".join(rows)


def by_command(records: list[dict]) -> str:
    rows = ["| command | cases | exit 0 | exit 2 | failed |", "|---|---:|---:|---:|---:|"]
    for c in ALL_COMMANDS:
        rs = [r for r in records if r["case"]["command"] == c]
        rows.append(f"| {c} | {len(rs)} | {sum(r['code'] == 0 for r in rs)} | {sum(r['code'] == 2 for r in rs)} | "
                    f"{sum(bool(r['problems']) for r in rs)} |")
    return "\n".join(rows)


def mutation_family(line: str) -> str:
    """The mutator behind a case's description: 'flip_header: ...' -> flip_header, 'config hidden_size: ...' ->
    config.json, 'data: label_high' -> data (semantic), 'jsonl line 3: ...' -> jsonl."""
    if line.startswith("data "):
        return "data " + line.split()[1].rstrip(":")
    if line.startswith("data:"):
        return "data semantic"
    if line.startswith(("config", "tokenizer.json", "jsonl")):
        return {"config": "config.json", "tokenizer.json": "tokenizer.json", "jsonl": "jsonl"}[
            next(k for k in ("config", "tokenizer.json", "jsonl") if line.startswith(k))]
    return line.split(":")[0]


def by_mutation(records: list[dict]) -> str:
    rows = ["| mutation | cases | exit 0 | exit 2 | failed |", "|---|---:|---:|---:|---:|"]
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(mutation_family(r["case"]["mutation"]), []).append(r)
    for name in sorted(groups):
        rs = groups[name]
        rows.append(f"| {name} | {len(rs)} | {sum(r['code'] == 0 for r in rs)} | {sum(r['code'] == 2 for r in rs)} | "
                    f"{sum(bool(r['problems']) for r in rs)} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=300, help="number of cases (numbered from --start)")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="worker processes (0: run the cases in this process)")
    ap.add_argument("--memory-gb", type=float, default=4.0, help="address-space cap per worker (0: none)")
    ap.add_argument("--worker", nargs=5, metavar=("CORPUS", "WORK", "TIMEOUT", "SEED", "MEMORY_GB"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, help="seconds before a case counts as a hang")
    ap.add_argument("--case", type=int, default=None, help="replay one case, verbosely")
    ap.add_argument("--keep", type=Path, default=None, help="with --case: keep the case folder under this path")
    ap.add_argument("--json", type=Path, default=None, help="write every record to this file")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    if args.worker:
        corpus, work, timeout, seed, memory_gb = args.worker
        _worker_main(corpus, work, int(timeout), int(seed), float(memory_gb))
        return 0

    if args.case is not None:
        _limit_memory(args.memory_gb)
        work = args.keep or Path(tempfile.mkdtemp(prefix="otfuse-fuzz-"))
        work.mkdir(parents=True, exist_ok=True)
        corpus = build_corpus(work / "corpus")
        case = make_case(args.case, args.seed)
        rec = run_case(case, corpus, work, args.timeout, keep=args.keep is not None)
        print(json.dumps(rec, indent=2))
        print("command: otfuse " + " ".join(make_case(args.case, args.seed).argv(Path(rec["folder"]))))
        return 1 if rec["problems"] else 0

    t0 = time.monotonic()
    done = [0]

    def progress(rec):
        done[0] += 1
        if not args.quiet and (done[0] % 100 == 0 or rec["problems"]):
            mark = "FAIL " + "; ".join(rec["problems"])[:200] if rec["problems"] else "ok"
            print(f"[{done[0]}/{args.cases} {time.monotonic() - t0:.0f}s] {rec['line'][:120]} -> {mark}",
                  file=sys.stderr, flush=True)

    records = run_many(range(args.start, args.start + args.cases), args.seed, jobs=args.jobs,
                       timeout=args.timeout, progress=progress, memory_gb=args.memory_gb)
    elapsed = time.monotonic() - t0
    summary = summarize(records)
    print(f"otfuse fuzz: {args.cases} cases from #{args.start}, seed {args.seed}, {args.jobs} jobs, "
          f"timeout {args.timeout} s, {args.memory_gb:g} GB per worker, {elapsed:.0f} s")
    print(table(summary))
    print()
    print(by_command(records))
    print()
    print(by_mutation(records))
    failed = [r for r in records if r["problems"]]
    if failed:
        print(f"\n{len(failed)} failing cases (replay: python benchmarks/fuzz.py --case N --seed {args.seed}):")
        for r in failed:
            print(f"  {r['line'][:140]}\n      exit {r['code']}: {r['first_line'][:160]} | {'; '.join(r['problems'])[:300]}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "seconds": elapsed, "records": records}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
