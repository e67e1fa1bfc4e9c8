"""Hugging Face model ids (org/name, org/name@revision) wherever a model path is taken, resolved through
huggingface_hub's cache (otfuse_cli.hub). Offline throughout: HF_HUB_OFFLINE=1 and a cache in a temporary
folder; nothing is downloaded.

huggingface_hub has no public way to fill its cache from local files, so the cache is written here in its
documented layout (models--org--name/{blobs,refs,snapshots}, snapshot files symlinked to content-addressed
blobs) and then checked with huggingface_hub's own readers (scan_cache_dir, snapshot_download with
local_files_only, try_to_load_from_cache): the library, not otfuse, is the oracle of what the cache holds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_one_line_error, cli

BERT_A = REPO / "fixtures" / "sentiment" / "bert_a"
BERT_B = REPO / "fixtures" / "sentiment" / "bert_b"
TEST = REPO / "fixtures" / "sentiment" / "test.jsonl"
COMMIT = {name: hashlib.sha1(name.encode()).hexdigest() for name in ("a1", "b1", "ab1", "ab2")}


def _blob_name(path: Path) -> str:
    """As the Hub names blobs: the sha256 of an LFS file (weights), the git blob sha1 of a regular one."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_snapshot(cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put `source`'s files in the cache as the snapshot `commit` of `repo_id`, named by `refs`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(source.iterdir()):
        blob = repo / "blobs" / _blob_name(f)
        if not blob.exists():
            shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """org/a (bert_a), org/b (bert_b), and org/ab: bert_a at tag v1, then bert_b on main."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    add_snapshot(cache, "org/a", BERT_A, COMMIT["a1"])
    add_snapshot(cache, "org/b", BERT_B, COMMIT["b1"])
    add_snapshot(cache, "org/ab", BERT_A, COMMIT["ab1"], refs=("v1",))
    add_snapshot(cache, "org/ab", BERT_B, COMMIT["ab2"])
    _check_with_huggingface_hub(cache)
    return cache


def _check_with_huggingface_hub(cache: Path) -> None:
    from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache

    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {"org/a", "org/b", "org/ab"}
    assert {r.commit_hash: set(r.refs) for r in repos["org/ab"].revisions} == {COMMIT["ab1"]: {"v1"},
                                                                              COMMIT["ab2"]: {"main"}}
    for rev in repos["org/ab"].revisions:
        assert {f.file_name for f in rev.files} == {p.name for p in BERT_A.iterdir()}
    for repo_id, revision, commit in (("org/a", None, "a1"), ("org/ab", "v1", "ab1"), ("org/ab", None, "ab2"),
                                      ("org/ab", COMMIT["ab1"], "ab1")):
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
        assert Path(folder) == cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT[commit]
    weights = try_to_load_from_cache("org/ab", "model.safetensors", cache_dir=cache, revision="v1")
    assert Path(weights).read_bytes() == (BERT_A / "model.safetensors").read_bytes()


@pytest.fixture
def offline(cache, monkeypatch, tmp_path):
    """This process reads the test cache, offline (huggingface_hub's constants were read at its import)."""
    from huggingface_hub import constants

    for name, value in _env(cache, tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _env(cache: Path, tmp: Path) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp / "hf_home")}


