"""The bad-input catalogue (issue 14): every case the issue lists, the README's promise for each subcommand
(inspect, align, fuse, evaluate, compress, stats, run), and the cases benchmarks/fuzz.py found.

The promise: bad input gets exit code 2 and exactly one stderr line starting `error: `, never a traceback,
never a partial output, never a lost or changed file. Every case runs in a fresh copy of small real inputs
(the digits MLPs/CNNs, the sentiment BERTs, a slice of their data) under tmp_path and checks, on top of the
exit code and the line, that nothing appeared anywhere under tmp_path and that every file there is
byte-identical (sha256) afterwards.

How a case runs: most in-process (typer's CliRunner, fast; an uncaught exception counts as a traceback); the
ones that need a real process (a working folder, a file-size limit, a process that dies between two renames or
cannot rename, torch's warnings) in a child forked from a server that imported otfuse once; a few as
`python -m otfuse_cli` (conftest's cli_subprocess) for full realism, and the signal tests as their own
processes, signalled while they compute or write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, cli, cli_subprocess

sys.path.insert(0, str(REPO / "benchmarks"))
from fuzz import sha_tree, strict_json_problems  # noqa: E402  (the fuzzer's tree snapshot and strict-JSON check)
from models import mlp

FIX = REPO / "fixtures"


# ---------------------------------------------------------------- running and judging


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    traceback: str = ""
    grew_mb: float | None = None  # forked runs: peak resident memory above what the child started with

    def describe(self) -> str:
        lines = self.stderr.strip().splitlines()
        first = lines[0] if lines else "(stderr empty)"
        tb = self.traceback or (self.stderr if "Traceback" in self.stderr else "")
        tb = f"; uncaught {tb.strip().splitlines()[-1]}" if tb else ""
        more = f" (+{len(lines) - 1} more stderr lines)" if len(lines) > 1 else ""
        return f"exit {self.code}; {first[:300]}{more}{tb}"


def run_inprocess(*args) -> Outcome:
    result = cli(*args)
    tb = ""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "Traceback (in-process)\n" + "".join(traceback.format_exception(*result.exc_info))
    return Outcome(result.exit_code, result.stdout, result.stderr, tb)


def subprocess_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                PYTHONDONTWRITEBYTECODE="1")


def run_subprocess(*args, cwd=None) -> Outcome:
    """`python -m otfuse_cli ARGS` as a user runs it (conftest's cli_subprocess; 120 s before it is a hang)."""
    try:
        cp = cli_subprocess(*args, cwd=cwd)
    except subprocess.TimeoutExpired:
        return Outcome(-1, "", "(hang: still running after 120 s)")
    return Outcome(cp.returncode, cp.stdout, cp.stderr)


# A real process per command without paying Python/torch imports each time: a server process imports otfuse
# and its heavy dependencies once (running no torch op, so no thread pool exists yet) and forks one child per
# command. The child sets up the case (working folder, a resource limit, a failing or lethal rename), runs
# the console entry point `otfuse_cli.cli.main()` with its stdout/stderr on files, and leaves with its exit
# code through os._exit: no cleanup that a killed process would not get either.
FORK_SERVER = r"""
import ctypes, errno, json, os, resource, signal, sys, time
import torch, safetensors.torch, scipy.optimize, ot, transformers
from transformers import BertForSequenceClassification, AutoConfig, PreTrainedTokenizerFast
import otfuse_cli.cli, otfuse_cli.fusion, otfuse_cli.compression, otfuse_cli.evaluation, otfuse_cli.pipeline

def hooks(job):
    hook = job.get("hook") or {}
    kind = hook.get("kind")
    if kind == "memory":        # a cap, so that a runaway allocation fails here instead of waking the OOM killer
        resource.setrlimit(resource.RLIMIT_AS, (hook["bytes"], hook["bytes"]))
    if kind == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes past the limit fail with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (hook["bytes"], hook["bytes"]))
    if kind == "die_at":        # os._exit just before the n-th rename of any kind: as if SIGKILLed there
        calls = [0]
        def counted(real):
            def rename(*a, **k):
                calls[0] += 1
                if calls[0] == hook["n"]:
                    os._exit(137)
                return real(*a, **k)
            return rename
        os.rename, os.replace = counted(os.rename), counted(os.replace)
        class Counted:
            def __init__(self, fn):
                object.__setattr__(self, "fn", fn)
            def __setattr__(self, name, value):
                setattr(self.fn, name, value)
            def __getattr__(self, name):
                return getattr(self.fn, name)
            def __call__(self, *a):
                return counted(self.fn)(*a)
        real_cdll = ctypes.CDLL
        class CDLL(real_cdll):
            def __getattr__(self, name):
                if name == "renameat2" and hook.get("mode") == "fallback":
                    raise AttributeError(name)       # an OS without renameat2: the portable path
                fn = real_cdll.__getattr__(self, name)
                return Counted(fn) if name.startswith("rename") else fn
        ctypes.CDLL = CDLL
    if kind == "busy":          # the old output cannot be moved (a mount point)
        target = os.path.realpath(hook["target"])
        def refusing(real):
            def rename(src, dst, *a, **k):
                if os.path.realpath(src) == target:
                    raise OSError(errno.EBUSY, "Device or resource busy", str(src))
                return real(src, dst, *a, **k)
            return rename
        os.rename, os.replace = refusing(os.rename), refusing(os.replace)
        real_cdll = ctypes.CDLL
        class CDLL(real_cdll):
            def __getattr__(self, name):
                if name == "renameat2":
                    raise AttributeError(name)
                return real_cdll.__getattr__(self, name)
        ctypes.CDLL = CDLL

def child(job):
    for fd, path in ((1, job["out"]), (2, job["err"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    if job.get("cwd"):
        os.chdir(job["cwd"])
    hooks(job)
    sys.argv = ["otfuse", *job["argv"]]
    code = 0
    try:
        otfuse_cli.cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

def resident_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush()
    base = resident_kb()  # a forked child starts with the server's resident pages
    pid = os.fork()
    if pid == 0:
        child(job)
    end = time.monotonic() + job["timeout"]
    status, hang = None, False
    while status is None:
        done, st, usage = os.wait4(pid, os.WNOHANG)
        if done:
            status = st
        elif time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            hang = True
        else:
            time.sleep(0.005)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status), "hang": hang,
                      "grew_mb": (usage.ru_maxrss - base) / 1024}), flush=True)
"""


class ForkServer:
    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.count = 0
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)

    def run(self, *args, cwd=None, hook: dict | None = None, timeout: int = 120) -> Outcome:
        self.count += 1
        out, err = self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"
        job = {"argv": [str(a) for a in args], "cwd": str(cwd) if cwd else None, "hook": hook, "out": str(out),
               "err": str(err), "timeout": timeout}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        reply = json.loads(line)
        if reply["hang"]:
            return Outcome(-1, out.read_text(), f"(hang: still running after {timeout} s)", grew_mb=reply["grew_mb"])
        return Outcome(reply["code"], out.read_text(), err.read_text(), grew_mb=reply["grew_mb"])

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def forked(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("fork_server"))
    yield server
    server.close()


def tree_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return ([f"new: {', '.join(new)}"] if new else []) + ([f"gone: {', '.join(gone)}"] if gone else []) + \
        ([f"changed: {', '.join(changed)}"] if changed else [])


def one_line_problems(o: Outcome, fragment: str | None = None) -> list[str]:
    """conftest's assert_one_line_error, collected rather than raised (plus the exit code), so that a failing
    case reports everything that is wrong with it at once."""
    problems = []
    if o.code != 2:
        problems.append(f"exit code {o.code}, expected 2")
    lines = o.stderr.strip().splitlines()
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines, expected 1")
    if not lines or not lines[0].startswith("error: "):
        problems.append("stderr does not start with 'error: '")
    if "Traceback" in o.stderr or o.traceback:
        problems.append("traceback")
    if fragment and lines and not re.search(fragment, lines[0], re.I):
        problems.append(f"the error line does not match /{fragment}/")
    return problems


class Workspace:
    """A fresh copy of the inputs under root/in; everything under root is watched."""

    def __init__(self, root: Path, base: Path):
        self.root = root
        self.inp = root / "in"
        shutil.copytree(base, self.inp, symlinks=True)

    def fmt(self, args) -> list[str]:
        return [str(a).format(i=self.inp, t=self.root) for a in args]

    def snapshot(self) -> dict[str, str]:
        return sha_tree(self.root)


def refused(ws: Workspace, *args, fragment: str | None = None, sub: bool = False, cwd=None,
            forked: ForkServer | None = None, hook: dict | None = None, timeout: int = 120) -> Outcome:
    """Run the command (in-process, forked from the server with `forked`, or as `python -m otfuse_cli` with
    `sub`); assert exit 2, one `error: ` line, no traceback, nothing new, every input unchanged."""
    before = ws.snapshot()
    args = ws.fmt(args)
    if forked is not None:
        o = forked.run(*args, cwd=cwd, hook=hook, timeout=timeout)
    elif sub:
        o = run_subprocess(*args, cwd=cwd)
    else:
        o = run_inprocess(*args)
    problems = one_line_problems(o, fragment) + tree_changes(before, ws.snapshot())
    assert not problems, f"{o.describe()} | " + "; ".join(problems) + (f"\n{o.traceback}" if o.traceback else "")
    return o


