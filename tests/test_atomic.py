"""Outputs are atomic and never touch inputs: a --force replace is never a gap, temporaries of dead processes
are removed by the next run, an output its own loader would refuse is never published, every writer (plans,
plots) follows the --force rule, and an output that equals, contains or lies inside an input is refused
(exit 2, every input byte-identical by sha256)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_one_line_error, cli
from otfuse_cli.alignment.plans import load_plans, save_plans
from otfuse_cli.alignment.transport import Plan
from otfuse_cli.checkpoint import open_checkpoint, write_checkpoint
from otfuse_cli.checkpoint import writer
from otfuse_cli.errors import OtfuseError

FIX = REPO / "fixtures"
SCRATCH = (".otfuse-tmp-", ".otfuse-old-")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: file -> sha256, symlink -> its target, folder -> 'dir'."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = f"link:{os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else _sha(p)
    return out


def manifest(path: Path) -> dict[str, str] | None:
    """What an output holds: None if missing; a file's sha256; a folder's files and their sha256."""
    if not (path.exists() or path.is_symlink()):
        return None
    if path.is_file():
        return {"": _sha(path)}
    return {p.relative_to(path).as_posix(): _sha(p) for p in sorted(path.rglob("*")) if p.is_file()}


def scratch(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if any(s in p.name for s in SCRATCH))


def tensors(seed: int, n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{i}.weight": torch.randn(40, 40, generator=g) for i in range(n)}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def exchange_supported(folder: Path) -> bool:
    a, b = folder / "probe_a", folder / "probe_b"
    a.mkdir()
    b.mkdir()
    try:
        return writer._renameat2(a, b, writer._RENAME_EXCHANGE)
    finally:
        shutil.rmtree(a)
        shutil.rmtree(b)


# ------------------------------------------------------------------------------------ a replace is never a gap

@pytest.mark.parametrize("mode", ["exchange", "keep-then-swap"])
@pytest.mark.parametrize("layout", ["folder", "file"])
def test_replace_keeps_the_old_output_until_the_new_one_is_complete(tmp_path, monkeypatch, layout, mode):
    """Every rename/replace/exchange is watched: right after each, target holds the whole old output or the
    whole new one (byte-identical to the same write made elsewhere), never nothing, never a mix. Without an
    atomic exchange a folder may be missing for a moment, but only while the old one waits, complete, in
    `.NAME.otfuse-old-*`."""
    if mode == "exchange" and not exchange_supported(tmp_path):
        pytest.skip("no renameat2 RENAME_EXCHANGE on this file system")
    name = "out" if layout == "folder" else "out.safetensors"
    ref, target = tmp_path / "ref" / name, tmp_path / "work" / name
    write_checkpoint(ref, tensors(1), layout=layout, max_shard_size="10KB")
    write_checkpoint(target, tensors(0), layout=layout, max_shard_size="10KB")
    old, new = manifest(target), manifest(ref)
    assert old != new and (layout == "file" or len(new) > 2)  # several shards: a folder swap is visible

    seen = []

    def watch(fn):
        def watched(*args, **kwargs):
            result = fn(*args, **kwargs)
            now = manifest(target)
            if now is None:
                aside = [p for p in target.parent.iterdir() if ".otfuse-old-" in p.name]
                now = "aside" if len(aside) == 1 and manifest(aside[0]) == old else None
            seen.append(now)
            return result
        return watched

    if mode == "keep-then-swap":
        monkeypatch.setattr(writer, "_libc_renameat2", lambda: None)
    monkeypatch.setattr(os, "rename", watch(os.rename))
    monkeypatch.setattr(os, "replace", watch(os.replace))
    monkeypatch.setattr(writer, "_renameat2", watch(writer._renameat2))
    write_checkpoint(target, tensors(1), layout=layout, max_shard_size="10KB", force=True)

    allowed = [old, new] + (["aside"] if mode == "keep-then-swap" and layout == "folder" else [])
    assert seen and all(state in allowed for state in seen), seen
    assert manifest(target) == new and scratch(target.parent) == []


KILL_BETWEEN_RENAMES = textwrap.dedent("""
    import os, sys, torch
    from pathlib import Path
    from otfuse_cli.checkpoint import writer
    writer._libc_renameat2 = lambda: None  # no atomic exchange: keep-then-swap
    target = Path(sys.argv[1])
    real_rename = os.rename
    def rename(src, dst):
        if Path(dst) == target:  # the old output is aside, the new one complete: die like SIGKILL here
            os._exit(9)
        return real_rename(src, dst)
    os.rename = rename
    writer.write_checkpoint(target, {"w": torch.ones(3, 3)}, layout="folder", force=True)