def run(cache: Path, tmp: Path, *args, code: str | None = None) -> subprocess.CompletedProcess:
    """The real entry point in a fresh process, offline over the test cache."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **_env(cache, tmp))
    argv = ["-m", "otfuse_cli"] if code is None else ["-c", code]
    return subprocess.run([sys.executable, *argv, *map(str, args)], capture_output=True, text=True, cwd=tmp,
                          env=env, timeout=300)


def snapshot(cache: Path, repo_id: str, commit: str) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT[commit]


# ---------------------------------------------------------------- what is an id

@pytest.mark.parametrize("text, parsed", [
    ("org/name", ("org/name", None)),
    ("Qwen/Qwen2.5-0.5B", ("Qwen/Qwen2.5-0.5B", None)),
    ("org/name@v1.0", ("org/name", "v1.0")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("org/name@" + "f" * 40, ("org/name", "f" * 40)),
    ("runs/model.safetensors", None),  # a mistyped file, never looked up
    ("runs/index.json", None),
    ("nope_a", None), ("./org/name", None), ("/abs/name", None), ("a/b/c", None), ("org/", None),
    ("org/na--me", None), ("org/name.git", None), ("org/-name", None), ("org/name@", None), ("org/name@../x", None),
])
def test_what_is_taken_for_an_id(text, parsed):
    from otfuse_cli.hub import parse_id

    assert parse_id(text) == parsed


# ---------------------------------------------------------------- the commands

def test_inspect_reads_an_id_from_the_cache_offline(cache, tmp_path):
    res = run(cache, tmp_path, "inspect", "org/a", "--json")
    assert res.returncode == 0, res.stderr
    (model,) = json.loads(res.stdout)["models"]
    assert (model["path"], model["model_id"], model["revision"]) == ("org/a", "org/a", COMMIT["a1"])
    local = json.loads(cli("inspect", BERT_A, "--json").stdout)["models"][0]
    assert {k: model[k] for k in ("num_parameters", "num_tensors", "size_bytes", "model_type")} == \
        {k: local[k] for k in ("num_parameters", "num_tensors", "size_bytes", "model_type")}


def test_inspect_table_shows_the_revision(offline):
    res = cli("inspect", "org/a")
    assert res.exit_code == 0, res.stderr
    assert "org/a" in res.stdout and COMMIT["a1"][:12] in res.stdout.replace("\n", "")


def test_a_revision_picks_that_snapshot(offline):
    from safetensors.torch import load_file

    from otfuse_cli.checkpoint import open_checkpoint

    for given, commit, source in (("org/ab", "ab2", BERT_B), ("org/ab@v1", "ab1", BERT_A),
                                  (f"org/ab@{COMMIT['ab1']}", "ab1", BERT_A), ("org/ab@main", "ab2", BERT_B)):
        res = cli("inspect", given, "--json")
        assert res.exit_code == 0, res.stderr
        (model,) = json.loads(res.stdout)["models"]
        assert (model["path"], model["model_id"], model["revision"]) == (given, "org/ab", COMMIT[commit])
        ckpt = open_checkpoint(given)  # the library's entry point takes ids too
        assert ckpt.path == snapshot(offline, "org/ab", commit)
        expected = load_file(source / "model.safetensors")
        assert all(ckpt.get(k).equal(v) for k, v in expected.items())


def test_a_missing_id_is_one_line_exit_2_before_torch(cache, tmp_path):
    code = ("import sys\nfrom otfuse_cli.cli import main\nsys.argv = ['otfuse', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    for args, fragment in ((["inspect", "org/missing"], "no snapshot of org/missing in"),
                           (["inspect", "org/a@v9"], "no snapshot of org/a at revision v9 in"),
                           (["fuse", "org/a", "org/missing", "-o", "out"], "no snapshot of org/missing"),
                           (["evaluate", "org/missing", "--data", TEST], "no snapshot of org/missing"),
                           (["compress", "org/missing", "-o", "out", "--ratio", "0.5"], "no snapshot of org/missing"),
                           (["fuse", BERT_A, BERT_B, "--base", "org/missing", "-o", "out", "--merge",
                             "task-arithmetic"], "no snapshot of org/missing")):
        res = run(cache, tmp_path, *args, code=code)
        assert res.stdout.split() == ["2", "False"], (args, res.stdout, res.stderr)
        given = next(str(a) for a in args if str(a).startswith("org/") and ("missing" in str(a) or "@" in str(a)))
        assert_one_line_error(res.stderr, f"{given} is not a local path and is not in the Hugging Face cache "
                                          "(HF_HUB_OFFLINE=1)", fragment, str(cache))
        assert not (tmp_path / "out").exists()
    res = run(cache, tmp_path, "inspect", "org/missing")  # the console entry point: the same line, exit 2
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "org/missing is not a local path")


def test_an_unreachable_hub_falls_back_to_the_cache(cache, tmp_path):
    """Not offline, but the Hub cannot be reached (its endpoint is a closed port on this machine): what the cache
    holds is used, and a missing id is one line."""
    import socket

    with socket.socket() as s:  # a port nothing listens on once closed: every connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), **_env(cache, tmp_path), "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    otfuse = [sys.executable, "-m", "otfuse_cli"]
    res = subprocess.run([*otfuse, "inspect", "org/ab@v1", "--json"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["models"][0]["revision"] == COMMIT["ab1"]
    res = subprocess.run([*otfuse, "inspect", "org/missing"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "org/missing is not a local path, not in the Hugging Face cache",
                          "the Hub cannot be reached")


def test_a_mistyped_path_is_still_a_missing_path(offline, tmp_path):
    res = cli("inspect", tmp_path / "runs" / "model.safetensors")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "no such file or folder")
    res = cli("inspect", "nope_a")
    assert_one_line_error(res.stderr, "no such file or folder: nope_a")


def test_a_local_folder_named_like_an_id_wins(offline, tmp_path, monkeypatch):
    from otfuse_cli.checkpoint import open_checkpoint

    monkeypatch.chdir(tmp_path)
    shutil.copytree(BERT_B, tmp_path / "org" / "a")  # the cache's org/a is bert_a
    res = cli("inspect", "org/a", "--json")
    assert res.exit_code == 0, res.stderr
    (model,) = json.loads(res.stdout)["models"]
    assert model["path"] == "org/a" and "model_id" not in model and "revision" not in model
    ckpt = open_checkpoint("org/a")
    assert ckpt.model_ref is None and ckpt.path == Path("org/a")
    assert ckpt.get("classifier.weight").equal(open_checkpoint(BERT_B).get("classifier.weight"))


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_fuse_records_the_id_and_revision(offline, tmp_path):
    out = tmp_path / "fused"
    res = cli("fuse", "org/a", f"org/b@{COMMIT['b1']}", "-o", out, "--align", "none")
    assert res.exit_code == 0, res.stderr
    record = json.loads((out / "otfuse.json").read_text())
    a, b = record["inputs"]
    assert (a["path"], a["model_id"], a["revision"]) == ("org/a", "org/a", COMMIT["a1"])
    assert (b["path"], b["model_id"], b["revision"]) == (f"org/b@{COMMIT['b1']}", "org/b", COMMIT["b1"])
    assert a["files"]["model.safetensors"] == hashlib.sha256((BERT_A / "model.safetensors").read_bytes()).hexdigest()
    assert str(offline) not in (out / "otfuse.json").read_text()  # no machine-specific cache path
    card = (out / "README.md").read_text()
    assert f"0. `org/a` (Hugging Face, commit `{COMMIT['a1']}`)" in card
    assert f"1. `org/b@{COMMIT['b1']}` (Hugging Face, commit `{COMMIT['b1']}`)" in card
    local = tmp_path / "local"
    assert cli("fuse", BERT_A, BERT_B, "-o", local, "--align", "none").exit_code == 0
    ours, theirs = _weights(out), _weights(local)
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)


def test_align_compress_and_stats_take_ids(offline, tmp_path):
    from otfuse_cli.alignment.plans import load_plans

    plans = tmp_path / "plans.safetensors"
    res = cli("align", "org/a", "org/b", "-o", plans)
    assert res.exit_code == 0, res.stderr
    _, meta = load_plans(plans)
    assert [(i["model_id"], i["revision"]) for i in meta["inputs"]] == [("org/a", COMMIT["a1"]),
                                                                         ("org/b", COMMIT["b1"])]
    res = cli("fuse", "org/a", "org/b", "--plan", plans, "-o", tmp_path / "fused")  # the plan fits the ids
    assert res.exit_code == 0, res.stderr
    res = cli("compress", "org/ab@v1", "-o", tmp_path / "small", "--ratio", "0.5", "--method", "magnitude")
    assert res.exit_code == 0, res.stderr
    (model,) = json.loads((tmp_path / "small" / "otfuse.json").read_text())["inputs"]
    assert (model["path"], model["model_id"], model["revision"]) == ("org/ab@v1", "org/ab", COMMIT["ab1"])
    res = cli("stats", "org/a", "--data", TEST, "--samples", "8", "--kind", "gram", "-o",
              tmp_path / "a.stats.safetensors")
    assert res.exit_code == 0, res.stderr


def test_evaluate_scores_a_model_given_by_id(offline):
    res = cli("evaluate", "org/a", "--data", TEST, "--max-samples", "8", "--json")
    assert res.exit_code == 0, res.stderr
    local = cli("evaluate", BERT_A, "--data", TEST, "--max-samples", "8", "--json")
    (row,), (expected,) = json.loads(res.stdout)["rows"], json.loads(local.stdout)["rows"]
    assert row.pop("model") == "a" and expected.pop("model") == "bert_a"
    assert row == expected


def test_a_recipe_resolves_ids_and_prefers_its_own_folder(offline, tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    recipe = jobs / "job.yaml"
    recipe.write_text("command: fuse\nmodels: [org/a, org/b]\noutput: fused\nbase: org/ab@v1\n"
                      "options: {align: none}\nmerge: {merge: task-arithmetic}\n")
    res = cli("run", recipe, "--json")
    assert res.exit_code == 0, res.stderr
    record = json.loads((jobs / "fused" / "otfuse.json").read_text())  # the output: relative to the recipe
    assert [(i["model_id"], i["revision"]) for i in record["inputs"]] == \
        [("org/a", COMMIT["a1"]), ("org/b", COMMIT["b1"]), ("org/ab", COMMIT["ab1"])]
    assert record["options"]["recipe"]["models"] == ["org/a", "org/b"]
    shutil.copytree(BERT_B, jobs / "org" / "a")  # now org/a is a folder beside the recipe: it wins
    recipe.write_text("command: fuse\nmodels: [org/a, org/b]\noutput: fused2\noptions: {align: none}\n")
    res = cli("run", recipe, "--json")
    assert res.exit_code == 0, res.stderr
    first, second = json.loads((jobs / "fused2" / "otfuse.json").read_text())["inputs"]
    assert first["path"] == str(jobs / "org" / "a") and "model_id" not in first
    assert second["model_id"] == "org/b"


def test_a_recipe_with_a_missing_id_is_one_line(offline, tmp_path):
    recipe = tmp_path / "job.yaml"
    recipe.write_text("command: compress\nmodel: org/missing\noutput: small\nratio: 0.5\n")
    res = cli("run", recipe)
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "org/missing is not a local path and is not in the Hugging Face cache")
    assert not (tmp_path / "small").exists()


def test_quiet_silences_huggingface_hubs_own_bars(offline, monkeypatch):
    """`-q` reaches huggingface_hub's download bars (its own tqdm), and they are on again afterwards."""
    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled

    from otfuse_cli import hub

    seen = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        seen.append(are_progress_bars_disabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    for flags, silent in ((["-q"], True), ([], False)):
        seen.clear()
        monkeypatch.setattr(hub, "_BY_GIVEN", {})  # resolve again, not from this process's memo
        res = cli(*flags, "inspect", "org/b")
        assert res.exit_code == 0, res.stderr
        assert seen and seen[-1] is silent
    assert not are_progress_bars_disabled()
