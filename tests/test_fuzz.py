"""Seeded fuzzing in the suite (issue 14): 300 mutated checkpoints, config.json files and data files through
`inspect`, `fuse`, `evaluate` and `compress`, about 15% of them hostile inputs instead (issue 30: sparse size
bombs, FIFOs and devices, deeply nested JSON and YAML, hostile option values; recipes through `run` too). The
engine is benchmarks/fuzz.py (`python benchmarks/fuzz.py --cases 10000` for long runs; `--case N` replays one).

Each case holds when: exit 0 or 2; on 2 exactly one `error:` line, no traceback, no new files; on 0 an output
that loads and is finite (fuse, compress) or strict JSON with finite or null numbers (inspect, evaluate); no
silent acceptance of NaN/Inf input; every input byte-identical afterwards. The cases run once, in two worker
processes, in a module fixture; each case is then its own test so a failure names its case.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import fuzz  # noqa: E402

SEED = 14
CASES = 300


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[int, dict]:
    work = tmp_path_factory.mktemp("fuzz")
    jobs = min(2, os.cpu_count() or 1)
    return {r["case"]["number"]: r for r in fuzz.run_many(range(CASES), SEED, jobs=jobs, timeout=60, work=work)}


@pytest.mark.parametrize("number", range(CASES))
def test_fuzz_case(records, number):
    rec = records[number]
    assert not rec["problems"], (f"{rec['line']}\n  exit {rec['code']}: {rec['first_line']}\n  "
                                 + "\n  ".join(rec["problems"])
                                 + f"\n  replay: python benchmarks/fuzz.py --case {number} --seed {SEED}")


def test_the_cases_cover_every_command_family_and_mutator(records):
    """300 cases reach every command, every family, data and config mutations, every hostile kind, and both
    outcomes."""
    cases = [r["case"] for r in records.values()]
    assert set(Counter(c["command"] for c in cases)) == set(fuzz.ALL_COMMANDS)
    assert set(Counter(c["family"] for c in cases)) == set(fuzz.MODELS)
    targets = Counter(c["target"].split("/")[-1] for c in cases)
    for t in ("config.json", "model.safetensors", "digits.safetensors", "sent.jsonl", "mlp_a.safetensors",
              "cnn_a.safetensors"):
        assert targets[t] > 0, targets
    mutations = " ".join(c["mutation"] for c in cases)
    for word in ("flip_header", "flip_data", "truncate", "header_json", "nonfinite", "semantic", "config",
                 "jsonl", "data:", *fuzz.HOSTILE_KINDS):
        assert word in mutations, word
    codes = Counter(r["code"] for r in records.values())
    assert codes[0] >= 20 and codes[2] >= 20, codes
    assert sum(r["nonfinite_input"] for r in records.values()) >= 5


def test_cases_are_reproducible(tmp_path):
    """The same (number, seed) gives the same command and the same mutated bytes."""
    corpus = fuzz.build_corpus(tmp_path / "corpus")
    for number in (0, 7, 123):
        outs = []
        for run in ("a", "b"):
            case = fuzz.make_case(number, SEED)
            folder = tmp_path / f"{number}{run}"
            folder.mkdir()
            fuzz.prepare(case, corpus, folder)
            fuzz.apply_mutation(case, folder)
            outs.append((case.args, case.mutation, (folder / case.target).read_bytes()))
        assert outs[0] == outs[1]


def test_benchmark_mode_prints_the_summary_table(capsys):
    fuzz.main(["--cases", "3", "--seed", str(SEED), "--jobs", "0", "--quiet"])
    out = capsys.readouterr().out
    for label in ("| cases | 3 |", "exit 0", "exit 2", "tracebacks", "hangs", "silent acceptances of non-finite",
                  "inputs changed"):
        assert label in out, out
