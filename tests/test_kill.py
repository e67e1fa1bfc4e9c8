"""Kill tests: SIGINT, SIGTERM and SIGKILL at several points of a real `python -m otfuse_cli fuse` of two wide
bare MLPs (~100 MB each, a ~200 MB pair, made here with a fixed seed). Afterwards the final path is absent, the
old output, or byte-identical to an uninterrupted run's output (the writer is deterministic); SIGINT/SIGTERM exit
130 with exactly `error: interrupted` and leave no temporary; after one rerun no temporary is left at all."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, cli
from otfuse_cli.errors import OtfuseError

IN, HIDDEN, OUT = 8000, 3072, 10  # 24.6M parameters: 98 MB per model, a ~200 MB pair, a fuse of ~15 s
NAME = "fused.safetensors"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _scratch(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".otfuse-tmp-" in p.name or ".otfuse-old-" in p.name)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict:
    """The pair, an output of an uninterrupted run (what a complete output is, byte for byte), and an older
    output (what a --force replace starts from)."""
    root = tmp_path_factory.mktemp("kill")
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        save_file({"0.weight": torch.randn(HIDDEN, IN, generator=g), "0.bias": torch.randn(HIDDEN, generator=g),
                   "2.weight": torch.randn(OUT, HIDDEN, generator=g), "2.bias": torch.randn(OUT, generator=g)},
                  root / f"big_{seed}.safetensors")
    ref = root / "ref" / NAME
    result = cli("fuse", root / "big_0.safetensors", root / "big_1.safetensors", "-o", ref)
    assert result.exit_code == 0, result.output
    fused = load_file(ref)
    assert set(fused) == {"0.weight", "0.bias", "2.weight", "2.bias"} and all(t.isfinite().all() for t in fused.values())
    old = root / "old" / NAME
    old.parent.mkdir()
    shutil.copyfile(root / "big_0.safetensors", old)
    return {"pair": [root / "big_0.safetensors", root / "big_1.safetensors"], "new": _sha(ref), "old": old,
            "old_sha": _sha(old)}


def _start(big: dict, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "otfuse_cli", "fuse", *map(str, big["pair"]), "-o", str(out),
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 60, step: float = 0.0005) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if condition():
            return True
        time.sleep(step)
    return False


def _mapped(proc: subprocess.Popen, path: Path) -> bool:
    """The process has memory-mapped this input (safetensors reads through mmap)."""
    try:
        return path.name in Path(f"/proc/{proc.pid}/maps").read_text()
    except OSError:
        return False


def _signal_at(point: str, proc: subprocess.Popen, big: dict, out: Path, sig: int) -> None:
    """opening: the first parent was just opened; computing: both are open and the plans are being computed;
    writing: the temporary output has just appeared."""
    if point == "writing":
        assert _wait_for(lambda: bool(_scratch(out.parent)), proc), "no temporary output ever appeared"
    elif Path(f"/proc/{proc.pid}").exists():
        parent = big["pair"][0 if point == "opening" else 1]
        assert _wait_for(lambda: _mapped(proc, parent), proc, step=0.002), "the fuse never opened its inputs"
        time.sleep(0.3 if point == "computing" else 0)
    else:  # no /proc: about when a fuse of this size is past start-up
        time.sleep(1.5 if point == "opening" else 2.5)
    proc.send_signal(sig)


def _kill_and_rerun(big: dict, tmp_path: Path, sig: int, point: str, replace: bool, rerun: bool) -> None:
    out = tmp_path / NAME
    if replace:
        shutil.copyfile(big["old"], out)
    proc = _start(big, out, *(["--force"] if replace else []))
    try:
        _signal_at(point, proc, big, out, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    allowed = {big["new"], big["old_sha"]} if replace else {big["new"]}
    assert (out.is_file() and _sha(out) in allowed) or (not replace and not out.exists()), \
        f"final path neither absent nor complete (exit {proc.returncode}): {err}"
    if proc.returncode == 0:  # finished before the signal landed
        assert _sha(out) == big["new"] and _scratch(tmp_path) == []
    elif sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, err
    else:
        assert (proc.returncode, err.strip()) == (130, "error: interrupted")
        assert _scratch(tmp_path) == [], "an interrupted run left temporaries"
    if rerun:
        result = cli("fuse", *big["pair"], "-o", out, "--force")
        assert result.exit_code == 0, result.output
        assert _sha(out) == big["new"]
        assert sorted(p.name for p in tmp_path.iterdir()) == [NAME], "a temporary survived the rerun"


@pytest.mark.parametrize("sig, point, replace, rerun", [
    (signal.SIGINT, "computing", False, False),
    (signal.SIGTERM, "computing", False, False),
    (signal.SIGINT, "writing", False, False),
    (signal.SIGTERM, "writing", True, False),
    (signal.SIGKILL, "writing", True, True),
], ids=["SIGINT-computing", "SIGTERM-computing", "SIGINT-writing", "SIGTERM-replacing",
        "SIGKILL-replacing"])
def test_kill(big, tmp_path, sig, point, replace, rerun):
    _kill_and_rerun(big, tmp_path, sig, point, replace, rerun)


@pytest.mark.slow
@pytest.mark.parametrize("replace", [False, True], ids=["fresh", "replace"])
@pytest.mark.parametrize("point", ["opening", "computing", "writing"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_kill_every_point(big, tmp_path, sig, point, replace):
    _kill_and_rerun(big, tmp_path, sig, point, replace, rerun=True)


@pytest.mark.parametrize("swallowed_as", [ValueError, OtfuseError], ids=["ValueError", "OtfuseError"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_a_library_turned_into_another_error_still_says_interrupted(capsys, sig, swallowed_as):
    """torch can turn a Ctrl-C inside storage creation into "ValueError: could not determine the shape of object
    type 'torch.storage.UntypedStorage'", which the reader reports as "cannot read tensor ...": the CLI knows a
    signal came and says "interrupted" (exit 130) instead."""
    import typer

    from otfuse_cli.cli import _one_line_errors

    with pytest.raises(typer.Exit) as exit_:
        with _one_line_errors():
            try:
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler raises KeyboardInterrupt long before this ends
            except KeyboardInterrupt:
                raise swallowed_as("cannot read tensor '0.bias': could not determine the shape of object type "
                                   "'torch.storage.UntypedStorage'") from None
            pytest.fail(f"{sig!r} raised nothing")
    assert exit_.value.exit_code == 130
    assert capsys.readouterr().err == "error: interrupted\n"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers are put back afterwards


def test_python_dash_m_exits_130_after_an_interrupt_that_crossed_an_embedded_pyrun(tmp_path):
    """CI saw exit -2 (death by SIGINT) after `error: interrupted`: a Ctrl-C that lands while a C extension runs
    module code through PyRun_* (scipy's import does) leaves CPython's "unhandled KeyboardInterrupt" mark set,
    and `python -m` then re-raises SIGINT at exit. Set that mark on purpose, interrupt, expect 130."""
    (tmp_path / "interrupt_after_pyrun.py").write_text(
        "import ctypes, os, runpy, signal, sys, time\n"
        "import otfuse_cli.cli\n"
        "def app(**_):\n"
        "    ctypes.pythonapi.PyRun_SimpleString(b'raise KeyboardInterrupt')  # sets the mark, prints a trace\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "otfuse_cli.cli.app = app\n"
        "runpy.run_module('otfuse_cli', run_name='__main__')\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "interrupt_after_pyrun"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "KeyboardInterrupt" in proc.stderr  # the mark was set
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == (130, "error: interrupted")


# ---------------------------------------------------------------- signals at random moments (benchmarks/signals.py)

sys.path.insert(0, str(REPO / "benchmarks"))
import signals as random_signals  # noqa: E402


@pytest.fixture(scope="module")
def merged(big, tmp_path_factory) -> dict:
    """The `--align none` output of the pair, uninterrupted: what a complete output is for these trials."""
    digest, seconds = random_signals.reference(big["pair"], tmp_path_factory.mktemp("merged"))
    return {"sha": digest, "seconds": seconds}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_at_any_moment_after_the_first_line_is_exit_130(big, merged, tmp_path, sig):
    """A handful of benchmarks/signals.py's trials: moments counted from when otfuse's handler is in place (the
    process catches SIGTERM: a machine-speed-free start). 0 s lands in the heavy imports (where torch's
    pybind11 code once turned the handler's exception into an abort); the others, drawn over a whole run, in
    reading, merging, writing or exit. The slow set sends 50 of each at moments drawn from process start."""
    rng = random.Random(int(sig))
    for i, offset in enumerate([0.0, rng.uniform(0, merged["seconds"]), rng.uniform(0, merged["seconds"])]):
        rec = random_signals.trial(big["pair"], tmp_path / f"t{i}", merged["sha"], sig, offset, script=bool(i % 2),
                                   rerun=i == 1, after_handler=True)
        assert rec["problems"] == [], rec


@pytest.mark.slow
def test_fifty_signals_of_each_kind_at_random_moments(tmp_path):
    doc = random_signals.run(50, 0, tmp_path)
    summary = random_signals.summary(doc)
    assert all(s["failures"] == 0 for s in summary.values()), (summary, [r for r in doc["records"] if r["problems"]])
