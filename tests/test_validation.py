"""Every input validated at the boundary (issue 14): checkpoints, config.json, plan files, data files, devices
and numeric options each give one `error:` line and exit code 2, write nothing and change no input; Sinkhorn
is bounded; Ctrl-C is reported as an interruption; --json is strict JSON."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import REPO, assert_one_line_error, cli, cli_subprocess
from models import mlp
from tiny_transformers import FAMILIES, tiny_model

SENTIMENT = REPO / "fixtures" / "sentiment"


# ---------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root: equal before and after = no input changed, no output left."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused(root: Path, *args, fragments=(), runner=cli):
    """Run the CLI; it must exit 2 with one `error:` line holding every fragment and leave root as it was."""
    before = snapshot(root)
    result = runner(*args)
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code == 2, (code, result.stdout, result.stderr)
    assert_one_line_error(result.stderr, *fragments)
    assert snapshot(root) == before
    return result


def save_mlp(path: Path, widths=(20, 16, 12, 5), seed=0, edit=None) -> Path:
    sd = {k: v.contiguous() for k, v in mlp(widths, seed).state_dict().items()}
    if edit:
        sd = edit(sd)
    save_file(sd, path)
    return path


@pytest.fixture()
def mlps(tmp_path):
    return save_mlp(tmp_path / "a.safetensors"), save_mlp(tmp_path / "b.safetensors", seed=1)


@pytest.fixture(scope="module")
def bert_cls(tmp_path_factory) -> Path:
    """A tiny BertForSequenceClassification folder: 2 layers, hidden 16, FFN 24, 3 labels, vocabulary 40."""
    path = tmp_path_factory.mktemp("bert") / "cls"
    tiny_model("bert_cls").save_pretrained(path)
    return path


def mutated(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def sentiment_copy(tmp_path: Path, samples: int = 16) -> tuple[Path, Path]:
    """A real BERT classifier (with tokenizer) and a few reviews, copied so the snapshot covers them."""
    model = shutil.copytree(SENTIMENT / "bert_a", tmp_path / "bert_a")
    lines = (SENTIMENT / "test.jsonl").read_text().splitlines()[:samples]
    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return model, data


# ---------------------------------------------------------------- checkpoints


def test_safetensors_header_of_no_tensors(tmp_path, mlps):
    empty = tmp_path / "empty.safetensors"
    header = b"{}"
    empty.write_bytes(struct.pack("<Q", len(header)) + header)
    refused(tmp_path, "inspect", empty, fragments=("holds no tensors",))
    refused(tmp_path, "fuse", empty, mlps[0], "-o", tmp_path / "out.safetensors", fragments=("holds no tensors",))


def _zero_width(sd):
    sd["0.weight"], sd["0.bias"], sd["2.weight"] = torch.zeros(0, 20), torch.zeros(0), torch.zeros(12, 0)
    return sd


def test_hidden_layer_of_width_zero(tmp_path):
    a = save_mlp(tmp_path / "a.safetensors", edit=_zero_width)
    b = save_mlp(tmp_path / "b.safetensors", seed=1, edit=_zero_width)
    refused(tmp_path, "fuse", a, b, "-o", tmp_path / "out.safetensors", fragments=("'0.bias'", "size 0"))
    refused(tmp_path, "compress", a, "-o", tmp_path / "out.safetensors", "--ratio", "0.5", fragments=("size 0",))


def test_integer_only_models_are_not_fused_or_compressed(tmp_path):
    def ints(sd):
        return {k: (v * 10).round().to(torch.int64) for k, v in sd.items()}

    a = save_mlp(tmp_path / "a.safetensors", edit=ints)
    b = save_mlp(tmp_path / "b.safetensors", seed=1, edit=ints)
    refused(tmp_path, "fuse", a, b, "-o", tmp_path / "out.safetensors", fragments=("no floating-point tensors",))
    refused(tmp_path, "compress", a, "-o", tmp_path / "small.safetensors", "--ratio", "0.5",
            fragments=("no floating-point tensors",))


def test_bin_loading_prints_no_torch_warning(tmp_path):
    import pickle

    path = tmp_path / "pytorch_model.bin"
    with open(path, "wb") as f:  # protocol 4: torch's weights_only unpickler warns about it
        pickle.dump({"w": [1.0, 2.0]}, f, protocol=4)
    with warnings.catch_warnings(record=True) as seen:  # the oracle: torch itself does warn on this file
        warnings.simplefilter("always")
        with pytest.raises(Exception):
            torch.load(path, weights_only=True)
    assert any("pickle protocol" in str(w.message) for w in seen)
    refused(tmp_path, "inspect", path, fragments=("refusing to load",), runner=cli_subprocess)


# ---------------------------------------------------------------- config.json


BAD_CONFIGS = [
    ({"num_hidden_layers": "two"}, "'num_hidden_layers' must be a positive integer"),
    ({"hidden_size": "7"}, "'hidden_size' must be a positive integer"),
    ({"id2label": ["a", "b", "c"]}, "'id2label' must be an object"),
    ({"model_type": ["bert"]}, "'model_type' must be a string"),
    ({"architectures": "BertForSequenceClassification"}, "'architectures' must be a list"),
    ({"num_attention_heads": 0}, "'num_attention_heads' must be a positive integer"),
    ({"num_hidden_layers": -2}, "'num_hidden_layers' must be a positive integer"),
    ({"vocab_size": True}, "'vocab_size' must be a positive integer"),
    ({"label2id": {"a": "zero"}}, "'label2id' must be an object"),
    ({"id2label": {"0": "a", "5": "b", "7": "c"}}, "class ids 0..2"),
    ({"text_config": [1]}, "'text_config' must be an object"),
    ({"intermediate_size": None}, "'intermediate_size' must be a positive integer, got None"),
    ({"layer_norm_eps": "x"}, "does not load with transformers: Validation error for field 'layer_norm_eps'"),
    # disagreement with the tensors (2 layers, hidden 16, FFN 24, 3 labels, vocabulary 40)
    ({"num_hidden_layers": 1}, "num_hidden_layers = 1 but the tensors hold layers 0..1"),
    ({"num_hidden_layers": 3}, "num_hidden_layers = 3 but the tensors hold layers 0..1"),
    ({"vocab_size": 41}, "vocab_size = 41 but tensor 'bert.embeddings.word_embeddings.weight' has 40 rows"),
    ({"id2label": {"0": "a", "1": "b"}}, "id2label with 2 labels but tensor 'classifier.weight' has 3 rows"),
    ({"num_labels": 5}, "num_labels 5 but id2label names 3"),
    ({"hidden_size": 32}, "hidden_size = 32 but tensor 'bert.embeddings.word_embeddings.weight' has 16 columns"),
    ({"intermediate_size": 12}, "intermediate_size = 12 but tensor"),
    ({"num_attention_heads": 3}, "hidden_size=16 is not a multiple of num_attention_heads=3"),
]


@pytest.mark.parametrize("change,fragment", BAD_CONFIGS, ids=[next(iter(c)) + "=" + json.dumps(next(iter(c.values())))
                                                             for c, _ in BAD_CONFIGS])
def test_config_fields_are_typed_and_agree_with_the_weights(tmp_path, bert_cls, change, fragment):
    bad = mutated(bert_cls, tmp_path / "bad", **change)
    command = ("fuse", bad, bert_cls, "-o", tmp_path / "out") if "heads=3" in fragment else ("inspect", bad)
    refused(tmp_path, *command, fragments=(fragment,))


def test_a_tensor_without_the_axis_its_family_moves(tmp_path, bert_cls):
    bad = shutil.copytree(bert_cls, tmp_path / "bad")
    weights = load_file(bad / "model.safetensors")
    weights["bert.encoder.layer.1.attention.self.query.bias"] = torch.tensor(0.5)
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    refused(tmp_path, "inspect", bad, "--spaces", fragments=("shape ()", "reads its axis 0"))


def test_every_family_config_passes_the_checks(tmp_path):
    """The typed config refuses only what is wrong: every tiny family as transformers saves it opens."""
    from otfuse_cli.checkpoint import open_checkpoint

    for name in FAMILIES:
        tiny_model(name).save_pretrained(tmp_path / name)
        ckpt = open_checkpoint(tmp_path / name)
        assert ckpt.model_config is not None and ckpt.model_config.model_type == ckpt.config["model_type"]


def test_evaluate_refuses_a_config_that_describes_other_weights(tmp_path):
    """Today transformers would build a 1-layer model from these 2-layer weights and score it."""
    model, data = sentiment_copy(tmp_path)
    ok = cli("evaluate", model, "--data", data, "--json")
    assert ok.exit_code == 0, ok.stderr
    mutated(model, tmp_path / "one_layer", num_hidden_layers=1)
    refused(tmp_path, "evaluate", tmp_path / "one_layer", "--data", data, fragments=("num_hidden_layers = 1",))


def test_evaluate_refuses_a_tensor_the_model_does_not_use(tmp_path):
    model, data = sentiment_copy(tmp_path)
    weights = load_file(model / "model.safetensors")
    weights["bert.encoder.extra.weight"] = torch.zeros(2, 2)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    refused(tmp_path, "evaluate", model, "--data", data, fragments=("bert.encoder.extra.weight", "does not use"))


def test_evaluate_names_a_shape_the_config_builds_differently(tmp_path):
    model, data = sentiment_copy(tmp_path)
    mutated(model, tmp_path / "short", max_position_embeddings=32)
    refused(tmp_path, "evaluate", tmp_path / "short", "--data", data,
            fragments=("'bert.embeddings.position_embeddings.weight'", "(64, 64)", "(32, 64)"))


# ---------------------------------------------------------------- plan files


@pytest.fixture()
def plan_file(tmp_path, mlps):
    plans = tmp_path / "plans.safetensors"
    assert cli("align", *mlps, "-o", plans).exit_code == 0
    return plans


def rewrite_plans(path: Path, tensors=None, meta=None) -> None:
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    if meta is not None:
        metadata["otfuse.plans"] = json.dumps({**json.loads(metadata["otfuse.plans"]), **meta})
    save_file(tensors if tensors is not None else load_file(path), path, metadata=metadata)


def dense(index: torch.Tensor) -> torch.Tensor:
    """The coupling a hard plan's index vector stands for (written here, not taken from Plan)."""
    n = len(index)
    out = torch.zeros(n, n, dtype=torch.float64)
    for v, u in enumerate(index.tolist()):
        out[u, v] = 1.0 / n
    return out