""")


def test_a_replace_killed_between_its_renames_is_restored_by_the_next_run(tmp_path):
    target = tmp_path / "out"
    write_checkpoint(target, {"w": torch.zeros(3, 3)}, layout="folder")
    old = manifest(target)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(target)], env=env,
                            stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 9, err
    assert manifest(target) is None  # the gap the next run must close
    aside = tmp_path / next(n for n in scratch(tmp_path) if ".otfuse-old-" in n)
    assert manifest(aside) == old
    assert sorted(n.split(".otfuse-")[1].split("-")[:2] for n in scratch(tmp_path)) == [
        ["old", str(proc.pid)], ["tmp", str(proc.pid)]]

    with pytest.raises(OtfuseError, match="exists; use --force"):  # the rerun finds the old output back first
        write_checkpoint(target, {"w": torch.ones(3, 3)}, layout="folder")
    assert manifest(target) == old and scratch(tmp_path) == []
    write_checkpoint(target, {"w": torch.ones(3, 3)}, layout="folder", force=True)
    assert torch.equal(open_checkpoint(target).get("w"), torch.ones(3, 3)) and scratch(tmp_path) == []


def test_stale_temporaries_of_dead_processes_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "out.safetensors"
    write_checkpoint(target, tensors(0), layout="file")
    dead, alive = dead_pid(), os.getpid()
    stale = [f".out.safetensors.otfuse-tmp-{dead}-ab12cd34.safetensors", f".out.safetensors.otfuse-tmp-{dead}-ffff0000",
             f".out.safetensors.otfuse-old-{dead}-0a0b0c0d"]
    stale.append(f".out.safetensors.otfuse-tmp-{alive}-99990000")  # our pid, but no writer holds it: pid reuse
    live = [f".out.safetensors.otfuse-tmp-{alive}-11112222.safetensors",  # a live writer's (locked)
            f".out.safetensors.otfuse-tmp-{dead}-22223333"]  # a live writer's in another pid namespace (locked)
    kept = [*live, f".other.safetensors.otfuse-tmp-{dead}-ab12cd34.safetensors",  # another output's
            ".out.safetensors.otfuse-tmp-notes"]  # no pid: not ours to judge
    for n in stale + kept:
        (tmp_path / n).write_bytes(b"partial")
    (tmp_path / stale[1]).unlink()
    (tmp_path / stale[1]).mkdir()
    (tmp_path / stale[1] / "shard-00001.safetensors").write_bytes(b"partial")
    holders = [os.open(tmp_path / n, os.O_RDONLY) for n in live]
    try:
        for fd in holders:
            fcntl.flock(fd, fcntl.LOCK_EX)
        write_checkpoint(target, tensors(1), layout="file", force=True)
    finally:
        for fd in holders:
            os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["out.safetensors"])
    assert torch.equal(open_checkpoint(target).get("0.weight"), tensors(1)["0.weight"])


ANOTHER_NAMESPACE = textwrap.dedent("""
    import os, sys, time, torch
    from pathlib import Path
    from otfuse_cli.checkpoint import write_checkpoint
    from otfuse_cli.checkpoint import writer
    target, go, dead = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    os.getpid = lambda: dead  # its pid, seen from the other container, is no live process there
    def tensors():
        while not go.exists():  # holds its temporary until the test says go
            time.sleep(0.01)
        yield "w", torch.ones(3, 3)
    write_checkpoint(target, tensors(), layout="folder", force=True)