def leftovers(folder: Path, keep: set[str] = frozenset()) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def check_output(path: Path) -> list[str]:
    """A published output: loads with otfuse's own reader (and the HF config loader for folders), all finite."""
    problems = []
    if not path.exists():
        return [f"{path.name} missing"]
    o = run_inprocess("inspect", "--spaces", "--json", path)
    if o.code != 0:
        problems.append(f"output does not load: {o.describe()}")
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    for f in files:
        try:
            for k, t in load_file(f).items():
                if t.is_floating_point() and not torch.isfinite(t).all():
                    problems.append(f"non-finite values in output tensor {k}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"{f.name} does not load: {e}")
    if path.is_dir() and (path / "config.json").is_file():
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(path)
        except Exception as e:  # noqa: BLE001
            problems.append(f"config.json does not load: {type(e).__name__}: {e}")
    return problems


# ---------------------------------------------------------------- inputs


def _first(n: int, src: Path, dst: Path) -> None:
    d = load_file(src)
    save_file({"x": d["x"][:n].contiguous(), "y": d["y"][:n].contiguous()}, dst)


def set_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


DELETE = object()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Small real inputs, built once: the digits MLPs/CNNs, the sentiment BERTs, 64 digits, 48 reviews, a plan
    file, a sharded BERT, an empty folder."""
    root = tmp_path_factory.mktemp("catalogue_base")
    for name in ("mlp_a", "mlp_b", "cnn_a", "cnn_b"):
        shutil.copyfile(FIX / "digits" / f"{name}.safetensors", root / f"{name}.safetensors")
    for name in ("bert_a", "bert_b"):
        shutil.copytree(FIX / "sentiment" / name, root / name)
    _first(64, FIX / "digits" / "test.safetensors", root / "digits.safetensors")
    lines = (FIX / "sentiment" / "test.jsonl").read_text().splitlines()[:48]
    (root / "sent.jsonl").write_text("\n".join(lines) + "\n")
    (root / "dir").mkdir()
    scratch = tmp_path_factory.mktemp("catalogue_scratch")
    o = run_inprocess("align", root / "mlp_a.safetensors", root / "mlp_b.safetensors", "-o",
                      scratch / "plans.safetensors", "--refine", "1")
    assert o.code == 0, o.describe()
    shutil.copyfile(scratch / "plans.safetensors", root / "plans.safetensors")
    o = run_inprocess("fuse", root / "bert_a", root / "bert_b", "-o", scratch / "sharded", "--align", "none",
                      "--max-shard-size", "300KB")
    assert o.code == 0, o.describe()
    shutil.copytree(scratch / "sharded", root / "sharded")
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    return root


@pytest.fixture
def ws(base, tmp_path) -> Workspace:
    return Workspace(tmp_path, base)


# Setups: each mutates the workspace copy before the snapshot is taken.

def empty_header(ws: Workspace) -> None:
    raw = b"{}" + b" " * 6
    (ws.inp / "empty.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)


def int_mlps(ws: Workspace) -> None:
    for seed, name in ((0, "int_a"), (1, "int_b")):
        sd = mlp((20, 16, 12, 5), seed).state_dict()
        save_file({k: (v * 100).round().to(torch.int64).contiguous() for k, v in sd.items()},
                  ws.inp / f"{name}.safetensors")


def zero_width_mlps(ws: Workspace) -> None:
    for seed, name in ((0, "zero_a"), (1, "zero_b")):
        g = torch.Generator().manual_seed(seed)
        save_file({"0.weight": torch.zeros(0, 20), "0.bias": torch.zeros(0),
                   "2.weight": torch.zeros(5, 0), "2.bias": torch.randn(5, generator=g)},
                  ws.inp / f"{name}.safetensors")
    save_file({"x": torch.randn(16, 20), "y": torch.randint(0, 5, (16,))}, ws.inp / "x20.safetensors")


def nan_mlp(ws: Workspace) -> None:
    sd = load_file(ws.inp / "mlp_a.safetensors")
    sd["4.weight"][0, 0] = float("nan")
    save_file(sd, ws.inp / "nan_mlp.safetensors", metadata=_meta(ws.inp / "mlp_a.safetensors"))
    sd = load_file(ws.inp / "mlp_a.safetensors")
    sd["0.bias"][:3] = float("-inf")  # found by the fuzzer: ReLU turns these into zeros, metrics stay finite
    save_file(sd, ws.inp / "ninf_bias_mlp.safetensors", metadata=_meta(ws.inp / "mlp_a.safetensors"))


def huge_mlp(ws: Workspace) -> None:
    sd = load_file(ws.inp / "mlp_a.safetensors")
    sd["4.weight"] *= 1e37  # logits overflow to ±inf: NLL is not finite
    save_file(sd, ws.inp / "huge_mlp.safetensors", metadata=_meta(ws.inp / "mlp_a.safetensors"))


def _meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def bad_digits(ws: Workspace) -> None:
    d = load_file(ws.inp / "digits.safetensors")
    for name, fn in (("nan", lambda x: x.__setitem__((3, 0, 5, 5), float("nan"))),
                     ("inf", lambda x: x.__setitem__((0, 0, 0, 0), float("inf"))),
                     ("ninf", lambda x: x.__setitem__((7, 0, 9, 9), float("-inf")))):
        x = d["x"].clone()
        fn(x)
        save_file({"x": x, "y": d["y"]}, ws.inp / f"digits_{name}.safetensors")
    y = d["y"].clone()
    y[0] = 10
    save_file({"x": d["x"], "y": y}, ws.inp / "digits_label10.safetensors")
    y = d["y"].clone()
    y[0] = -1
    save_file({"x": d["x"], "y": y}, ws.inp / "digits_labelneg.safetensors")
    save_file({"x": d["x"] * 0 + 1.7e38, "y": d["y"]}, ws.inp / "digits_huge.safetensors")  # finite, overflows
    save_file({"x": d["x"], "y": d["y"] > 4}, ws.inp / "digits_ybool.safetensors")
    save_file({"x": d["x"], "y": d["y"].float() + 0.5}, ws.inp / "digits_yfloat.safetensors")
    save_file({"x": torch.rand(16, 3, 8, 8), "y": torch.randint(0, 10, (16,))}, ws.inp / "rgb.safetensors")
    save_file({"y": d["y"]}, ws.inp / "no_x.safetensors")
    save_file({"x": d["x"], "y": d["y"][:10]}, ws.inp / "short_y.safetensors")


def bad_text(ws: Workspace) -> None:
    lines = (ws.inp / "sent.jsonl").read_text().splitlines()
    rec = [json.loads(line) for line in lines]
    (ws.inp / "label5.jsonl").write_text("\n".join(json.dumps({**r, "label": 5}) for r in rec) + "\n")
    (ws.inp / "labelname.jsonl").write_text("\n".join(json.dumps({**r, "label": "maybe"}) for r in rec) + "\n")
    (ws.inp / "nolabel.jsonl").write_text("\n".join(json.dumps({"text": r["text"]}) for r in rec[:8]) + "\n")
    (ws.inp / "broken.jsonl").write_text(lines[0] + "\n{not json\n")
    (ws.inp / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage\x80\x81\n")
    (ws.inp / "empty.jsonl").write_text("")
    (ws.inp / "data.xyz").write_text("x")


def extra_tensor_bert(ws: Workspace) -> None:
    folder = ws.inp / "bert_extra"
    shutil.copytree(ws.inp / "bert_a", folder)
    sd = load_file(folder / "model.safetensors")
    sd["bert.encoder.layer.0.attention.self.surprise.weight"] = torch.randn(64, 64)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def config_mutant(**changes):
    def setup(ws: Workspace) -> None:
        folder = ws.inp / "bert_m"
        shutil.copytree(ws.inp / "bert_a", folder)
        set_config(folder, **changes)
    setup.__name__ = "config_" + "_".join(changes)
    return setup


def plan_mutant(kind: str):
    def setup(ws: Workspace) -> None:
        from safetensors import safe_open

        src = ws.inp / "plans.safetensors"
        with safe_open(str(src), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(src)
        key = next(k for k in sorted(tensors) if k.endswith(("/coupling", "/index")))
        if kind == "nan" and key.endswith("/index"):  # a NaN needs a float coupling: this plan written densely
            index = tensors.pop(key)
            key = key.replace("/index", "/coupling")
            tensors[key] = torch.zeros(len(index), len(index), dtype=torch.float64)
            tensors[key][index, torch.arange(len(index))] = 1.0 / len(index)
        if kind == "bad_key":
            tensors["garbage"] = tensors.pop(key)
        elif kind == "model_index":
            tensors["7" + key[key.index("/"):]] = tensors.pop(key)
        elif kind == "negative_index":
            tensors["-1" + key[key.index("/"):]] = tensors.pop(key)
        elif kind == "unknown_space":
            tensors[key.split("/")[0] + "/nospace/" + key.rsplit("/", 1)[1]] = tensors.pop(key)
        elif kind == "shape":
            tensors[key] = tensors[key][:-1].contiguous()
        elif kind == "index_not_permutation":
            tensors[key] = torch.zeros_like(tensors[key])
        elif kind == "index_float":
            tensors[key] = tensors[key].double()
        elif kind == "nan":
            tensors[key] = tensors[key].clone()
            tensors[key][0, 0] = float("nan")
        elif kind == "no_meta":
            meta = {}
        elif kind == "meta_models":
            doc = json.loads(meta["otfuse.plans"])
            doc["models"] = "two"
            meta["otfuse.plans"] = json.dumps(doc)
        elif kind == "meta_garbage":
            meta["otfuse.plans"] = "{not json"
        save_file(tensors, ws.inp / "plans_bad.safetensors", metadata=meta)
    setup.__name__ = "plan_" + kind
    return setup


def plain_file(ws: Workspace) -> None:
    (ws.inp / "afile").write_text("not a folder")
    (ws.inp / "notes.png").write_bytes(b"\x89PNG precious")
    (ws.inp / "text.safetensors").write_text("just some text, not safetensors")
    (ws.inp / "no_weights").mkdir()
    (ws.inp / "no_weights" / "config.json").write_text("{}")
    data = (ws.inp / "mlp_a.safetensors").read_bytes()
    (ws.inp / "trunc.safetensors").write_bytes(data[: len(data) // 2])


def symlinked(ws: Workspace) -> None:
    (ws.root / "link.safetensors").symlink_to(ws.inp / "mlp_a.safetensors")


# ---------------------------------------------------------------- A. outputs never touch inputs

A, B = "{i}/mlp_a.safetensors", "{i}/mlp_b.safetensors"
BA, BB = "{i}/bert_a", "{i}/bert_b"
D = "{i}/digits.safetensors"
OVERLAP = r"input"

OUTPUT_TOUCHES_INPUT = {
    "fuse -o A --force": ["fuse", A, B, "-o", A, "--force"],
    "fuse -o B --force": ["fuse", A, B, "-o", B, "--force"],
    "fuse -o A (no --force)": ["fuse", A, B, "-o", A],
    "fuse -o dir/../A --force": ["fuse", A, B, "-o", "{i}/dir/../mlp_a.safetensors", "--force"],
    "fuse -o folder holding the inputs --force": ["fuse", A, B, "-o", "{i}", "--force"],
    "fuse folders -o bert_a --force": ["fuse", BA, BB, "-o", BA, "--force"],
    "fuse folders -o bert_b --force": ["fuse", BA, BB, "-o", BB, "--force"],
    "fuse folders -o bert_a/model.safetensors --force": ["fuse", BA, BB, "-o", BA + "/model.safetensors", "--force"],
    "fuse folders -o bert_a/config.json --force": ["fuse", BA, BB, "-o", BA + "/config.json", "--force"],
    "fuse folders -o bert_a/fused.safetensors": ["fuse", BA, BB, "-o", BA + "/fused.safetensors"],
    "fuse folders -o bert_a/sub/fused": ["fuse", BA, BB, "-o", BA + "/sub/fused"],
    "fuse sharded -o its shard --force": ["fuse", "{i}/sharded", BB, "-o",
                                          "{i}/sharded/model-00001-of-00003.safetensors", "--force"],
    "fuse sharded -o its index --force": ["fuse", "{i}/sharded", BB, "-o",
                                          "{i}/sharded/model.safetensors.index.json", "--force"],
    "fuse --plan P -o P --force": ["fuse", A, B, "--plan", "{i}/plans.safetensors", "-o", "{i}/plans.safetensors",
                                   "--force"],
    "fuse --data D -o D --force": ["fuse", A, B, "--align", "activations", "--data", D, "-o", D, "--force"],
    "fuse --repair-bn --data D -o D --force": ["fuse", "{i}/cnn_a.safetensors", "{i}/cnn_b.safetensors",
                                               "--repair-bn", "--data", D, "-o", D, "--force"],
    "compress A -o A --force": ["compress", A, "-o", A, "--ratio", "0.5", "--force"],
    "compress bert_a -o bert_a --force": ["compress", BA, "-o", BA, "--width", "ffn=64", "--force"],
    "compress bert_a -o bert_a/model.safetensors --force": ["compress", BA, "-o", BA + "/model.safetensors",
                                                            "--width", "ffn=64", "--force"],
    "compress --data D -o D --force": ["compress", A, "--align", "activations", "--data", D, "-o", D, "--ratio",
                                       "0.5", "--force"],
    "align A B -o A --force": ["align", A, B, "-o", A, "--force"],
    "align A B -o B --force": ["align", A, B, "-o", B, "--force"],
    "align bert_a bert_b -o bert_a/plans.safetensors": ["align", BA, BB, "-o", BA + "/plans.safetensors"],
    "align --data D -o D --force": ["align", A, B, "--align", "activations", "--data", D, "-o", D, "--force"],
    "evaluate --interpolate A B --plot A": ["evaluate", "--interpolate", A, B, "--data", D, "--steps", "3",
                                            "--plot", A],
    "evaluate --interpolate A B --plot A --force": ["evaluate", "--interpolate", A, B, "--data", D, "--steps", "3",
                                                    "--plot", A, "--force"],
    "evaluate --interpolate A B --plot B": ["evaluate", "--interpolate", A, B, "--data", D, "--steps", "3",
                                            "--plot", B],
    "evaluate --interpolate A B --plot D": ["evaluate", "--interpolate", A, B, "--data", D, "--steps", "3",
                                            "--plot", D],
    "evaluate --interpolate bert --plot bert_a/config.json": [
        "evaluate", "--interpolate", BA, BB, "--data", "{i}/sent.jsonl", "--steps", "2", "--plot",
        BA + "/config.json"],
}


@pytest.mark.parametrize("args", OUTPUT_TOUCHES_INPUT.values(), ids=OUTPUT_TOUCHES_INPUT.keys())
def test_output_never_touches_an_input(ws, args):
    refused(ws, *args)


@pytest.fixture(scope="module")
def stats_pair(base, tmp_path_factory) -> Path:
    """`otfuse stats` of both digit MLPs on the 64 digits (written once, copied into the cases that need them)."""
    root = tmp_path_factory.mktemp("stats_pair")
    for name in ("mlp_a", "mlp_b"):
        o = run_inprocess("stats", base / f"{name}.safetensors", "-o", root / f"{name}.stats.safetensors", "--data",
                          base / "digits.safetensors")
        assert o.code == 0, o.describe()
    return root


SA, SB = "{i}/mlp_a.stats.safetensors", "{i}/mlp_b.stats.safetensors"
STATS_TOUCH_INPUT = {
    "stats A -o A --force": ["stats", A, "-o", A, "--data", D, "--force"],
    "stats A -o D --force": ["stats", A, "-o", D, "--data", D, "--force"],
    "stats bert_a -o bert_a/stats.safetensors": ["stats", BA, "-o", BA + "/stats.safetensors", "--data",
                                                 "{i}/sent.jsonl"],
    "fuse --stats SA SB -o SA --force": ["fuse", A, B, "--merge", "regmean", "--stats", SA, "--stats", SB, "-o", SA,
                                         "--force"],
    "fuse --stats SA SB -o SB --force": ["fuse", A, B, "--merge", "fisher", "--stats", SA, "--stats", SB, "-o", SB,
                                         "--force"],
}


@pytest.mark.parametrize("args", STATS_TOUCH_INPUT.values(), ids=STATS_TOUCH_INPUT.keys())
def test_stats_output_never_touches_an_input(ws, stats_pair, args):
    for f in stats_pair.iterdir():
        shutil.copyfile(f, ws.inp / f.name)
    refused(ws, *args)


STATS_BAD = {
    "stats NaN data": ["stats", A, "-o", "{t}/s.safetensors", "--data", "{i}/digits_nan.safetensors"],
    "stats bert on images": ["stats", BA, "-o", "{t}/s.safetensors", "--data", D],
    "stats without --data": ["stats", A, "-o", "{t}/s.safetensors"],
    "stats --device tpu": ["stats", A, "-o", "{t}/s.safetensors", "--data", D, "--device", "tpu"],
    "stats --kind foo": ["stats", A, "-o", "{t}/s.safetensors", "--data", D, "--kind", "foo"],
    "stats existing output": ["stats", A, "-o", "{i}/mlp_b.stats.safetensors", "--data", D],
    "fuse --stats for the other pair": ["fuse", "{i}/cnn_a.safetensors", "{i}/cnn_b.safetensors", "--merge",
                                        "regmean", "--stats", SA, "--stats", SB, "-o", "{t}/o.safetensors"],
    "fuse --stats one file for two models": ["fuse", A, B, "--merge", "regmean", "--stats", SA, "-o",
                                             "{t}/o.safetensors"],
    "fuse --stats swapped order": ["fuse", A, B, "--merge", "regmean", "--stats", SB, "--stats", SA, "-o",
                                   "{t}/o.safetensors"],
    "fuse --stats a data file": ["fuse", A, B, "--merge", "regmean", "--stats", D, "--stats", D, "-o",
                                 "{t}/o.safetensors"],
    "fuse --stats a plan file": ["fuse", A, B, "--merge", "fisher", "--stats", "{i}/plans.safetensors", "--stats",
                                 "{i}/plans.safetensors", "-o", "{t}/o.safetensors"],
    "fuse --merge regmean, NaN in a Gram": ["fuse", A, B, "--merge", "regmean", "--stats",
                                            "{i}/nan_gram.stats.safetensors", "--stats", SB, "-o", "{t}/o.safetensors"],
    "fuse --merge fisher, Inf in a Fisher": ["fuse", A, B, "--merge", "fisher", "--stats", SA, "--stats",
                                             "{i}/inf_fisher.stats.safetensors", "-o", "{t}/o.safetensors"],
    "fuse --regmean-alpha nan": ["fuse", A, B, "--merge", "regmean", "--stats", SA, "--stats", SB, "-o",
                                 "{t}/o.safetensors", "--regmean-alpha", "nan"],
    "fuse --regmean-alpha 2": ["fuse", A, B, "--merge", "regmean", "--stats", SA, "--stats", SB, "-o",
                               "{t}/o.safetensors", "--regmean-alpha", "2"],
}


@pytest.mark.parametrize("args", STATS_BAD.values(), ids=STATS_BAD.keys())
def test_stats_files_and_options_checked(ws, stats_pair, args):
    for f in stats_pair.iterdir():
        shutil.copyfile(f, ws.inp / f.name)
    for src, prefix, value, name in (("mlp_a", "gram/", float("nan"), "nan_gram"),
                                     ("mlp_b", "fisher/", float("inf"), "inf_fisher")):
        sd = load_file(ws.inp / f"{src}.stats.safetensors")
        key = next(k for k in sorted(sd) if k.startswith(prefix) and sd[k].numel())  # a tensor the merge reads
        sd[key] = sd[key].clone()
        sd[key].view(-1)[0] = value
        save_file(sd, ws.inp / f"{name}.stats.safetensors", metadata=_meta(ws.inp / f"{src}.stats.safetensors"))
    bad_digits(ws)
    refused(ws, *args)


def test_output_through_a_symlink_to_an_input(ws):
    symlinked(ws)
    refused(ws, "fuse", A, B, "-o", "{t}/link.safetensors", "--force", fragment=OVERLAP)


def test_output_inside_an_input_folder_keeps_it_loadable(ws):
    """The input folder must stay a loadable model afterwards (no second .safetensors file inside it)."""
    refused(ws, "fuse", BA, BB, "-o", BA + "/fused.safetensors")
    assert run_inprocess("inspect", ws.inp / "bert_a").code == 0


# ---------------------------------------------------------------- B. one line instead of a traceback

CONFIG_MUTANTS = {
    "num_hidden_layers='two'": {"num_hidden_layers": "two"},
    "hidden_size='7'": {"hidden_size": "7"},
    "hidden_size='64'": {"hidden_size": "64"},
    "id2label as a list": {"id2label": ["negative", "positive"]},
    "model_type as a list": {"model_type": ["bert"]},
    "num_attention_heads=0": {"num_attention_heads": 0},
    "num_attention_heads=-4": {"num_attention_heads": -4},
    "intermediate_size=null": {"intermediate_size": None},
    "num_hidden_layers=1": {"num_hidden_layers": 1},
    "num_hidden_layers=-1": {"num_hidden_layers": -1},
    "num_hidden_layers=3": {"num_hidden_layers": 3},
    "architectures as a string": {"architectures": "BertForSequenceClassification"},
    "vocab_size=1000 (weights have 2000)": {"vocab_size": 1000},
    "hidden_size missing": {"hidden_size": DELETE},
    "layer_norm_eps='x'": {"layer_norm_eps": "x"},
    "pad_token_id=2**40": {"pad_token_id": 2**40},  # found by the fuzzer (seed 1)
    "pad_token_id=vocab_size": {"pad_token_id": 2000},
    "pad_token_id='0'": {"pad_token_id": "0"},
    "eos_token_id=[0, 2**40]": {"eos_token_id": [0, 2**40]},
    "bos_token_id=-5000": {"bos_token_id": -5000},
}
CONFIG_COMMANDS = {
    "inspect --spaces": ["inspect", "--spaces", "{i}/bert_m"],
    "fuse": ["fuse", "{i}/bert_m", BB, "-o", "{t}/out"],
    "evaluate": ["evaluate", "{i}/bert_m", "--data", "{i}/sent.jsonl"],
    "compress": ["compress", "{i}/bert_m", "-o", "{t}/out", "--width", "ffn=64"],
}


@pytest.mark.parametrize("command", CONFIG_COMMANDS.values(), ids=CONFIG_COMMANDS.keys())
@pytest.mark.parametrize("changes", CONFIG_MUTANTS.values(), ids=CONFIG_MUTANTS.keys())
def test_config_json_checked_by_type_range_and_against_weights(ws, changes, command):
    config_mutant(**changes)(ws)
    refused(ws, *command)


@pytest.mark.parametrize("command", CONFIG_COMMANDS.values(), ids=CONFIG_COMMANDS.keys())
def test_config_asking_for_2_40_layers(ws, forked, command):
    """Found by the fuzzer: `num_hidden_layers: 2**40` must be refused by looking at it, not by building it
    (in a forked child capped at 3 GB of address space, so that a regression is a MemoryError, not the OOM
    killer)."""
    config_mutant(num_hidden_layers=2**40)(ws)
    refused(ws, *command, forked=forked, hook={"kind": "memory", "bytes": 3 * 2**30})


def test_safetensors_header_with_no_tensors(ws):
    empty_header(ws)
    for args in (["inspect", "--spaces", "{i}/empty.safetensors"],
                 ["fuse", "{i}/empty.safetensors", A, "-o", "{t}/out.safetensors"],
                 ["fuse", A, "{i}/empty.safetensors", "-o", "{t}/out.safetensors"],
                 ["evaluate", "{i}/empty.safetensors", "--data", D],
                 ["compress", "{i}/empty.safetensors", "-o", "{t}/out.safetensors", "--ratio", "0.5"]):
        refused(ws, *args)


NUMERIC_OPTIONS = {
    "fuse --refine -1": (["fuse", A, B, "-o", "{t}/o.safetensors", "--refine", "-1"], "--refine"),
    "fuse --seed 1e20": (["fuse", A, B, "-o", "{t}/o.safetensors", "--seed", "99999999999999999999"], "--seed"),
    "fuse --seed -1": (["fuse", A, B, "-o", "{t}/o.safetensors", "--seed", "-1"], "--seed"),
    "evaluate --seed 1e20": (["evaluate", A, "--data", D, "--seed", "99999999999999999999"], "--seed"),
    "compress --seed 1e20": (["compress", A, "-o", "{t}/o.safetensors", "--ratio", "0.5", "--seed",
                              "99999999999999999999"], "--seed"),
    "fuse --weights nan,1": (["fuse", A, B, "-o", "{t}/o.safetensors", "--weights", "nan,1"], "--weights"),
    "fuse --weights inf,1": (["fuse", A, B, "-o", "{t}/o.safetensors", "--weights", "inf,1"], "--weights"),
    "fuse --weights 1e400,1": (["fuse", A, B, "-o", "{t}/o.safetensors", "--weights", "1e400,1"], "--weights"),
    "fuse --weights -1,2": (["fuse", A, B, "-o", "{t}/o.safetensors", "--weights", "-1,2"], "--weights"),
    "fuse --weights 0,0": (["fuse", A, B, "-o", "{t}/o.safetensors", "--weights", "0,0"], "--weights"),
    "fuse --weights a,b": (["fuse", A, B, "-o", "{t}/o.safetensors", "--weights", "a,b"], "--weights"),
    "fuse --weights 1,2,3": (["fuse", A, B, "-o", "{t}/o.safetensors", "--weights", "1,2,3"], "--weights"),
    "fuse --reg inf": (["fuse", A, B, "-o", "{t}/o.safetensors", "--solver", "sinkhorn", "--reg", "inf"], "--reg"),
    "fuse --reg nan": (["fuse", A, B, "-o", "{t}/o.safetensors", "--solver", "sinkhorn", "--reg", "nan"], "--reg"),
    "fuse --reg 1e-300": (["fuse", A, B, "-o", "{t}/o.safetensors", "--solver", "sinkhorn", "--reg", "1e-300"],
                          "--reg"),
    "fuse --reg 0": (["fuse", A, B, "-o", "{t}/o.safetensors", "--solver", "sinkhorn", "--reg", "0"], "--reg"),
    "fuse --reg -1": (["fuse", A, B, "-o", "{t}/o.safetensors", "--solver", "sinkhorn", "--reg", "-1"], "--reg"),
    "fuse --samples 0": (["fuse", A, B, "-o", "{t}/o.safetensors", "--align", "activations", "--data", D,
                          "--samples", "0"], "--samples"),
    "fuse --max-tokens 0": (["fuse", A, B, "-o", "{t}/o.safetensors", "--align", "activations", "--data", D,
                             "--max-tokens", "0"], "--max-tokens"),
    "fuse --max-shard-size 0": (["fuse", BA, BB, "-o", "{t}/o", "--max-shard-size", "0"], "size"),
    "fuse --max-shard-size 5XB": (["fuse", BA, BB, "-o", "{t}/o", "--max-shard-size", "5XB"], "size"),
    "fuse --max-shard-size nan": (["fuse", BA, BB, "-o", "{t}/o", "--max-shard-size", "nanGB"], "size"),
    "fuse --anchor 5": (["fuse", A, B, "-o", "{t}/o.safetensors", "--anchor", "5"], "--anchor"),
    "fuse --anchor -1": (["fuse", A, B, "-o", "{t}/o.safetensors", "--anchor", "-1"], "--anchor"),
    "evaluate --max-length 0": (["evaluate", BA, "--data", "{i}/sent.jsonl", "--max-length", "0"], "--max-length"),
    "evaluate --max-length -5": (["evaluate", BA, "--data", "{i}/sent.jsonl", "--max-length", "-5"],
                                 "--max-length"),
    "evaluate --num-beams 0": (["evaluate", BA, "--data", "{i}/sent.jsonl", "--num-beams", "0"], "--num-beams"),
    "evaluate --batch-size 0": (["evaluate", A, "--data", D, "--batch-size", "0"], "batch"),
    "evaluate --max-samples 0": (["evaluate", A, "--data", D, "--max-samples", "0"], "samples"),
    "evaluate --steps 1": (["evaluate", "--interpolate", A, B, "--data", D, "--steps", "1"], "steps"),
    "evaluate --steps -3": (["evaluate", "--interpolate", A, B, "--data", D, "--steps", "-3"], "steps"),
    "compress --ratio 0": (["compress", A, "-o", "{t}/o.safetensors", "--ratio", "0"], "--ratio"),
    "compress --ratio 1": (["compress", A, "-o", "{t}/o.safetensors", "--ratio", "1"], "--ratio"),
    "compress --ratio 1.5": (["compress", A, "-o", "{t}/o.safetensors", "--ratio", "1.5"], "--ratio"),
    "compress --ratio -0.5": (["compress", A, "-o", "{t}/o.safetensors", "--ratio", "-0.5"], "--ratio"),
    "compress --ratio nan": (["compress", A, "-o", "{t}/o.safetensors", "--ratio", "nan"], "--ratio"),
    "compress --width hidden=0": (["compress", A, "-o", "{t}/o.safetensors", "--width", "hidden=0"], "width"),
    "compress --width hidden=-3": (["compress", A, "-o", "{t}/o.safetensors", "--width", "hidden=-3"], "width"),
    "compress --width hidden=999": (["compress", A, "-o", "{t}/o.safetensors", "--width", "hidden=999"], "width"),
    "compress --width bogus": (["compress", A, "-o", "{t}/o.safetensors", "--width", "bogus"], "width"),
    "compress --width nope=4": (["compress", A, "-o", "{t}/o.safetensors", "--width", "nope=4"], "nope"),
    "compress --width hidden=x": (["compress", A, "-o", "{t}/o.safetensors", "--width", "hidden=x"], "width"),
}


@pytest.mark.parametrize("args,fragment", NUMERIC_OPTIONS.values(), ids=NUMERIC_OPTIONS.keys())
def test_numeric_options_checked_by_range(ws, args, fragment):
    refused(ws, *args, fragment=fragment)


DEVICE_CASES = {
    "evaluate --device tpu": ["evaluate", A, "--data", D, "--device", "tpu"],
    "fuse --device tpu": ["fuse", A, B, "-o", "{t}/o.safetensors", "--device", "tpu"],
    "fuse activations --device tpu": ["fuse", A, B, "-o", "{t}/o.safetensors", "--align", "activations", "--data", D,
                                      "--device", "tpu"],
    "compress --device tpu": ["compress", A, "-o", "{t}/o.safetensors", "--ratio", "0.5", "--device", "tpu"],
    "align --device tpu": ["align", A, B, "-o", "{t}/p.safetensors", "--device", "tpu"],
}


@pytest.mark.parametrize("args", DEVICE_CASES.values(), ids=DEVICE_CASES.keys())
def test_unknown_device(ws, args):
    refused(ws, *args, fragment="device|tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("args", [
    ["evaluate", A, "--data", D, "--device", "cuda"],
    ["fuse", A, B, "-o", "{t}/o.safetensors", "--align", "activations", "--data", D, "--device", "cuda"],
    ["compress", "{i}/cnn_a.safetensors", "-o", "{t}/o.safetensors", "--ratio", "0.5", "--device", "cuda"],
], ids=["evaluate", "fuse", "compress"])
def test_cuda_requested_without_cuda(ws, args):
    refused(ws, *args, fragment="cuda|--device")


PLAN_MUTANTS = ["bad_key", "model_index", "negative_index", "unknown_space", "shape", "index_not_permutation",
                "index_float", "nan", "no_meta", "meta_models", "meta_garbage"]


@pytest.mark.parametrize("kind", PLAN_MUTANTS)
def test_plan_files_checked_by_schema(ws, kind):
    plan_mutant(kind)(ws)
    refused(ws, "fuse", A, B, "--plan", "{i}/plans_bad.safetensors", "-o", "{t}/o.safetensors")


def test_plan_file_for_other_models(ws):
    refused(ws, "fuse", "{i}/cnn_a.safetensors", "{i}/cnn_b.safetensors", "--plan", "{i}/plans.safetensors", "-o",
            "{t}/o.safetensors")
    refused(ws, "fuse", A, B, "--plan", "{i}/digits.safetensors", "-o", "{t}/o.safetensors")
    refused(ws, "fuse", A, B, "--plan", "{i}/nope.safetensors", "-o", "{t}/o.safetensors")


def test_output_below_a_plain_file(ws):
    plain_file(ws)
    for args in (["align", A, B, "-o", "{i}/afile/plans.safetensors"],
                 ["fuse", A, B, "-o", "{i}/afile/out.safetensors"],
                 ["compress", A, "-o", "{i}/afile/out.safetensors", "--ratio", "0.5"],
                 ["evaluate", "--interpolate", A, B, "--data", D, "--steps", "2", "--plot", "{i}/afile/c.png"]):
        refused(ws, *args)


def test_plan_output_in_a_missing_folder(ws):
    """`align -o MISSING/plans.safetensors`: either the folder is made (like fuse's output) and the plan is
    complete, or one line and nothing written; never a traceback."""
    before = ws.snapshot()
    o = run_inprocess("align", *ws.fmt([A, B, "-o", "{t}/missing/plans.safetensors"]))
    if o.code == 0:
        assert not o.traceback and not o.stderr.strip(), o.describe()
        assert (ws.root / "missing" / "plans.safetensors").is_file()
        assert run_inprocess("fuse", *ws.fmt([A, B, "--plan", "{t}/missing/plans.safetensors", "-o",
                                              "{t}/o.safetensors"])).code == 0
    else:
        problems = one_line_problems(o) + tree_changes(before, ws.snapshot())
        assert not problems, f"{o.describe()} | {problems}"


@pytest.fixture
def read_only_dir(ws):
    folder = ws.root / "ro"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a read-only folder here (chattr +i)")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("args", [
    ["align", A, B, "-o", "{t}/ro/plans.safetensors"],
    ["fuse", A, B, "-o", "{t}/ro/out.safetensors"],
    ["fuse", BA, BB, "-o", "{t}/ro/out"],
    ["compress", A, "-o", "{t}/ro/out.safetensors", "--ratio", "0.5"],
    ["evaluate", "--interpolate", A, B, "--data", D, "--steps", "2", "--plot", "{t}/ro/c.png"],
], ids=["align", "fuse file", "fuse folder", "compress", "evaluate --plot"])
def test_read_only_output_folder(ws, read_only_dir, args):
    refused(ws, *args)


@pytest.mark.parametrize("args", [
    ["align", A, B, "-o", "{t}/plans.safetensors"],
    ["fuse", A, B, "-o", "{t}/out.safetensors"],
    ["fuse", BA, BB, "-o", "{t}/out"],
    ["compress", A, "-o", "{t}/out.safetensors", "--ratio", "0.5"],
], ids=["align", "fuse file", "fuse folder", "compress"])
def test_full_disk(ws, forked, args):
    """A file-size limit below every output's size (a plan file holds index vectors, a few KiB), so the write
    fails part-way (EFBIG)."""
    limit = 2 * 1024 if args[0] == "align" else 64 * 1024
    refused(ws, *args, forked=forked, hook={"kind": "fsize", "bytes": limit})


def test_plot_onto_an_existing_folder_or_file(ws):
    plain_file(ws)
    (ws.root / "plotdir").mkdir()
    refused(ws, "evaluate", "--interpolate", A, B, "--data", D, "--steps", "2", "--plot", "{t}/plotdir")
    refused(ws, "evaluate", "--interpolate", A, B, "--data", D, "--steps", "2", "--plot", "{i}/notes.png")


WRONG_DATA = {
    "fuse bert --align activations on images": ["fuse", BA, BB, "-o", "{t}/o", "--align", "activations", "--data", D],
    "align bert --align activations on images": ["align", BA, BB, "-o", "{t}/p.safetensors", "--align",
                                                 "activations", "--data", D],
    "compress bert --align activations on images": ["compress", BA, "-o", "{t}/o", "--width", "ffn=64", "--align",
                                                    "activations", "--data", D],
    "evaluate bert on images": ["evaluate", BA, "--data", D],
    "evaluate mlp on text": ["evaluate", A, "--data", "{i}/sent.jsonl"],
    "fuse mlp --align activations on text": ["fuse", A, B, "-o", "{t}/o.safetensors", "--align", "activations",
                                             "--data", "{i}/sent.jsonl"],
    "evaluate mlp on 3x8x8 images": ["evaluate", A, "--data", "{i}/rgb.safetensors"],
    "evaluate cnn on 3x8x8 images": ["evaluate", "{i}/cnn_a.safetensors", "--data", "{i}/rgb.safetensors"],
    "fuse cnn --repair-bn on 3x8x8 images": ["fuse", "{i}/cnn_a.safetensors", "{i}/cnn_b.safetensors", "-o",
                                             "{t}/o.safetensors", "--repair-bn", "--data", "{i}/rgb.safetensors"],
    "evaluate data without x": ["evaluate", A, "--data", "{i}/no_x.safetensors"],
    "evaluate y shorter than x": ["evaluate", A, "--data", "{i}/short_y.safetensors"],
    "evaluate label 10 of 10 classes": ["evaluate", A, "--data", "{i}/digits_label10.safetensors"],
    "evaluate label -1": ["evaluate", A, "--data", "{i}/digits_labelneg.safetensors"],
    "evaluate y of dtype bool": ["evaluate", A, "--data", "{i}/digits_ybool.safetensors"],
    "evaluate y of dtype float": ["evaluate", A, "--data", "{i}/digits_yfloat.safetensors"],
    "evaluate NaN in x": ["evaluate", A, "--data", "{i}/digits_nan.safetensors"],
    "evaluate Inf in x": ["evaluate", A, "--data", "{i}/digits_inf.safetensors"],
    "evaluate -Inf in x": ["evaluate", "{i}/cnn_a.safetensors", "--data", "{i}/digits_ninf.safetensors"],
    "evaluate --interpolate NaN in x": ["evaluate", "--interpolate", A, B, "--data", "{i}/digits_nan.safetensors",
                                        "--steps", "2"],
    "fuse --align activations NaN in x": ["fuse", A, B, "-o", "{t}/o.safetensors", "--align", "activations",
                                          "--data", "{i}/digits_nan.safetensors"],
    "align --align activations Inf in x": ["align", A, B, "-o", "{t}/p.safetensors", "--align", "activations",
                                           "--data", "{i}/digits_inf.safetensors"],
    "compress --align activations NaN in x": ["compress", A, "-o", "{t}/o.safetensors", "--ratio", "0.5",
                                              "--align", "activations", "--data", "{i}/digits_nan.safetensors"],
    "compress --align activations 1.7e38 in x": ["compress", A, "-o", "{t}/o.safetensors", "--ratio", "0.5",
                                                 "--align", "activations", "--data",
                                                 "{i}/digits_huge.safetensors"],  # found by the fuzzer (seed 1)
    "fuse --align activations 1.7e38 in x": ["fuse", A, B, "-o", "{t}/o.safetensors", "--align", "activations",
                                             "--data", "{i}/digits_huge.safetensors"],
    "fuse --repair-bn NaN in x": ["fuse", "{i}/cnn_a.safetensors", "{i}/cnn_b.safetensors", "-o",
                                  "{t}/o.safetensors", "--repair-bn", "--data", "{i}/digits_nan.safetensors"],
    "evaluate bert label 5 of 2": ["evaluate", BA, "--data", "{i}/label5.jsonl"],
    "evaluate bert unknown label name": ["evaluate", BA, "--data", "{i}/labelname.jsonl"],
    "evaluate bert no label field": ["evaluate", BA, "--data", "{i}/nolabel.jsonl", "--task", "classification"],
    "evaluate malformed jsonl": ["evaluate", BA, "--data", "{i}/broken.jsonl"],
    "evaluate binary jsonl": ["evaluate", BA, "--data", "{i}/binary.jsonl"],
    "evaluate empty jsonl": ["evaluate", BA, "--data", "{i}/empty.jsonl"],
    "evaluate unknown data suffix": ["evaluate", BA, "--data", "{i}/data.xyz"],
    "evaluate missing data": ["evaluate", A, "--data", "{i}/nope.safetensors"],
    "evaluate data is a folder": ["evaluate", A, "--data", "{i}/dir"],
    "fuse --align activations without --data": ["fuse", A, B, "-o", "{t}/o.safetensors", "--align", "activations"],
    "fuse --repair-bn without --data": ["fuse", "{i}/cnn_a.safetensors", "{i}/cnn_b.safetensors", "-o",
                                        "{t}/o.safetensors", "--repair-bn"],
}


@pytest.mark.parametrize("args", WRONG_DATA.values(), ids=WRONG_DATA.keys())
def test_data_checked_for_shape_labels_and_finiteness(ws, args):
    bad_digits(ws)
    bad_text(ws)
    refused(ws, *args)


DEGENERATE_MODELS = {
    "fuse integer-only MLPs": ["fuse", "{i}/int_a.safetensors", "{i}/int_b.safetensors", "-o", "{t}/o.safetensors"],
    "fuse --align none integer-only": ["fuse", "{i}/int_a.safetensors", "{i}/int_b.safetensors", "-o",
                                           "{t}/o.safetensors", "--align", "none"],
    "compress integer-only MLP": ["compress", "{i}/int_a.safetensors", "-o", "{t}/o.safetensors", "--ratio", "0.5"],
    "align integer-only MLPs": ["align", "{i}/int_a.safetensors", "{i}/int_b.safetensors", "-o",
                                "{t}/p.safetensors"],
    "fuse hidden width 0": ["fuse", "{i}/zero_a.safetensors", "{i}/zero_b.safetensors", "-o", "{t}/o.safetensors"],
    "compress hidden width 0": ["compress", "{i}/zero_a.safetensors", "-o", "{t}/o.safetensors", "--ratio", "0.5"],
    "fuse NaN parent": ["fuse", A, "{i}/nan_mlp.safetensors", "-o", "{t}/o.safetensors"],
    "compress NaN model": ["compress", "{i}/nan_mlp.safetensors", "-o", "{t}/o.safetensors", "--ratio", "0.5"],
    "evaluate NaN model": ["evaluate", "{i}/nan_mlp.safetensors", "--data", D],
    "evaluate -inf bias that ReLU hides": ["evaluate", "{i}/ninf_bias_mlp.safetensors", "--data", D],
    "evaluate --interpolate with a NaN model": ["evaluate", "--interpolate", A, "{i}/nan_mlp.safetensors", "--data", D,
                                                "--steps", "2"],
    "evaluate BERT with an unexpected tensor": ["evaluate", "{i}/bert_extra", "--data", "{i}/sent.jsonl"],
    "fuse BERT with an unexpected tensor": ["fuse", "{i}/bert_extra", BB, "-o", "{t}/o"],
    # found by benchmarks/fuzz.py
    "compress MLP with one int32 weight": ["compress", "{i}/intw_mlp.safetensors", "-o", "{t}/o.safetensors",
                                           "--ratio", "0.5"],
    "fuse MLP with one int32 weight": ["fuse", "{i}/intw_mlp.safetensors", B, "-o", "{t}/o.safetensors"],
    "evaluate CNN with a scalar BatchNorm mean": ["evaluate", "{i}/scalar_bn_cnn.safetensors", "--data", D],
    "fuse CNN with a scalar BatchNorm mean": ["fuse", "{i}/scalar_bn_cnn.safetensors", "{i}/cnn_b.safetensors", "-o",
                                              "{t}/o.safetensors"],
    "fuse --repair on data of 1e30 (BatchNorm variance overflows)": [
        "fuse", "{i}/cnn_a.safetensors", "{i}/cnn_b.safetensors", "-o", "{t}/o.safetensors", "--repair", "--data",
        "{i}/digits_huge.safetensors"],
}


def fuzz_found(ws: Workspace) -> None:
    sd = load_file(ws.inp / "mlp_a.safetensors")
    sd["2.weight"] = (sd["2.weight"] * 100).round().to(torch.int32)
    save_file(sd, ws.inp / "intw_mlp.safetensors", metadata=_meta(ws.inp / "mlp_a.safetensors"))
    sd = load_file(ws.inp / "cnn_a.safetensors")
    sd["1.running_mean"] = torch.tensor(0.5)
    save_file(sd, ws.inp / "scalar_bn_cnn.safetensors", metadata=_meta(ws.inp / "cnn_a.safetensors"))
    d = load_file(ws.inp / "digits.safetensors")
    save_file({"x": d["x"] * 1e30, "y": d["y"]}, ws.inp / "digits_huge.safetensors")


@pytest.mark.parametrize("args", DEGENERATE_MODELS.values(), ids=DEGENERATE_MODELS.keys())
def test_degenerate_models(ws, args):
    int_mlps(ws)
    zero_width_mlps(ws)
    nan_mlp(ws)
    extra_tensor_bert(ws)
    fuzz_found(ws)
    refused(ws, *args)


@pytest.mark.parametrize("setup,model", [(nan_mlp, "nan_mlp"), (huge_mlp, "huge_mlp")], ids=["nan", "overflow"])
def test_evaluate_json_is_strict(ws, setup, model):
    """Non-finite metrics are an error or null, never a bare NaN/Infinity token."""
    setup(ws)
    before = ws.snapshot()
    o = run_inprocess("evaluate", ws.inp / f"{model}.safetensors", ws.inp / "mlp_b.safetensors", "--data",
                      ws.inp / "digits.safetensors", "--json")
    if o.code == 2:
        problems = one_line_problems(o)
    else:
        problems = [] if o.code == 0 and not o.traceback else [f"exit {o.code}"]
        problems += strict_json_problems(o.stdout)
    problems += tree_changes(before, ws.snapshot())
    assert not problems, f"{o.describe()} | {problems}"


# ---------------------------------------------------------------- C. the README's promise per subcommand

PROMISE = {
    "inspect missing file": ["inspect", "{i}/nope.safetensors"],
    "inspect text named .safetensors": ["inspect", "{i}/text.safetensors"],
    "inspect truncated safetensors": ["inspect", "{i}/trunc.safetensors"],
    "inspect unknown suffix": ["inspect", "{i}/afile"],
    "inspect folder without weights": ["inspect", "{i}/no_weights"],
    "inspect --json missing file": ["inspect", "--json", "{i}/nope.safetensors"],
    "align one model": ["align", A, "-o", "{t}/p.safetensors"],
    "align missing model": ["align", A, "{i}/nope.safetensors", "-o", "{t}/p.safetensors"],
    "align existing output": ["align", A, B, "-o", "{i}/notes.png"],
    "align --solver foo": ["align", A, B, "-o", "{t}/p.safetensors", "--solver", "foo"],
    "align mlp with cnn": ["align", A, "{i}/cnn_b.safetensors", "-o", "{t}/p.safetensors"],
    "fuse one model": ["fuse", A, "-o", "{t}/o.safetensors"],
    "fuse truncated parent": ["fuse", A, "{i}/trunc.safetensors", "-o", "{t}/o.safetensors"],
    "fuse existing output": ["fuse", A, B, "-o", "{i}/notes.png"],
    "fuse --json existing output": ["fuse", A, B, "-o", "{i}/notes.png", "--json"],
    "fuse mlp with bert": ["fuse", A, BB, "-o", "{t}/o.safetensors"],
    "fuse mlp with cnn": ["fuse", A, "{i}/cnn_a.safetensors", "-o", "{t}/o"],
    "fuse --align median": ["fuse", A, B, "-o", "{t}/o.safetensors", "--align", "median"],
    "fuse --merge foo": ["fuse", A, B, "-o", "{t}/o.safetensors", "--merge", "foo"],
    "fuse --dtype int8": ["fuse", A, B, "-o", "{t}/o.safetensors", "--dtype", "int8"],
    "fuse --standardize foo": ["fuse", A, B, "-o", "{t}/o.safetensors", "--standardize", "foo"],
    "fuse --metric foo": ["fuse", A, B, "-o", "{t}/o.safetensors", "--metric", "foo"],
    "fuse --activation swish": ["fuse", A, B, "-o", "{t}/o.safetensors", "--activation", "swish"],
    "evaluate nothing to score": ["evaluate", "--data", D],
    "evaluate missing model": ["evaluate", "{i}/nope.safetensors", "--data", D],
    "evaluate --task foo": ["evaluate", A, "--data", D, "--task", "foo"],
    "evaluate --task translation on digits": ["evaluate", A, "--data", D, "--task", "translation"],
    "evaluate --ensemble-of 0,5": ["evaluate", A, B, "--data", D, "--ensemble-of", "0,5"],
    "evaluate --ensemble-of x": ["evaluate", A, B, "--data", D, "--ensemble-of", "x"],
    "evaluate --ensemble-of -1,0": ["evaluate", A, B, "--data", D, "--ensemble-of", "-1,0"],
    "evaluate --interpolate mlp cnn": ["evaluate", "--interpolate", A, "{i}/cnn_a.safetensors", "--data", D],
    "evaluate --interpolate missing": ["evaluate", "--interpolate", A, "{i}/nope.safetensors", "--data", D],
    "evaluate --json bad data": ["evaluate", A, "--data", "{i}/text.safetensors", "--json"],
    "compress neither --ratio nor --width": ["compress", A, "-o", "{t}/o.safetensors"],
    "compress existing output": ["compress", A, "-o", "{i}/notes.png", "--ratio", "0.5"],
    "compress --method foo": ["compress", A, "-o", "{t}/o.safetensors", "--ratio", "0.5", "--method", "foo"],
    "compress missing model": ["compress", "{i}/nope.safetensors", "-o", "{t}/o.safetensors", "--ratio", "0.5"],
    "compress --align activations without --data": ["compress", A, "-o", "{t}/o.safetensors", "--ratio", "0.5",
                                                     "--align", "activations"],
}


@pytest.mark.parametrize("args", PROMISE.values(), ids=PROMISE.keys())
def test_readme_promise(ws, args):
    plain_file(ws)
    o = refused(ws, *args)
    assert not o.stdout.strip(), f"stdout after an error: {o.stdout[:200]!r}"


RECIPE_HEAD = "command: fuse\nmodels: [{i}/mlp_a.safetensors, {i}/mlp_b.safetensors]\n"
RECIPES = {
    "output onto a model (force: true)": RECIPE_HEAD + "output: {i}/mlp_a.safetensors\nwrite: {{force: true}}\n",
    "output onto the recipe itself (force: true)": RECIPE_HEAD + "output: {t}/job.yaml\nwrite: {{force: true}}\n",
    "output onto --data (force: true)": RECIPE_HEAD + "output: {i}/digits.safetensors\nwrite: {{force: true}}\n"
                                        "options: {{align: activations}}\ndata: {{data: {i}/digits.safetensors}}\n",
    "compress output onto its model": "command: compress\nmodel: {i}/bert_a\noutput: {i}/bert_a/model.safetensors\n"
                                      "widths: [ffn=64]\nwrite: {{force: true}}\n",
    "not YAML": "command: [fuse\n",
    "empty file": "",
    "a list": "- fuse\n",
    "unknown command": "command: blend\n",
    "unknown key": RECIPE_HEAD + "output: {t}/o.safetensors\nsolverr: 1\n",
    "python object tag": RECIPE_HEAD + "output: !!python/object/apply:os.system ['true']\n",
    "models a string": "command: fuse\nmodels: {i}/mlp_a.safetensors\noutput: {t}/o.safetensors\n",
    "models empty": "command: fuse\nmodels: []\noutput: {t}/o.safetensors\n",
    "no output": RECIPE_HEAD,
    "output a list": RECIPE_HEAD + "output: [{t}/o.safetensors]\n",
    "anchor 'x'": RECIPE_HEAD + "output: {t}/o.safetensors\nanchor: x\n",
    "anchor 5": RECIPE_HEAD + "output: {t}/o.safetensors\nanchor: 5\n",
    "anchor 1.5": RECIPE_HEAD + "output: {t}/o.safetensors\nanchor: 1.5\n",
    "weights a list with nan": RECIPE_HEAD + "output: {t}/o.safetensors\nweights: [.nan, 1]\n",
    "weights 'nan,1'": RECIPE_HEAD + "output: {t}/o.safetensors\nweights: 'nan,1'\n",
    "options a list": RECIPE_HEAD + "output: {t}/o.safetensors\noptions: [sinkhorn]\n",
    "options reg 'small'": RECIPE_HEAD + "output: {t}/o.safetensors\noptions: {{solver: sinkhorn, reg: small}}\n",
    "options reg .inf": RECIPE_HEAD + "output: {t}/o.safetensors\noptions: {{solver: sinkhorn, reg: .inf}}\n",
    "options refine -1": RECIPE_HEAD + "output: {t}/o.safetensors\noptions: {{refine: -1}}\n",
    "options refine 'two'": RECIPE_HEAD + "output: {t}/o.safetensors\noptions: {{refine: two}}\n",
    "options solver foo": RECIPE_HEAD + "output: {t}/o.safetensors\noptions: {{solver: foo}}\n",
    "data samples 0": RECIPE_HEAD + "output: {t}/o.safetensors\noptions: {{align: activations}}\n"
                      "data: {{data: {i}/digits.safetensors, samples: 0}}\n",
    "data seed 1e20": RECIPE_HEAD + "output: {t}/o.safetensors\noptions: {{align: activations}}\n"
                      "data: {{data: {i}/digits.safetensors, seed: 99999999999999999999}}\n",
    "data device tpu": RECIPE_HEAD + "output: {t}/o.safetensors\noptions: {{align: activations}}\n"
                       "data: {{data: {i}/digits.safetensors, device: tpu}}\n",
    "data NaN file": RECIPE_HEAD + "output: {t}/o.safetensors\noptions: {{align: activations}}\n"
                     "data: {{data: {i}/digits_nan.safetensors}}\n",
    "write dtype int8": RECIPE_HEAD + "output: {t}/o.safetensors\nwrite: {{dtype: int8}}\n",
    "write force 'yes please'": RECIPE_HEAD + "output: {i}/notes.png\nwrite: {{force: yes please}}\n",
    "repair 'maybe'": "command: fuse\nmodels: [{i}/cnn_a.safetensors, {i}/cnn_b.safetensors]\n"
                      "output: {t}/o.safetensors\nrepair: maybe\n",
    "merge regmean_alpha 2": RECIPE_HEAD + "output: {t}/o.safetensors\nmerge: {{merge: regmean, regmean_alpha: 2}}\n",
    "compress ratio 'half'": "command: compress\nmodel: {i}/mlp_a.safetensors\noutput: {t}/o.safetensors\n"
                             "ratio: half\n",
    "compress ratio 1.5": "command: compress\nmodel: {i}/mlp_a.safetensors\noutput: {t}/o.safetensors\nratio: 1.5\n",
    "compress widths a string": "command: compress\nmodel: {i}/bert_a\noutput: {t}/o\nwidths: ffn=64\n",
    "compress method foo": "command: compress\nmodel: {i}/mlp_a.safetensors\noutput: {t}/o.safetensors\n"
                           "ratio: 0.5\nmethod: foo\n",
    "align output onto a model": "command: align\nmodels: [{i}/mlp_a.safetensors, {i}/mlp_b.safetensors]\n"
                                 "output: {i}/mlp_b.safetensors\nwrite: {{force: true}}\n",
}


@pytest.mark.parametrize("text", RECIPES.values(), ids=RECIPES.keys())
def test_recipes(ws, text):
    """`otfuse run RECIPE`: the recipe is one more input, and every value in it is checked like its flag."""
    plain_file(ws)
    bad_digits(ws)
    (ws.root / "job.yaml").write_text(text.format(i=ws.inp, t=ws.root))
    refused(ws, "run", "{t}/job.yaml")


def test_recipe_paths(ws):
    refused(ws, "run", "{t}/missing.yaml")
    refused(ws, "run", "{i}/dir")
    refused(ws, "run", "{i}/mlp_a.safetensors")


def test_choices_checked_before_any_model_is_read(ws):
    """README: `--solver foo` is refused while parsing, before any model is read (the models do not exist)."""
    refused(ws, "fuse", "{i}/nope1", "{i}/nope2", "-o", "{t}/o", "--solver", "foo", fragment="--solver")
    refused(ws, "compress", "{i}/nope1", "-o", "{t}/o", "--method", "foo", fragment="--method")


def test_usage_errors_as_a_user_sees_them(ws, forked):
    refused(ws, "inspect", sub=True)  # the real `python -m otfuse_cli` once
    refused(ws, "frobnicate", forked=forked)
    refused(ws, "fuse", A, B, "-o", "{t}/o.safetensors", "--no-such-option", forked=forked)
    refused(ws, "fuse", A, B, forked=forked, fragment="--output|-o")


def test_relative_output_path_onto_an_input(ws, forked):
    """`-o ./in/dir/../mlp_a.safetensors` typed in a shell, resolved against the working directory."""
    refused(ws, "fuse", "in/mlp_a.safetensors", "in/mlp_b.safetensors", "-o", "./in/dir/../mlp_a.safetensors",
            "--force", forked=forked, cwd=ws.root, fragment=OVERLAP)


# ---------------------------------------------------------------- D. .bin checkpoints


def test_malicious_bin_is_one_line_and_never_runs(ws, forked):
    """A raw pickle (protocol 4) whose unpickling would run a command; torch's UserWarning must not leak."""
    import pickle

    marker = ws.root / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ws.inp / "evil").mkdir()
    with open(ws.inp / "evil" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"0.weight": Payload()}, f, protocol=4)
    shutil.copyfile(ws.inp / "evil" / "pytorch_model.bin", ws.inp / "evil.bin")
    refused(ws, "inspect", "{i}/evil.bin", sub=True)
    refused(ws, "fuse", "{i}/evil", A, "-o", "{t}/o.safetensors", forked=forked)
    assert not marker.exists()