@pytest.mark.parametrize("bad,fragment", [
    ("extra key", "unexpected tensor 'zz'"),
    ("model index", "unexpected tensor '7/0/index'"),
    ("model count", "'models' must be a positive model count"),
    ("anchor", "'anchor' must be a model index"),
    ("negative mass", "non-negative masses"),
    ("not a matrix", "2-D float matrix"),
    ("index not a permutation", "must hold a permutation of 0.."),
    ("index is float", "1-D integer vector"),
    ("coupling and index", "has both a coupling and an index"),
    ("stats", "'stats' must map"),
])
def test_plan_files_are_checked_against_their_schema(tmp_path, mlps, plan_file, bad, fragment):
    tensors = load_file(plan_file)
    index = tensors["1/0/index"]  # exact alignment at equal widths writes compact hard plans
    if bad == "extra key":
        rewrite_plans(plan_file, {**tensors, "zz": torch.zeros(1)})
    elif bad == "model index":
        tensors["7/0/index"] = tensors.pop("1/0/index")
        rewrite_plans(plan_file, tensors)
    elif bad == "model count":
        rewrite_plans(plan_file, meta={"models": "two"})
    elif bad == "anchor":
        rewrite_plans(plan_file, meta={"anchor": 5})
    elif bad in ("negative mass", "not a matrix"):
        coupling = dense(tensors.pop("1/0/index"))
        if bad == "negative mass":
            coupling[0, 0] = -1.0
        tensors["1/0/coupling"] = coupling if bad == "negative mass" else coupling.flatten()
        rewrite_plans(plan_file, tensors)
    elif bad == "index not a permutation":
        tensors["1/0/index"] = torch.zeros_like(index)
        rewrite_plans(plan_file, tensors)
    elif bad == "index is float":
        tensors["1/0/index"] = index.double()
        rewrite_plans(plan_file, tensors)
    elif bad == "coupling and index":
        rewrite_plans(plan_file, {**tensors, "1/0/coupling": dense(index)})
    else:
        rewrite_plans(plan_file, meta={"stats": ["x"]})
    refused(tmp_path, "fuse", *mlps, "--plan", plan_file, "-o", tmp_path / "out.safetensors",
            fragments=(fragment,))