""")


@pytest.mark.parametrize("namespace", [False, True], ids=["same-namespace", "own-pid-namespace"])
def test_a_live_writer_in_another_pid_namespace_keeps_its_temporary(tmp_path, namespace):
    """Two containers sharing a volume: the other writer's pid means nothing here (its temporary is named with
    a pid that is dead in this namespace), but its lock on the temporary is seen on the shared file system, so
    this run's tidy-up leaves it alone, and both writes succeed. Once that writer is SIGKILLed, the lock is
    gone and the next write removes its temporary."""
    if namespace and (shutil.which("unshare") is None or
                      subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode):
        pytest.skip("no pid namespaces here (unshare --pid)")
    target, go = tmp_path / "out", tmp_path / "go"
    (tmp_path / "other.py").write_text(ANOTHER_NAMESPACE)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def start(dead: int) -> subprocess.Popen:
        cmd = [sys.executable, str(tmp_path / "other.py"), str(target), str(go), str(dead)]
        return subprocess.Popen((["unshare", "--pid", "--fork", "--kill-child"] if namespace else []) + cmd, env=env,
                                stderr=subprocess.PIPE, text=True)

    def scratch() -> list[str]:
        return sorted(p.name for p in tmp_path.iterdir() if ".otfuse-tmp-" in p.name)

    other = start(dead_pid())
    try:
        for _ in range(12000):  # a hang guard, not a speed assumption
            if scratch() or other.poll() is not None:
                break
            time.sleep(0.01)
        theirs = scratch()
        assert len(theirs) == 1, (theirs, other.poll())
        write_checkpoint(tmp_path / "mine", {"w": torch.zeros(2)}, layout="folder")
        writer.recover(target)  # what this run's write of the same output does first
        assert scratch() == theirs, "a live writer's temporary was taken for a dead one's"
        go.touch()
        _, err = other.communicate(timeout=300)
        assert other.returncode == 0, err
        assert torch.equal(open_checkpoint(target).get("w"), torch.ones(3, 3)) and scratch() == []

        go.unlink()
        other = start(dead_pid())
        for _ in range(12000):
            if scratch() or other.poll() is not None:
                break
            time.sleep(0.01)
        assert len(scratch()) == 1
        other.kill()  # SIGKILL (with unshare, the namespace's init: its child dies with it)
        other.wait()
        for _ in range(12000):  # the lock goes when the last process holding it has gone
            with contextlib.suppress(BlockingIOError):
                fd = os.open(tmp_path / scratch()[0], os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                finally:
                    os.close(fd)
            time.sleep(0.01)
        write_checkpoint(target, {"w": torch.zeros(3, 3)}, layout="folder", force=True)
        assert scratch() == [] and torch.equal(open_checkpoint(target).get("w"), torch.zeros(3, 3))
    finally:
        other.kill()
        other.wait()


def test_every_temporary_name_carries_the_process_id(tmp_path, monkeypatch):
    names = []
    real = writer._place

    def place(tmp, target, force):
        names.append(tmp.name)
        return real(tmp, target, force)

    monkeypatch.setattr(writer, "_place", place)
    write_checkpoint(tmp_path / "f.safetensors", tensors(0), layout="file")
    write_checkpoint(tmp_path / "d", tensors(0), layout="folder")
    save_plans(tmp_path / "p.safetensors", [{}, {"0": Plan(torch.eye(3, dtype=torch.float64))}], {"anchor": 0})
    assert [n.split("-")[2] for n in names] == [str(os.getpid())] * 3, names
    assert [n.startswith(p) for n, p in zip(names, (".f.safetensors.", ".d.", ".p.safetensors."))] == [True] * 3


MOUNT_SCRIPT = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from otfuse_cli.checkpoint import writer
    from otfuse_cli.errors import OtfuseError
    mnt = Path(sys.argv[1])
    (mnt / "keep.txt").write_text("old")
    for mode in ("exchange", "keep-then-swap"):
        if mode == "keep-then-swap":
            writer._libc_renameat2 = lambda: None
        try:
            writer.write_checkpoint(mnt, {"w": torch.ones(2)}, layout="folder", force=True)
            sys.exit(f"{mode}: replacing a mount point succeeded")
        except OtfuseError as e:
            assert "cannot write" in str(e), (mode, str(e))
        left = sorted(p.name for p in mnt.parent.iterdir() if ".otfuse-" in p.name)
        assert left == [], (mode, left)
        assert sorted(p.name for p in mnt.iterdir()) == ["keep.txt"], mode
    print("ok")
""")


