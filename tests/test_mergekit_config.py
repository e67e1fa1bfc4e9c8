"""mergekit configs through `otfuse run CONFIG -o OUT`: mergekit's documented examples (linear, task arithmetic,
TIES, DARE), rewritten by hand for three children of one tiny BERT. Oracles: linear and task arithmetic against
their closed forms in numpy from the parents' safetensors; TIES and DARE against the equivalent `otfuse fuse`
command line, tensor bytes for tensor bytes; every refusal one line, exit 2, nothing written. The `slow` test
runs real mergekit (benchmarks/.venv-mergekit) on the same configs where the two tools compute the same thing."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, cli, cli_subprocess, make_tiny_bert

REPO = Path(__file__).resolve().parents[1]
MERGEKIT = REPO / "benchmarks" / ".venv-mergekit" / "bin" / "mergekit-yaml"
CHILDREN = ("c0", "c1", "c2")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """`base/`: a tiny BertModel; `c0/`..`c2/`: base + tau_k (tau ~ 0.02 N(0, 1), every tensor); returns the
    folder and every model's tensors in float64 numpy."""
    root = tmp_path_factory.mktemp("mergekit_family")
    make_tiny_bert(root / "base", hidden=32, intermediate=64, layers=2, seed=0)
    base = load_file(root / "base" / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for name in CHILDREN:
        (root / name).mkdir()
        shutil.copy(root / "base" / "config.json", root / name / "config.json")
        child = {n: (v + 0.02 * torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v
                 for n, v in base.items()}
        save_file(child, root / name / "model.safetensors", metadata={"format": "pt"})
    tensors = {name: {n: v.double().numpy() for n, v in load_file(root / name / "model.safetensors").items()}
               for name in ("base", *CHILDREN)}
    return root, tensors


def llama_family(root: Path) -> None:
    """base + three children as tiny LlamaForCausalLM folders (mergekit 0.1.5 cannot plan BERT: its optional
    pooler weight with aliases fails in plan_tensor)."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    T.LlamaForCausalLM(cfg).eval().save_pretrained(root / "base")
    base = load_file(root / "base" / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for name in CHILDREN:
        (root / name).mkdir()
        shutil.copy(root / "base" / "config.json", root / name / "config.json")
        save_file({n: v + 0.02 * torch.randn(v.shape, generator=gen) for n, v in base.items()},
                  root / name / "model.safetensors", metadata={"format": "pt"})


def write(folder: Path, text: str, name: str = "config.yaml") -> Path:
    (folder / name).write_text(text)
    return folder / name


def run(config: Path, out: Path, *extra: str):
    res = cli("run", config, "-o", out, *extra)
    assert res.exit_code == 0, res.stderr
    return res


def tensors(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def numpy(folder: Path) -> dict:
    return {n: v.double().numpy() for n, v in tensors(folder).items()}


def same_bytes(a: Path, b: Path) -> None:
    x, y = tensors(a), tensors(b)
    assert x.keys() == y.keys()
    for n in x:
        assert x[n].dtype == y[n].dtype and torch.equal(x[n], y[n]), n


# ------------------------------------------------------------------------------------------------- linear

LINEAR = """\
# mergekit's linear example: three fine-tunes, weights 1.0 / 0.3 / 0.5, written in float16
models:
  - model: c0
    parameters:
      weight: 1.0
  - model: c1
    parameters:
      weight: 0.3
  - model: c2
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""


def test_linear_is_the_weighted_mean(family, tmp_path):
    root, m = family
    res = run(write(root, LINEAR, "linear.yaml"), tmp_path / "out")
    assert "note: mergekit linear runs as: otfuse fuse c0 c1 c2 --align none --merge average --weights 1,0.3,0.5" \
        in res.stderr
    out = tensors(tmp_path / "out")
    w = np.array([1.0, 0.3, 0.5])
    for n, v in out.items():
        assert v.dtype == torch.float16, n
        expect = sum(wk * m[c][n] for wk, c in zip(w, CHILDREN)) / w.sum()
        np.testing.assert_allclose(v.double().numpy(), expect, rtol=2e-3, atol=2e-4)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_size"] == 32


def test_linear_without_normalize_where_the_weights_sum_to_one(family, tmp_path):
    """normalize: false sums the weighted models: otfuse's average when the weights sum to 1 (mergekit's
    output path as its second argument, like mergekit-yaml's)."""
    root, m = family
    config = write(root, "merge_method: linear\nparameters: {normalize: false}\nmodels:\n"
                         "  - {model: c0, parameters: {weight: 0.75}}\n  - {model: c1, parameters: {weight: 0.25}}\n",
                   "linear_sum.yaml")
    res = cli("run", config, tmp_path / "out")
    assert res.exit_code == 0, res.stderr
    out = numpy(tmp_path / "out")
    for n in out:
        np.testing.assert_allclose(out[n], 0.75 * m["c0"][n] + 0.25 * m["c1"][n], rtol=1e-6, atol=1e-7)


def test_linear_averages_in_a_base_model_it_was_not_given_as_a_model(family, tmp_path):
    """linear ignores the base's role; a base_model missing from models is one more input, as mergekit adds
    it, with the top-level weight."""
    root, m = family
    config = write(root, "merge_method: linear\nbase_model: base\nparameters: {weight: 2.0}\nmodels:\n"
                         "  - {model: c0, parameters: {weight: 1.0}}\n  - {model: c1}\n", "linear_base.yaml")
    res = run(config, tmp_path / "out")
    assert "otfuse fuse c0 c1 base --align none --merge average --weights 1,2,2" in res.stderr
    out = numpy(tmp_path / "out")
    for n in out:
        expect = (m["c0"][n] + 2 * m["c1"][n] + 2 * m["base"][n]) / 5
        np.testing.assert_allclose(out[n], expect, rtol=1e-6, atol=1e-7)


# -------------------------------------------------------------------------------------------- task arithmetic

TASK_ARITHMETIC = """\
# mergekit's task_arithmetic: task vectors of two fine-tunes added to their base, each with its weight
models:
  - model: c0
    parameters:
      weight: 1.0
  - model: c1
    parameters:
      weight: 0.5
merge_method: task_arithmetic
base_model: base
dtype: float32
parameters:
  lambda: 0.8
"""


@pytest.mark.parametrize("normalize", [None, True])
def test_task_arithmetic_is_base_plus_lambda_times_the_weighted_sum(family, tmp_path, normalize):
    """Default normalize: false: base + lambda * sum w_k tau_k; normalize: true divides by sum w_k."""
    root, m = family
    text = TASK_ARITHMETIC + ("" if normalize is None else "  normalize: true\n")
    run(write(root, text, f"ta_{normalize}.yaml"), tmp_path / "out")
    out = numpy(tmp_path / "out")
    w = [1.0, 0.5]
    divisor = sum(w) if normalize else 1.0
    for n in out:
        tau = sum(wk * (m[c][n] - m["base"][n]) for wk, c in zip(w, ("c0", "c1")))
        np.testing.assert_allclose(out[n], m["base"][n] + 0.8 * tau / divisor, rtol=1e-6, atol=2e-7)


def test_task_arithmetic_base_listed_among_the_models(family, tmp_path):
    """A base_model also listed under models (with no parameters, as mergekit's examples write it) is the base,
    not a third input; a top-level weight is every model's default."""
    root, m = family
    config = write(root, "merge_method: task_arithmetic\nbase_model: base\nparameters: {weight: 0.5}\nmodels:\n"
                         "  - model: base\n  - model: c0\n  - model: c2\n", "ta_listed.yaml")
    run(config, tmp_path / "out")
    out = numpy(tmp_path / "out")
    for n in out:
        tau = 0.5 * (m["c0"][n] - m["base"][n]) + 0.5 * (m["c2"][n] - m["base"][n])
        np.testing.assert_allclose(out[n], m["base"][n] + tau, rtol=1e-6, atol=2e-7)


# ------------------------------------------------------------------------------------------ TIES and DARE

TIES = """\
# mergekit's ties example, with one density and scalar weights (otfuse has no gradients or filters)
models:
  - model: base
    # the base model needs no parameters
  - model: c0
    parameters:
      density: 0.5
      weight: 1.0
  - model: c1
    parameters:
      density: 0.5
      weight: 0.3
  - model: c2
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

DARE_TIES = """\
models:
  - model: c0
    parameters:
      weight: 0.5
      density: 0.6
  - model: c1
    parameters:
      weight: 0.3
      density: 0.6
merge_method: dare_ties
base_model: base
parameters:
  normalize: true
  lambda: 0.9
"""

DARE_LINEAR = """\
models:
  - model: c0
    parameters: {weight: 1.0}
  - model: c1
    parameters: {weight: 1.0}
  - model: c2
    parameters: {weight: 2.0}
merge_method: dare_linear
base_model: base
parameters:
  density: 0.5
  lambda: 0.6
"""

EQUIVALENT = {  # config -> the otfuse fuse options it must reproduce (lambda * sum(w) / (K * divisor) for dare)
    "ties": (TIES, ["c0", "c1", "c2", "--merge", "ties", "--density", "0.5", "--scale", "1", "--weights",
                    "1,0.3,0.5", "--dtype", "float16"], "TIES' trim"),
    "dare_ties": (DARE_TIES, ["c0", "c1", "--merge", "dare-ties", "--density", "0.6", "--scale", "0.9",
                              "--weights", "0.5,0.3"], "DARE's drops"),
    "dare_linear": (DARE_LINEAR, ["c0", "c1", "c2", "--merge", "dare", "--density", "0.5", "--scale",
                                  str(0.6 * 4 / 3), "--weights", "1,1,2"], "DARE's drops"),
}


@pytest.mark.parametrize("name", EQUIVALENT)
def test_ties_and_dare_equal_the_otfuse_command_line(family, tmp_path, name):
    root, _ = family
    text, options, note = EQUIVALENT[name]
    res = run(write(root, text, f"{name}.yaml"), tmp_path / "from_config")
    assert note in res.stderr and "otfuse fuse" in res.stderr
    args = [root / a if a in CHILDREN else a for a in options]
    direct = cli("fuse", *args, "--base", root / "base", "--align", "none", "-o", tmp_path / "direct")
    assert direct.exit_code == 0, direct.stderr
    same_bytes(tmp_path / "from_config", tmp_path / "direct")


def test_dare_draws_differ_from_the_plain_sum(family, tmp_path):
    """The DARE config really drops: its result is not task arithmetic's."""
    root, m = family
    run(write(root, DARE_LINEAR, "dl.yaml"), tmp_path / "out")
    out = numpy(tmp_path / "out")
    name = "encoder.layer.0.intermediate.dense.weight"
    plain = m["base"][name] + 0.6 * sum(w * (m[c][name] - m["base"][name]) for w, c in zip((1, 1, 2), CHILDREN))
    assert not np.allclose(out[name], plain, atol=1e-4)


# ------------------------------------------------------------------------------- paths, provenance, output

def test_paths_are_relative_to_the_config_and_the_output_to_the_current_directory(family, tmp_path):
    """The real entry point: models found from the config's folder wherever the command runs; -o relative to
    the current directory; the mergekit config recorded in the provenance; an existing output refused
    unless --force."""
    root, m = family
    text = TASK_ARITHMETIC.replace("model: c0", "model: ../c0").replace("model: c1", "model: ../c1") \
        .replace("base_model: base", "base_model: ../base")
    (root / "configs").mkdir(exist_ok=True)
    config = write(root / "configs", text)
    res = cli_subprocess("run", config, "-o", "merged", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = numpy(tmp_path / "merged")
    name = "embeddings.word_embeddings.weight"
    tau = 1.0 * (m["c0"][name] - m["base"][name]) + 0.5 * (m["c1"][name] - m["base"][name])
    np.testing.assert_allclose(out[name], m["base"][name] + 0.8 * tau, rtol=1e-6, atol=2e-7)
    record = json.loads((tmp_path / "merged" / "otfuse.json").read_text())
    assert "merge_method: task_arithmetic" not in json.dumps(record)  # a mapping, not text
    assert record["options"]["mergekit"]["merge_method"] == "task_arithmetic"
    again = cli_subprocess("run", config, "-o", "merged", cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr
    assert cli_subprocess("run", config, "-o", "merged", "--force", cwd=tmp_path).returncode == 0


def test_an_otfuse_recipe_takes_its_output_from_the_command_line_too(family, tmp_path):
    root, _ = family
    recipe = write(root, "command: fuse\nmodels: [c0, c1]\noutput: unused/\nbase: base\noptions: {align: none}\n"
                         "merge: {merge: task-arithmetic, scale: 0.6}\nweights: \"1,0.5\"\n", "recipe.yaml")
    run(recipe, tmp_path / "recipe_out")
    run(write(root, TASK_ARITHMETIC, "ta.yaml"), tmp_path / "config_out")
    assert not (root / "unused").exists()
    a, b = numpy(tmp_path / "recipe_out"), numpy(tmp_path / "config_out")
    for n in a:
        np.testing.assert_allclose(a[n], b[n], rtol=1e-6, atol=1e-7)


# -------------------------------------------------------------------------------------------- refusals

TWO = "models:\n  - {model: c0, parameters: {weight: 1.0}}\n  - {model: c1, parameters: {weight: 1.0}}\n"
REFUSED = {
    "slerp": ("merge_method: slerp\nbase_model: c0\nparameters: {t: 0.5}\n" + TWO, "merge_method 'slerp'"),
    "della": ("merge_method: della\nbase_model: base\nparameters: {epsilon: 0.1}\n" + TWO, "'della'"),
    "breadcrumbs": ("merge_method: breadcrumbs\nbase_model: base\n" + TWO, "'breadcrumbs'"),
    "model_stock": ("merge_method: model_stock\nbase_model: base\n" + TWO, "'model_stock'"),
    "passthrough slices": ("merge_method: passthrough\nslices:\n  - sources:\n"
                           "      - {model: c0, layer_range: [0, 1]}\n", "'passthrough'"),
    "linear slices": ("merge_method: linear\nslices:\n  - sources:\n      - {model: c0, layer_range: [0, 1]}\n",
                      "mergekit key slices"),
    "tokenizer": ("merge_method: linear\ntokenizer: {source: union}\n" + TWO, "mergekit key tokenizer"),
    "chat template": ("merge_method: linear\nchat_template: chatml\n" + TWO, "mergekit key chat_template"),
    "tokenizer union": ("merge_method: linear\ntokenizer_source: union\n" + TWO, "tokenizer_source: union"),
    "unknown key": ("merge_method: linear\nmerge_options: {}\n" + TWO, "'merge_options' is not a mergekit key"),
    "weight gradient": ("merge_method: linear\nmodels:\n  - {model: c0, parameters: {weight: [0, 0.5, 1]}}\n"
                        "  - {model: c1, parameters: {weight: 1.0}}\n", "weight is a gradient"),
    "density filter": ("merge_method: ties\nbase_model: base\nparameters:\n  density:\n"
                       "    - {filter: mlp, value: 0.5}\n    - {value: 0.2}\n" + TWO, "density has per-tensor filters"),
    "per-model densities": ("merge_method: ties\nbase_model: base\nmodels:\n"
                            "  - {model: c0, parameters: {weight: 1.0, density: 0.5}}\n"
                            "  - {model: c1, parameters: {weight: 1.0, density: 0.3}}\n", "per-model densities"),
    "ties without normalize": ("merge_method: ties\nbase_model: base\nparameters: {normalize: false}\n" + TWO,
                               "ties with normalize: false"),
    "dare_ties default normalize": ("merge_method: dare_ties\nbase_model: base\nparameters: {density: 0.5}\n" + TWO,
                                    "its mergekit default"),
    "dare without rescale": ("merge_method: dare_linear\nbase_model: base\nparameters: {rescale: false}\n" + TWO,
                             "rescale: false"),
    "ties with rescale": ("merge_method: ties\nbase_model: base\nparameters: {rescale: true}\n" + TWO,
                          "rescale: true"),
    "epsilon on ties": ("merge_method: ties\nbase_model: base\nparameters: {epsilon: 0.1}\n" + TWO, "'epsilon'"),
    "lambda per model": ("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                         "  - {model: c0, parameters: {weight: 1.0, lambda: 0.5}}\n"
                         "  - {model: c1, parameters: {weight: 1.0}}\n", "'lambda' is read only from the top-level"),
    "negative weight": ("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                        "  - {model: c0, parameters: {weight: 1.0}}\n  - {model: c1, parameters: {weight: -0.5}}\n",
                        "non-negative"),
    "negative lambda": ("merge_method: task_arithmetic\nbase_model: base\nparameters: {lambda: -1}\n" + TWO,
                        "lambda -1"),
    "missing weight": ("merge_method: linear\nmodels:\n  - {model: c0, parameters: {weight: 1.0}}\n  - model: c1\n",
                       "c1 has no weight"),
    "linear sum": ("merge_method: linear\nparameters: {normalize: false}\n" + TWO, "normalize: false"),
    "no base": ("merge_method: ties\n" + TWO, "needs base_model"),
    "one model": ("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                  "  - {model: c0, parameters: {weight: 1}}\n", "two or more models besides base_model"),
    "lora": ("merge_method: linear\nmodels:\n  - {model: c0+adapter, parameters: {weight: 1.0}}\n"
             "  - {model: c1, parameters: {weight: 1.0}}\n", "model+LoRA"),
    "float64": ("merge_method: linear\ndtype: float64\n" + TWO, "dtype 'float64'"),
    "tokenizer of another model": ("merge_method: linear\ntokenizer_source: c2\n" + TWO, "none of the config's models"),
    "string weight": ("merge_method: linear\nparameters: {weight: half}\nmodels: [{model: c0}, {model: c1}]\n",
                      "weight must be a number"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refusals_are_one_line_and_write_nothing(family, tmp_path, case):
    root, _ = family
    text, fragment = REFUSED[case]
    config = write(tmp_path, text.replace("model: c", f"model: {root}/c").replace("base_model: base",
                                                                                   f"base_model: {root}/base"))
    res = cli("run", config, "-o", tmp_path / "out")
    assert res.exit_code == 2, (case, res.stdout, res.stderr)
    assert_one_line_error(res.stderr, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_a_mergekit_config_needs_an_output(family, tmp_path):
    root, _ = family
    res = cli("run", write(root, LINEAR, "no_out.yaml"))
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "names no output", "-o OUT")
    res = cli("run", write(root, LINEAR, "two_out.yaml"), tmp_path / "a", "-o", tmp_path / "b")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "two outputs")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------- real mergekit

@pytest.mark.slow
@pytest.mark.skipif(not MERGEKIT.exists(), reason="no mergekit at benchmarks/.venv-mergekit")
@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties"])
def test_real_mergekit_computes_the_same_tensors(tmp_path, name):
    """mergekit-yaml on the same config (float32, run from the config's folder, where it resolves the paths),
    on tiny Llamas. TIES at density 0.5 keeps the same entries in both tools here: 0.5 x n is whole for every
    tensor, so mergekit's int(density x n) and otfuse's ceil agree, and random magnitudes do not tie."""
    root = tmp_path / "models"
    root.mkdir()
    llama_family(root)
    text = {"linear": LINEAR, "task_arithmetic": TASK_ARITHMETIC, "ties": TIES}[name]
    text = text.replace("dtype: float16", "dtype: float32")
    config = write(root, text, f"real_{name}.yaml")
    run(config, tmp_path / "otfuse")
    done = subprocess.run([str(MERGEKIT), config.name, str(tmp_path / "mergekit"), "--no-copy-tokenizer",
                           "--no-write-model-card"],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = tensors(tmp_path / "otfuse")
    theirs = {}
    for f in sorted((tmp_path / "mergekit").glob("*.safetensors")):
        theirs.update(load_file(f))
    assert ours.keys() <= theirs.keys()
    for n, v in ours.items():
        torch.testing.assert_close(v, theirs[n].to(v.dtype), rtol=1e-5, atol=1e-6, msg=n)