def test_a_dense_hard_coupling_and_its_index_fuse_alike(tmp_path, mlps, plan_file):
    """Plan files written before compact plans hold dense couplings: they still load and fuse the same."""
    tensors = load_file(plan_file)
    old = tmp_path / "old.safetensors"
    shutil.copy(plan_file, old)
    rewrite_plans(old, {k.replace("/index", "/coupling"): (dense(v) if k.endswith("/index") else v)
                        for k, v in tensors.items()})
    out = {}
    for name, path in (("index", plan_file), ("dense", old)):
        result = cli("fuse", *mlps, "--plan", path, "-o", tmp_path / f"{name}.safetensors")
        assert result.exit_code == 0, result.stderr
        out[name] = load_file(tmp_path / f"{name}.safetensors")
    assert out["index"].keys() == out["dense"].keys()
    assert all(torch.equal(out["index"][k], out["dense"][k]) for k in out["index"])


def test_inner_maps_must_be_permutations(tmp_path):
    from otfuse_cli.alignment.plans import load_plans
    from otfuse_cli.errors import OtfuseError

    meta = {"otfuse.plans": json.dumps({"models": 2, "anchor": 0, "stats": {}})}
    good = {"1/h/coupling": torch.eye(2, dtype=torch.float64) / 2,
            "1/h/inner/qk": torch.tensor([[[0, 1, 2]] * 2] * 2)}
    save_file(good, tmp_path / "good.safetensors", metadata=meta)
    plans, _ = load_plans(tmp_path / "good.safetensors")
    assert plans[1]["h"].inner["qk"].shape == (2, 2, 3)
    bad = {**good, "1/h/inner/qk": torch.tensor([[[0, 0, 2]] * 2] * 2)}
    save_file(bad, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(OtfuseError, match="permutation of 0..2"):
        load_plans(tmp_path / "bad.safetensors")
    orphan = {"1/h/inner/qk": good["1/h/inner/qk"]}
    save_file(orphan, tmp_path / "orphan.safetensors", metadata=meta)
    with pytest.raises(OtfuseError, match="has no plan"):
        load_plans(tmp_path / "orphan.safetensors")


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize("device,fragment", [("tpu", "unknown device 'tpu'"), ("meta", "unknown device 'meta'")]
                         + ([] if torch.cuda.is_available() else [("cuda", "CUDA is not available")]))
def test_devices_are_checked_against_the_machine(tmp_path, mlps, device, fragment):
    data = tmp_path / "x.safetensors"
    save_file({"x": torch.randn(8, 20), "y": torch.arange(8) % 5}, data)
    refused(tmp_path, "evaluate", mlps[0], "--data", data, "--device", device, fragments=(fragment,))
    refused(tmp_path, "fuse", *mlps, "-o", tmp_path / "o.safetensors", "--align", "activations", "--data", data,
            "--device", device, fragments=(fragment,))


def test_a_device_given_but_unused_is_still_refused(tmp_path, mlps):
    refused(tmp_path, "fuse", *mlps, "-o", tmp_path / "o.safetensors", "--device", "tpu", fragments=("--device",))


# ---------------------------------------------------------------- data files


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_data_is_refused(tmp_path, mlps, value):
    x = torch.randn(8, 20)
    x[5, 3] = value
    data = tmp_path / "x.safetensors"
    save_file({"x": x, "y": torch.arange(8) % 5}, data)
    refused(tmp_path, "evaluate", mlps[0], "--data", data, fragments=("'x'", "NaN or Inf", "sample 5"))
    refused(tmp_path, "fuse", *mlps, "-o", tmp_path / "o.safetensors", "--align", "activations", "--data", data,
            fragments=("'x'", "NaN or Inf"))


def test_text_model_fed_image_tensors_is_one_line(tmp_path):
    for name in ("a", "b"):
        shutil.copytree(SENTIMENT / f"bert_{name}", tmp_path / name)
    images = tmp_path / "images.safetensors"
    save_file({"x": torch.rand(8, 1, 28, 28), "y": torch.arange(8) % 2}, images)
    refused(tmp_path, "fuse", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "out", "--align", "activations",
            "--data", images, fragments=("text model cannot run on tensor data",))


def test_a_model_with_non_finite_outputs_is_not_scored(tmp_path):
    a = save_mlp(tmp_path / "a.safetensors", edit=lambda sd: {**sd, "4.bias": torch.full((5,), float("nan"))})
    data = tmp_path / "x.safetensors"
    save_file({"x": torch.randn(8, 20), "y": torch.arange(8) % 5}, data)
    refused(tmp_path, "evaluate", a, "--data", data, "--json", fragments=("NaN or Inf",))  # weights checked first


# ---------------------------------------------------------------- strict JSON, option ranges


def strict_json(text: str):
    def refuse(token):
        raise AssertionError(f"non-JSON constant {token} in the output")

    return json.loads(text, parse_constant=refuse)


def test_evaluate_json_is_strict_and_names_non_finite_metrics(tmp_path, mlps, monkeypatch):
    from otfuse_cli.evaluation import metrics

    data = tmp_path / "x.safetensors"
    save_file({"x": torch.randn(8, 20), "y": torch.arange(8) % 5}, data)
    monkeypatch.setattr(metrics, "nll", lambda probs, labels: float("inf"))  # e.g. an overflowing score
    result = cli("evaluate", *mlps, "--data", data, "--json")
    assert result.exit_code == 0, result.stderr
    doc = strict_json(result.stdout)
    assert [row["nll"] for row in doc["rows"]] == [None, None]
    assert "a: nll" in doc["notes"]["non_finite"] and "b: nll" in doc["notes"]["non_finite"]
    table = cli("evaluate", *mlps, "--data", data)
    text = " ".join(table.stdout.split())  # the caption may wrap
    assert "inf" in text and "not a finite number (null in --json): a: nll, b: nll" in text


def test_print_json_never_writes_nan(capsys):
    from otfuse_cli.report import print_json

    print_json({"a": float("nan"), "b": [np.float32("inf"), 1.5, (2, float("-inf"))], "c": np.float64(0.25)})
    assert strict_json(capsys.readouterr().out) == {"a": None, "b": [None, 1.5, [2, None]], "c": 0.25}


@pytest.mark.parametrize("option,value", [("--num-beams", "0"), ("--max-length", "0"), ("--batch-size", "0"),
                                          ("--steps", "1"), ("--max-samples", "0")])
def test_evaluate_ranges_are_refused_while_parsing(tmp_path, option, value):
    # the model does not exist: the option must be refused before anything is opened
    refused(tmp_path, "evaluate", tmp_path / "missing.safetensors", "--data", tmp_path / "missing.npz",
            option, value, fragments=(f"'{option}'",))


# ---------------------------------------------------------------- Sinkhorn budget


def test_sinkhorn_matches_pot_and_stops_when_it_cannot_converge(monkeypatch):
    import ot

    from otfuse_cli.alignment import solvers
    from otfuse_cli.errors import OtfuseError

    rng = np.random.default_rng(0)
    cost = rng.random((24, 24))
    cost /= cost.mean()
    a = np.full(24, 1 / 24)
    plan, info = solvers.solve(cost, a, a, "sinkhorn", reg=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = ot.sinkhorn(a, a, cost, 0.05, method="sinkhorn_log", numItermax=10**6, stopThr=1e-12)
    np.testing.assert_allclose(plan, reference, rtol=0, atol=1e-12)  # tests/test_sinkhorn_speed.py: more
    assert info["marginal_error"] < 1e-9
    # reg 1e-6 converges now (to the optimal matching); a budget too small for it is what cannot
    with pytest.raises(OtfuseError, match=r"did not converge .* 3 iterations .* larger --reg .* --max-iter"):
        solvers.solve(cost, a, a, "sinkhorn", reg=1e-6, max_iter=3)


def test_no_result_depends_on_the_clock(tmp_path, mlps, monkeypatch):
    """A clock that jumps an hour at every reading changes nothing in a Sinkhorn fuse (byte-identical output);
    the iteration budget is in the provenance; only an opt-in --time-limit reacts to it, by aborting."""
    from otfuse_cli import deadline

    args = ["fuse", *mlps, "--solver", "sinkhorn", "--reg", "0.05", "--max-iter", "800"]
    assert cli(*args, "-o", tmp_path / "calm.safetensors").exit_code == 0
    ticks = iter(range(0, 10**9, 3600))
    monkeypatch.setattr(deadline, "CLOCK", lambda: float(next(ticks)))
    monkeypatch.setattr(time, "monotonic", lambda: float(next(ticks)))
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)))
    assert cli(*args, "-o", tmp_path / "jumpy.safetensors").exit_code == 0
    assert (tmp_path / "calm.safetensors").read_bytes() == (tmp_path / "jumpy.safetensors").read_bytes()
    header = (tmp_path / "calm.safetensors").read_bytes()
    meta = json.loads(header[8:8 + int.from_bytes(header[:8], "little")])["__metadata__"]
    assert json.loads(meta["otfuse"])["options"]["align"]["max_iter"] == 800
    res = cli(*args, "-o", tmp_path / "limited.safetensors", "--time-limit", "60")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "--time-limit 60 s reached", "nothing was written")
    assert not (tmp_path / "limited.safetensors").exists()