def test_a_failed_force_onto_a_mount_point_leaves_nothing(tmp_path):
    """A tmpfs mounted at the output path, in a private mount namespace (nothing outside sees it): the replace
    fails (EBUSY) as one clear error, with no empty `.otfuse-old-*` folder and the mounted content intact."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs "$1" || exit 77; shift; exec "$@"', "sh", str(mnt),
           sys.executable, "-c", MOUNT_SCRIPT, str(mnt)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode == 77 or "unshare failed" in proc.stderr:
        pytest.skip(f"cannot mount here: {proc.stderr.strip()}")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]


# ------------------------------------------------------------------------------------ loaded back before publish

def _corrupt_header(real):
    def write(file, items, metadata):
        real(file, items, metadata)
        with open(file, "r+b") as f:  # the JSON header no longer parses
            f.seek(8)
            f.write(b"#")
    return write


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_an_output_whose_header_does_not_parse_is_never_published(tmp_path, monkeypatch, layout):
    name = "out.safetensors" if layout == "file" else "out"
    target = tmp_path / name
    write_checkpoint(target, tensors(0), layout=layout)
    old = manifest(target)
    monkeypatch.setattr(writer, "_write_safetensors", _corrupt_header(writer._write_safetensors))
    with pytest.raises(OtfuseError, match="the output would not load, nothing written") as e:
        write_checkpoint(target, tensors(1), layout=layout, force=True)
    assert ".otfuse-tmp-" not in str(e.value)  # reported under the name the user gave
    with pytest.raises(OtfuseError, match="would not load"):
        write_checkpoint(tmp_path / f"new_{name}", tensors(1), layout=layout)
    assert manifest(target) == old and sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("override", [{"model_type": "no-such-type"}, {"model_type": ["bert"]}, {"hidden_size": "7"}])
def test_an_output_whose_config_transformers_refuses_is_never_published(tmp_path, override):
    from transformers import AutoConfig

    src_dir = tmp_path / "src"
    shutil.copytree(FIX / "sentiment" / "bert_a", src_dir)
    src = open_checkpoint(src_dir)
    probe = tmp_path / "probe"  # the oracle: transformers itself refuses this config
    probe.mkdir()
    (probe / "config.json").write_text(json.dumps({**src.config, **override}))
    with pytest.raises(Exception):
        AutoConfig.from_pretrained(str(probe), local_files_only=True)
    shutil.rmtree(probe)

    with pytest.raises(OtfuseError, match="the output would not load, nothing written"):
        write_checkpoint(tmp_path / "out", src.state_dict(), layout="folder", source=src, config_overrides=override)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ------------------------------------------------------------------------------------ plans and plots

def _plans(value: float) -> list[dict[str, Plan]]:
    return [{}, {"0": Plan(torch.full((3, 3), value, dtype=torch.float64))}]


def test_plan_files_follow_the_force_rule_and_are_written_atomically(tmp_path):
    path = tmp_path / "plans.safetensors"
    save_plans(path, _plans(1.0), {"anchor": 0})
    before = _sha(path)
    with pytest.raises(OtfuseError, match="exists; use --force"):
        save_plans(path, _plans(2.0), {"anchor": 0})
    assert _sha(path) == before
    save_plans(path, _plans(2.0), {"anchor": 0}, force=True)
    plans, meta = load_plans(path)
    assert torch.equal(plans[1]["0"].coupling, torch.full((3, 3), 2.0, dtype=torch.float64)) and meta["models"] == 2
    (tmp_path / "folder.safetensors").mkdir()
    for bad, fragment in ((tmp_path / "folder.safetensors", "is a folder"),
                          (tmp_path / "missing" / "p.safetensors", "is not an existing folder"),
                          (path / "p.safetensors", "is not an existing folder")):
        with pytest.raises(OtfuseError, match=fragment):
            save_plans(bad, _plans(3.0), {"anchor": 0}, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.safetensors", "plans.safetensors"]


def test_align_replaces_a_plan_file_only_with_force(ws):
    plans = ws / "out" / "plans.safetensors"
    align = ["align", "{i}/mlp_a.safetensors", "{i}/mlp_b.safetensors", "-o", "{o}/plans.safetensors", "--refine", "1"]
    plans.write_bytes(b"old plans")
    result = _run(ws, *align)
    assert result.exit_code == 2 and plans.read_bytes() == b"old plans"
    assert_one_line_error(result.stderr, "exists; use --force to overwrite")
    result = _run(ws, *align, "--force")
    assert result.exit_code == 0, result.output
    assert load_plans(plans)[1]["models"] == 2
    assert sorted(p.name for p in (ws / "out").iterdir()) == ["plans.safetensors"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Small real inputs, made once: the digit MLPs, 64 digits, the sentiment BERTs, a sharded copy of one,
    a plan file."""
    root = tmp_path_factory.mktemp("atomic_base")
    for name in ("mlp_a", "mlp_b"):
        shutil.copyfile(FIX / "digits" / f"{name}.safetensors", root / f"{name}.safetensors")
    test = open_checkpoint(FIX / "digits" / "test.safetensors")
    from safetensors.torch import save_file
    save_file({"x": test.get("x")[:64].contiguous(), "y": test.get("y")[:64].contiguous()}, root / "digits.safetensors")
    for name in ("bert_a", "bert_b"):
        shutil.copytree(FIX / "sentiment" / name, root / name)
    bert = open_checkpoint(root / "bert_a")
    write_checkpoint(root / "sharded", bert.state_dict(), layout="folder", source=bert, max_shard_size="300KB")
    assert (root / "sharded" / "model-00001-of-00003.safetensors").is_file()
    save_plans(root / "plans.safetensors", [{}, {}], {"anchor": 0})
    return root


