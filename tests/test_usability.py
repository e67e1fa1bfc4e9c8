"""Usability: CI gates, recipes, and activation alignment within the model's position limit."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, cli, cli_subprocess

FIX = Path(__file__).resolve().parents[1] / "fixtures"
A, B = FIX / "digits" / "mlp_a.safetensors", FIX / "digits" / "mlp_b.safetensors"


def test_inspect_check_is_a_ci_gate(tmp_path):
    ok = cli_subprocess("inspect", A, B, "--check")
    assert ok.returncode == 0, ok.stderr
    bad = cli_subprocess("inspect", A, FIX / "digits" / "cnn_a.safetensors", "--check")
    assert bad.returncode == 3
    assert_one_line_error(bad.stderr, "cannot be fused", "cnn")


def test_recipe_reproduces_the_command(tmp_path):
    (tmp_path / "job.yaml").write_text(
        f"command: fuse\nmodels: [{A}, {B}]\noutput: out.safetensors\n"
        "options: {solver: sinkhorn, reg: 0.02}\nwrite: {dtype: float16}\n")
    res = cli("run", tmp_path / "job.yaml", "--json")
    assert res.exit_code == 0, res.output
    assert cli("fuse", A, B, "-o", tmp_path / "cli.safetensors", "--solver", "sinkhorn", "--reg", "0.02",
               "--dtype", "float16").exit_code == 0
    a, b = load_file(tmp_path / "out.safetensors"), load_file(tmp_path / "cli.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float16 for k in a)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:  # the recipe travels in the provenance
        assert json.loads(f.metadata()["otfuse"])["options"]["recipe"]["options"]["solver"] == "sinkhorn"


def test_bad_recipes_are_one_line(tmp_path):
    cases = {"command: blend\n": "command: align | fuse | compress",
             f"command: fuse\nmodels: [{A}, {B}]\noutput: o\nsolverr: 1\n": "unknown key(s) solverr",
             f"command: fuse\nmodels: [{A}, {B}]\noutput: o\noptions: {{solver: foo}}\n": "unknown --solver 'foo'",
             f"command: fuse\nmodels: [{A}, {B}]\noutput: o\ndata: {{sample: 3}}\n": "unknown data field(s) sample",
             "command: [fuse\n": "not valid YAML"}
    for i, (text, words) in enumerate(cases.items()):
        (tmp_path / f"r{i}.yaml").write_text(text)
        res = cli("run", tmp_path / f"r{i}.yaml")
        assert res.exit_code == 2, (text, res.output)
        assert_one_line_error(res.stderr, words)


def test_activation_alignment_respects_the_position_limit(tmp_path):
    """GPT-2 with 16 positions aligned on texts far longer than that: tokens are capped, no IndexError."""
    import transformers as T

    from tiny_transformers import save_tokenizer, sentences
    import otfuse_cli as otf

    for k in (0, 1):
        torch.manual_seed(k)
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                               bos_token_id=0, eos_token_id=0)).eval()
        model.save_pretrained(tmp_path / f"g{k}")
        save_tokenizer(tmp_path / f"g{k}")
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"text": " ".join([s] * 5)}) + "\n" for s in sentences(8)))
    otf.fuse([str(tmp_path / "g0"), str(tmp_path / "g1")], str(tmp_path / "f"),
             options=otf.AlignOptions(align="activations"), data=otf.DataOptions(data=str(tmp_path / "long.jsonl")))
    assert (tmp_path / "f" / "model.safetensors").is_file()

    # and the cut is said, not silent: the count comes from the tokenizer itself
    tok = T.AutoTokenizer.from_pretrained(str(tmp_path / "g0"))
    texts = [json.loads(line)["text"] for line in (tmp_path / "long.jsonl").read_text().splitlines()]
    longer = sum(len(tok(t)["input_ids"]) > 16 for t in texts)
    assert longer > 0
    fused = cli_subprocess("fuse", tmp_path / "g0", tmp_path / "g1", "-o", tmp_path / "f2", "--align", "activations",
                           "--data", tmp_path / "long.jsonl")
    assert fused.returncode == 0, fused.stderr
    notes = [line for line in fused.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2 and all(f"{longer} of {len(texts)} sample texts were cut to 16 tokens" in n
                                   for n in notes), fused.stderr
    scored = cli("evaluate", tmp_path / "g0", "--data", tmp_path / "long.jsonl", "--json")
    assert scored.exit_code == 0, scored.output
    assert f"{longer} of {len(texts)} texts were cut to 16 tokens" in json.loads(scored.stdout)["notes"]["truncated"]
    stats = cli_subprocess("stats", tmp_path / "g0", "--data", tmp_path / "long.jsonl", "-o",
                           tmp_path / "g0.stats.safetensors", "--kind", "gram")
    assert stats.returncode == 0, stats.stderr
    assert f"note: {tmp_path / 'g0'}: {longer} of {len(texts)} sample texts were cut to 16 tokens" in stats.stderr
    quiet = cli_subprocess("--quiet", "fuse", tmp_path / "g0", tmp_path / "g1", "-o", tmp_path / "f3", "--align",
                           "activations", "--data", tmp_path / "long.jsonl")
    assert quiet.returncode == 0 and quiet.stderr == ""


COMMANDS = ("inspect", "align", "fuse", "evaluate", "compress", "stats", "run")


def test_help_names_values_like_click_and_shows_examples():
    """Item 10/12: every command's --help at 80 columns has examples, lists the choices of a choice option in
    click's [a|b] form, and no typer type labels (<bool>, <str>, <int range>, <list[str]>)."""
    import os
    import re
    import subprocess
    import sys

    from conftest import REPO

    env = dict(os.environ, COLUMNS="80", PYTHONPATH=str(REPO))
    for command in COMMANDS:
        out = subprocess.run([sys.executable, "-m", "otfuse_cli", command, "--help"], capture_output=True,
                             text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        text = out.stdout
        assert "Examples" in text and "otfuse " + command in text, (command, text)
        assert not re.search(r"<(bool|str|int|float|list|path)", text), (command, text)
        assert max(map(len, text.splitlines())) <= 80, command
    fuse = subprocess.run([sys.executable, "-m", "otfuse_cli", "fuse", "--help"], capture_output=True, text=True,
                          env=env, timeout=60).stdout
    assert "--solver [exact|sinkhorn]" in fuse and "--merge RULE" in fuse  # nine rules: named in the help text
    assert all(rule in " ".join(fuse.split()) for rule in ("regmean-ties", "regmean-dare", "dare-ties"))
    assert re.search(r"--repair, --repair-bn +REPAIR", fuse)  # a flag takes no value

    # the group hands out the same command object every time: naming its values must not stack up
    from typer.main import get_command

    from otfuse_cli.cli import app

    group = get_command(app)
    ctx = group.make_context("otfuse", ["fuse", "--help"], resilient_parsing=True)
    for _ in range(3):
        command = group.get_command(ctx, "fuse")
    solver = next(p for p in command.params if "--solver" in p.opts)
    assert solver.display_type_rich(ctx) == "[exact|sinkhorn]"


def test_interpolation_plot_shows_every_metric_with_the_models_names(tmp_path):
    """Item 11: one panel per metric (small multiples), the ends named after the models, and the file written
    with the user's umask (not 0600)."""
    import os

    from matplotlib.image import imread

    plot = tmp_path / "curve.png"
    old = os.umask(0o022)
    try:
        result = cli_subprocess("evaluate", "--interpolate", A, B, "--data", FIX / "digits" / "test.safetensors",
                                "--steps", "3", "--aligned", "--plot", plot, "--max-samples", "200", "--json")
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    curves = json.loads(result.stdout)["interpolation"]
    metrics = curves[0]["metrics"]
    assert len(metrics) >= 4 and [c["name"] for c in curves] == ["naive", "aligned"]
    assert plot.stat().st_mode & 0o777 == 0o644
    height, width = imread(plot).shape[:2]
    assert width > 1000 and height > 500  # a grid of panels, not one 600x400 axis

    from otfuse_cli.evaluation.interpolate import curve_figure

    fig = curve_figure(curves, metrics, ("mlp_a", "mlp_b"))
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == metrics
    assert all("mlp_a" in ax.get_xlabel() and "mlp_b" in ax.get_xlabel() for ax in panels)
    assert all(len(ax.get_lines()) == 2 for ax in panels)