def test_bin_files_load_quietly_or_fail_in_one_line(ws, forked):
    sd = {k: v.contiguous() for k, v in mlp((20, 16, 12, 5)).state_dict().items()}
    torch.save(sd, ws.inp / "good.bin")
    torch.save(sd, ws.inp / "legacy.bin", _use_new_zipfile_serialization=False)
    torch.save([1, 2, 3], ws.inp / "list.pt")
    torch.save(torch.zeros(3), ws.inp / "tensor.pt")
    (ws.inp / "trunc.bin").write_bytes((ws.inp / "good.bin").read_bytes()[:300])
    for bad in ("list.pt", "tensor.pt", "trunc.bin"):
        refused(ws, "inspect", "{i}/" + bad, forked=forked)
    for good in ("good.bin", "legacy.bin"):
        o = forked.run("inspect", ws.inp / good)
        assert o.code == 0 and not o.stderr.strip(), o.describe()


# ---------------------------------------------------------------- E. a replace is never a gap


def _same(a: Path, b: Path) -> bool:
    if a.is_dir() != b.is_dir() or not a.exists() or not b.exists():
        return False
    return sha_tree(a) == sha_tree(b) if a.is_dir() else a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("layout,mode", [("file", "exchange"), ("folder", "exchange"), ("folder", "fallback")],
                         ids=["file", "folder", "folder without renameat2"])