@pytest.fixture
def ws(base, tmp_path) -> Path:
    """A private copy of the inputs in ws/in, and ws/out for outputs."""
    shutil.copytree(base, tmp_path / "in")
    (tmp_path / "out").mkdir()
    return tmp_path


def _run(ws: Path, *args: str):
    return cli(*(a.format(i=ws / "in", o=ws / "out") for a in args))


INTERP = ["evaluate", "--interpolate", "{i}/mlp_a.safetensors", "{i}/mlp_b.safetensors", "--data",
          "{i}/digits.safetensors", "--steps", "2"]


def test_plot_refuses_an_existing_file_unless_force_and_never_a_folder(ws):
    plot = ws / "out" / "curve.png"
    plot.write_bytes(b"an old plot")
    result = _run(ws, *INTERP, "--plot", "{o}/curve.png")
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "exists; use --force to overwrite")
    assert plot.read_bytes() == b"an old plot"

    (ws / "out" / "plots").mkdir()
    for extra in ([], ["--force"]):
        result = _run(ws, *INTERP, "--plot", "{o}/plots", *extra)
        assert result.exit_code == 2
        assert_one_line_error(result.stderr, "is a folder")
    assert list((ws / "out" / "plots").iterdir()) == []

    result = _run(ws, *INTERP, "--plot", "{o}/curve.png", "--force")
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (ws / "out").iterdir()) == ["curve.png", "plots"]