def test_sinkhorn_out_of_budget_is_one_line(tmp_path, mlps):
    refused(tmp_path, "fuse", *mlps, "-o", tmp_path / "o.safetensors", "--solver", "sinkhorn", "--reg", "1e-6",
            "--max-iter", "3", fragments=("did not converge", "larger --reg", "--max-iter"))


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_while_reading_tensors_is_an_interrupt_not_a_read_error():
    """torch turns a SIGINT landing inside storage creation into a ValueError about UntypedStorage; without
    care about half of these interrupts were reported as "cannot read tensor"."""
    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli.errors import OtfuseError

    ckpt = open_checkpoint(REPO / "fixtures" / "digits" / "mlp_a.safetensors")
    old = signal.signal(signal.SIGALRM, signal.default_int_handler)
    rng = random.Random(0)
    outcomes = {"interrupt": 0, "read error": 0}
    try:
        for _ in range(150):
            try:
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-5, 2e-3))
                while True:
                    ckpt.get("0.bias")
            except KeyboardInterrupt:
                outcomes["interrupt"] += 1
            except OtfuseError:
                outcomes["read error"] += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert outcomes == {"interrupt": 150, "read error": 0}


class FlakyHandle:
    """A safetensors handle whose get_tensor fails the first `failures` times (a swallowed Ctrl-C: once)."""

    def __init__(self, handle, failures):
        self.handle, self.failures = handle, failures

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def get_tensor(self, name):
        if self.failures:
            self.failures -= 1
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")
        return self.handle.get_tensor(name)


@pytest.mark.parametrize("failures,code,message", [(1, 130, "error: interrupted"), (9, 2, "cannot read tensor")])
def test_cli_reports_an_interrupted_read_as_interrupted(tmp_path, mlps, monkeypatch, failures, code, message):
    from otfuse_cli.checkpoint import reader

    real = reader._safe_open
    monkeypatch.setattr(reader, "_safe_open", lambda file: FlakyHandle(real(file), failures))
    before = snapshot(tmp_path)
    result = cli("fuse", *mlps, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == code, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr
    assert snapshot(tmp_path) == before