def test_force_replace_killed_at_every_rename(ws, forked, layout, mode):
    """`--force` over an existing output, the process dying (os._exit, no cleanup) just before its 1st, 2nd, ...
    rename of any kind (os.rename/os.replace, libc rename*): afterwards the final path holds the complete old
    or the complete new output -- or, only where there is no atomic exchange, it is missing while the old
    output waits beside it as `.NAME.otfuse-old-*` -- and one rerun puts everything right: the new output,
    no temporary left."""
    a, b = ws.fmt([A, B] if layout == "file" else [BA, BB])
    outdir = ws.root / "out"
    outdir.mkdir()
    name = "o.safetensors" if layout == "file" else "o"
    out, old_ref, new_ref = outdir / name, ws.root / ("old_" + name), ws.root / ("new_" + name)
    assert run_inprocess("fuse", a, b, "-o", old_ref, "--align", "none").code == 0
    assert run_inprocess("fuse", a, b, "-o", new_ref).code == 0
    assert run_inprocess("fuse", a, b, "-o", out, "--align", "none").code == 0
    inputs = sha_tree(ws.inp)
    for n in range(1, 10):
        o = forked.run("fuse", a, b, "-o", out, "--force", hook={"kind": "die_at", "n": n, "mode": mode})
        assert o.code in (0, 137), f"died at rename {n}: {o.describe()}"
        if _same(out, old_ref) or _same(out, new_ref):
            assert not check_output(out), f"died at rename {n}: {check_output(out)}"
        else:
            olds = [p for p in outdir.iterdir() if ".otfuse-old" in p.name]
            gap_ok = mode == "fallback" and not out.exists() and len(olds) == 1 and _same(olds[0], old_ref)
            assert gap_ok, (f"died at rename {n} (exit {o.code}): {name} is neither the old nor the new output; "
                            f"folder holds {leftovers(outdir)}")
        if o.code == 0:
            break
    assert o.code == 0, "the write needed more than 9 renames?"
    assert not tree_changes(inputs, sha_tree(ws.inp))
    rerun = run_inprocess("fuse", a, b, "-o", out, "--force")
    assert rerun.code == 0, rerun.describe()
    assert leftovers(outdir) == [name] and _same(out, new_ref), leftovers(outdir)