A, B, D = "{i}/mlp_a.safetensors", "{i}/mlp_b.safetensors", "{i}/digits.safetensors"
BA, BB = "{i}/bert_a", "{i}/bert_b"
OUTPUT_TOUCHES_INPUT = {
    "fuse -o A --force": ["fuse", A, B, "-o", A, "--force"],
    "fuse -o out/../in/B --force": ["fuse", A, B, "-o", "{o}/../in/mlp_b.safetensors", "--force"],
    "fuse -o symlink-to-A --force": ["fuse", A, B, "-o", "{o}/link.safetensors", "--force"],
    "fuse -o the folder holding the inputs --force": ["fuse", A, B, "-o", "{i}", "--force"],
    "fuse --align activations --data D -o D --force": ["fuse", A, B, "--align", "activations", "--data", D, "-o", D,
                                                       "--force"],
    "fuse --plan P -o P --force": ["fuse", A, B, "--plan", "{i}/plans.safetensors", "-o", "{i}/plans.safetensors",
                                   "--force"],
    "fuse folders -o bert_a --force": ["fuse", BA, BB, "-o", BA, "--force"],
    "fuse folders -o bert_a/model.safetensors --force": ["fuse", BA, BB, "-o", BA + "/model.safetensors",
                                                         "--force"],
    "fuse folders -o bert_b/fused": ["fuse", BA, BB, "-o", BB + "/fused"],
    "fuse folders -o symlinked-dir-to-bert_a/fused": ["fuse", BA, BB, "-o", "{o}/linkdir/fused"],
    "fuse sharded -o one of its shards --force": ["fuse", "{i}/sharded", BB, "-o",
                                                  "{i}/sharded/model-00002-of-00003.safetensors", "--force"],
    "fuse sharded given by its index -o a shard --force": [
        "fuse", "{i}/sharded/model.safetensors.index.json", BB, "-o", "{i}/sharded/model-00001-of-00003.safetensors",
        "--force"],
    "align -o A --force": ["align", A, B, "-o", A, "--force"],
    "align -o bert_a/plans.safetensors": ["align", BA, BB, "-o", BA + "/plans.safetensors"],
    "align --align activations --data D -o D --force": ["align", A, B, "--align", "activations", "--data", D, "-o",
                                                        D, "--force"],
    "compress A -o A --force": ["compress", A, "-o", A, "--ratio", "0.5", "--force"],
    "compress bert_a -o bert_a/small --force": ["compress", BA, "-o", BA + "/small", "--width", "ffn=64", "--force"],
    "evaluate --interpolate A B --plot A": [*INTERP, "--plot", A],
    "evaluate --interpolate A B --plot B --force": [*INTERP, "--plot", B, "--force"],
    "evaluate --interpolate A B --plot D --force": [*INTERP, "--plot", D, "--force"],
    "evaluate --interpolate A B --plot symlink-to-A --force": [*INTERP, "--plot", "{o}/link.safetensors", "--force"],
    "evaluate MODEL --interpolate A B --plot bert_a/config.json --force": [
        "evaluate", BA, "--interpolate", A, B, "--data", D, "--steps", "2", "--plot", BA + "/config.json",
        "--force"],
}


@pytest.mark.parametrize("args", OUTPUT_TOUCHES_INPUT.values(), ids=OUTPUT_TOUCHES_INPUT.keys())
def test_an_output_that_touches_an_input_is_refused(ws, args):
    (ws / "out" / "link.safetensors").symlink_to(ws / "in" / "mlp_a.safetensors")
    (ws / "out" / "linkdir").symlink_to(ws / "in" / "bert_a", target_is_directory=True)
    before = snapshot(ws)
    result = _run(ws, *args)
    assert result.exit_code == 2, result.output
    assert_one_line_error(result.stderr, "input")
    assert snapshot(ws) == before  # inputs byte-identical, and nothing written anywhere


def test_an_output_reached_through_a_bind_mount_of_the_inputs_is_refused(ws):
    """A path that no symlink resolution leads back to the input (a bind mount, in a private mount namespace):
    the guard compares file identities too."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    (ws / "alias").mkdir()
    before = snapshot(ws)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    script = 'mount --bind "$1" "$2" || exit 77; shift 2; exec "$@"'
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(ws / "in"), str(ws / "alias"),
                           sys.executable, "-m", "otfuse_cli", "fuse", str(ws / "in" / "mlp_a.safetensors"),
                           str(ws / "in" / "mlp_b.safetensors"), "-o", str(ws / "alias" / "mlp_a.safetensors"),
                           "--force"], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode == 77 or "unshare failed" in proc.stderr:
        pytest.skip(f"cannot bind-mount here: {proc.stderr.strip()}")
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc.stderr, "is an input")
    assert snapshot(ws) == before