def test_force_onto_a_busy_target_leaves_nothing_behind(ws, forked):
    """The old output cannot be moved aside (a mount point; no atomic exchange): one line or success, the old
    output intact, and no `.otfuse-old-*` folder left."""
    out = ws.root / "out" / "o"
    out.parent.mkdir()
    assert run_inprocess("fuse", ws.inp / "bert_a", ws.inp / "bert_b", "-o", out, "--align", "none").code == 0
    before = ws.snapshot()
    o = forked.run("fuse", ws.inp / "bert_a", ws.inp / "bert_b", "-o", out, "--force",
                   hook={"kind": "busy", "target": str(out)})
    if o.code == 2:
        problems = one_line_problems(o) + tree_changes(before, ws.snapshot())
    else:
        problems = ([] if o.code == 0 else [f"exit {o.code}"]) + check_output(out)
        problems += [f"left: {x}" for x in leftovers(out.parent, {"o"})]
    assert not problems, f"{o.describe()} | {problems}"


def test_sinkhorn_that_cannot_converge_stops(ws, forked):
    """`--reg` at its smallest allowed value: a clear line (or a plan), never a run until killed. The work is
    bounded by iterations (--max-iter 100, per solve), not by seconds, so the outcome is the same on a loaded
    machine; the timeout is only a generous guard against a hang (it passed 30 s on a busy 2-core machine
    with the default 5,000 iterations)."""
    before = ws.snapshot()
    o = forked.run(*ws.fmt(["fuse", A, B, "-o", "{t}/o.safetensors", "--solver", "sinkhorn", "--reg", "0.000001",
                            "--max-iter", "100"]), timeout=600)
    if o.code == 0:
        problems = check_output(ws.root / "o.safetensors")
    else:
        problems = one_line_problems(o, "--reg") + tree_changes(before, ws.snapshot())
    assert not problems, f"{o.describe()} | {problems}"


# ---------------------------------------------------------------- F. signals


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory) -> Path:
    """Two 784-1536-1536-1536-10 MLPs (about 24 MB each): seconds of exact matching, a write worth catching."""
    root = tmp_path_factory.mktemp("big_pair")
    for seed in (0, 1):
        sd = {k: v.contiguous() for k, v in mlp((784, 1536, 1536, 1536, 10), seed).state_dict().items()}
        save_file(sd, root / f"big_{seed}.safetensors", metadata={"format": "pt"})
    return root


def _wait_for(cond, proc, timeout=60.0, step=0.002) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if cond():
            return True
        time.sleep(step)
    return False


def _maps(proc, needle: str) -> bool:
    try:
        return needle in Path(f"/proc/{proc.pid}/maps").read_text()
    except OSError:
        return False


def interrupted_codes(sig) -> set[int]:
    """README: exit code 130 for an interrupted run, SIGINT and SIGTERM alike. A process that cleans up and
    then dies by SIGINT (the conventional way to report an interrupt to its parent) shows as 130 in a shell
    too; subprocess reports that as -2."""
    return {130, -signal.SIGINT}


def _start_big_fuse(big_pair: Path, ws: Workspace, *extra) -> tuple[subprocess.Popen, Path]:
    (ws.root / "out").mkdir(exist_ok=True)
    out = ws.root / "out" / "fused.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "otfuse_cli", "fuse", str(big_pair / "big_0.safetensors"),
                             str(big_pair / "big_1.safetensors"), "-o", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    return proc, out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_computation_says_interrupted(big_pair, ws, sig):
    proc, out = _start_big_fuse(big_pair, ws, "--refine", "1")
    try:
        assert _wait_for(lambda: _maps(proc, "big_1.safetensors"), proc), "the fuse never opened its inputs"
        time.sleep(0.3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    o = Outcome(proc.returncode, "", err)
    assert proc.returncode in interrupted_codes(sig), o.describe()
    assert err.strip() == "error: interrupted", o.describe()
    assert leftovers(ws.root / "out") == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_signal_during_the_write(big_pair, ws, sig):
    """Signalled as soon as anything appears in the output folder: the final path is absent or complete, and
    after one rerun no temporary is left (SIGKILL gets no cleanup: the rerun must remove the dead one's)."""
    proc, out = _start_big_fuse(big_pair, ws, "--align", "none")
    try:
        caught = _wait_for(lambda: any((ws.root / "out").iterdir()), proc, step=0.0005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    o = Outcome(proc.returncode, "", err)
    if proc.returncode == 0:
        assert not check_output(out), o.describe()
    else:
        assert caught, o.describe()
        assert not out.exists() or not check_output(out), f"{o.describe()}: {check_output(out)}"
        if sig != signal.SIGKILL:
            assert proc.returncode in interrupted_codes(sig), o.describe()
            assert err.strip() == "error: interrupted", o.describe()
            assert leftovers(ws.root / "out", {"fused.safetensors"}) == [], o.describe()
    rerun = run_inprocess("fuse", big_pair / "big_0.safetensors", big_pair / "big_1.safetensors", "-o", out,
                          "--align", "none", "--force")
    assert rerun.code == 0, rerun.describe()
    assert leftovers(ws.root / "out") == ["fused.safetensors"]
