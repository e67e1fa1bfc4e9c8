"""Scale: fusing random Llama-architecture pairs (independent seeds, GQA, bf16) at 125M, 1.1B and a 7B shape,
measured side by side in one run against the I/O floor, `otfuse fuse --align none` and mergekit's `linear`.

For each size it writes two random checkpoints (sharded safetensors + config.json, tensor by tensor, so a
7B pair never sits in memory), then runs each route as its own process and records wall seconds, CPU
seconds (user + sys, from wait4), peak RSS (ru_maxrss: includes the memory-mapped inputs) and peak
anonymous memory (RssAnon sampled every 50 ms: what the process allocated itself). The I/O floor is a
process that reads both inputs and writes one model the same size. mergekit runs in its own virtual
environment (benchmarks/.venv-mergekit, made on first use from PyPI: torch==2.13.0, mergekit==0.1.5).

    .venv/bin/python benchmarks/scale.py --sizes 125m            # one size
    .venv/bin/python benchmarks/scale.py --sizes 125m --recovery  # + hidden-permutation recovery check
    .venv/bin/python benchmarks/scale.py --sizes tiny --no-mergekit --json   # smoke (the test suite)
    .venv/bin/python benchmarks/scale.py --sizes 1.1b --once weights --save   # 3 rounds, the long route once

Every route runs --rounds times (default 3) in interleaved rounds and is reported by its medians; the I/O
floor always runs, and every ratio is to the floor measured in the same run.

The weights route (exact solver) also has an arithmetic floor, measured in the same run: its matrix products
(the GFLOP per solve that `otfuse fuse --dry-run` estimates, workplan.py, times the solves the route's
--verbose lines show it ran) at a GEMM rate measured here (torch.matmul at the size's shapes, with the thread
count the routes get), plus its exact assignments (one per space and solve, of the space's width; head spaces
also one dim map per unit pair) at the lapjvs time per assignment measured here on random costs of those sizes
(squared distances between random bf16 features like the benchmark's weights, as otfuse.alignment.solvers
solves them). The rates are measured once per round, after the round's routes; the floor uses their medians.
The floor counts CPU seconds (all threads) as the routes' CPU s do; its wall seconds are recorded too.

Results go to stdout (a table, or JSON with --json) and, with --save, to benchmarks/scale.json."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
MERGEKIT_VENV = HERE / ".venv-mergekit"

# Llama shapes: hidden, layers, attention heads, key/value heads, FFN width, vocabulary
SHAPES = {
    "tiny": (64, 2, 4, 2, 172, 512),
    "125m": (768, 12, 12, 4, 2048, 32000),
    "1.1b": (2048, 22, 32, 4, 5632, 32000),  # TinyLlama's shape
    "7b": (4096, 32, 32, 8, 11008, 32000),  # Llama-2-7B's shape with 8 KV heads
}
SHARD_BYTES = 2 * 10**9


def llama_tensors(shape) -> list[tuple[str, tuple[int, ...]]]:
    hidden, layers, heads, kv, ffn, vocab = shape
    d = hidden // heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (heads * d, hidden)), (p + "self_attn.k_proj.weight", (kv * d, hidden)),
                (p + "self_attn.v_proj.weight", (kv * d, hidden)), (p + "self_attn.o_proj.weight", (hidden, heads * d)),
                (p + "mlp.gate_proj.weight", (ffn, hidden)), (p + "mlp.up_proj.weight", (ffn, hidden)),
                (p + "mlp.down_proj.weight", (hidden, ffn)),
                (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def write_random_llama(folder: Path, shape, seed: int, dtype=torch.bfloat16) -> Path:
    """A random LlamaForCausalLM folder, written shard by shard (never the whole model in memory)."""
    from transformers import LlamaConfig

    hidden, layers, heads, kv, ffn, vocab = shape
    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=ffn, vocab_size=vocab, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
                torch_dtype=str(dtype).removeprefix("torch.")).save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)

    def tensors():
        for name, dims in llama_tensors(shape):
            if len(dims) == 1:  # RMSNorm gains near 1, so they matter to the cost without dominating it
                yield name, (1 + 0.1 * torch.randn(dims, generator=gen)).to(dtype)
            else:
                yield name, (torch.randn(dims, generator=gen) * 0.02).to(dtype)

    save_sharded(tensors(), folder)
    return folder


def save_sharded(items, folder: Path) -> None:
    """(name, tensor) items as SHARD_BYTES shards + index, each shard written and dropped as soon as it is full
    (never the whole model in memory)."""
    shards, shard, size = [], {}, 0

    def flush():  # keeps only the names and sizes
        nonlocal shard, size
        shards.append({k: t.numel() * t.element_size() for k, t in shard.items()})
        save_file(shard, folder / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
        shard, size = {}, 0

    for name, x in items:
        shard[name] = x.contiguous()
        size += x.numel() * x.element_size()
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    weight_map = {}
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"part-{i}.safetensors").rename(folder / name)
        weight_map.update({k: name for k in tensors})
    total = sum(nbytes for s in shards for nbytes in s.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# ---------------------------------------------------------------- measuring one process

def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd; wall and CPU seconds, peak RSS (GiB) and peak anonymous memory of its process tree (GiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_anon, done = 0, threading.Event()

    def sample():
        nonlocal peak_anon
        while not done.is_set():
            peak_anon = max(peak_anon, sum(_anon_kb(p) for p in _tree(proc.pid)))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{output[-3000:]}")
    wall = time.perf_counter() - start
    record = {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gib": usage.ru_maxrss / 2**20,
              "peak_anon_gib": peak_anon / 2**20}
    profile = phase_profile(output, wall)
    if profile:
        record["phases_s"] = profile
    if solves := solves_run(output):
        record["solves"] = solves
    if (threads := route_threads(output)) is not None:
        record["threads"] = threads
    return record


THREADS = re.compile(r"^\s+threads: (?P<n>\d+|as OpenMP chooses)", re.M)


def route_threads(output: str) -> int | None:
    """The compute threads a --verbose otfuse reported: its count, or where it left OpenMP to choose (the
    environment sets OMP_NUM_THREADS) the count torch took from the same environment in this process."""
    m = THREADS.search(output)
    if m is None:
        return None
    return int(m["n"]) if m["n"].isdigit() else torch.get_num_threads()


STEP = re.compile(r"^\s+(?P<task>[a-z ]+): (?P<detail>\S+).*\s(?P<seconds>[0-9.]+) s$")


def phase_profile(output: str, wall: float) -> dict[str, float]:
    """Wall seconds per phase from `otfuse --verbose` step lines ("  aligning: 3.ffn (...)  12.3 s"): alignment
    by task and space kind (residual, heads, ffn), merging (which includes writing, one stream), and the rest
    (start-up, headers, input hashes, the output's load-back); in parentheses, the alignment's seconds again,
    split by step (features and cross terms, costs, solver)."""
    phases: dict[str, float] = {}
    for line in output.splitlines():
        if line.startswith("  alignment: "):  # the same seconds split by step: features, costs, solver
            for part in line.removeprefix("  alignment: ").split(", "):
                step, seconds = part.rsplit(" ", 2)[:2]
                phases[f"(alignment: {step})"] = float(seconds)
            continue
        m = STEP.match(line)
        if m is None or m["detail"] == "model":  # "refining: model 1 converged": a marker, not a step
            continue
        kind = "" if m["task"] == "merging" else " " + m["detail"].rsplit(".", 1)[-1]
        key = f"{m['task']}{kind}"
        phases[key] = phases.get(key, 0.0) + float(m["seconds"])
    if phases:
        phases["other (start-up, headers, hashes, load-back)"] = wall - sum(
            v for k, v in phases.items() if not k.startswith("("))
    return phases


def solves_run(output: str) -> dict[str, int]:
    """How many times each space was solved: its `aligning:` and `refining:` lines under --verbose."""
    counts: dict[str, int] = {}
    for line in output.splitlines():
        m = STEP.match(line)
        if m and m["task"] in ("aligning", "refining") and m["detail"] != "model":
            counts[m["detail"]] = counts.get(m["detail"], 0) + 1
    return counts


IO_FLOOR = """
import sys
from pathlib import Path
import torch
from safetensors import safe_open
from safetensors.torch import save_file
a, b, out = map(Path, sys.argv[1:4])
out.mkdir()
for shard in sorted(a.glob('*.safetensors')):
    tensors = {}
    with safe_open(shard, 'pt') as fa, safe_open(b / shard.name, 'pt') as fb:
        for name in fa.keys():
            x, y = fa.get_tensor(name), fb.get_tensor(name)  # memory-mapped: nothing read yet
            y.view(-1).view(torch.uint8)[::4096].sum()  # every page of y read (x is read by the writer)
            tensors[name] = x
    save_file(tensors, out / shard.name)
"""


def ensure_mergekit() -> Path:
    python = MERGEKIT_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "mergekit==0.1.5"], check=True)
    return MERGEKIT_VENV / "bin" / "mergekit-yaml"


def routes(a: Path, b: Path, work: Path, mergekit: bool, otfuse_args: list[str]) -> dict[str, list[str]]:
    otfuse = [sys.executable, "-m", "otfuse_cli", "fuse", str(a), str(b)]
    weights = f"otfuse fuse (weights, {' '.join(otfuse_args) or 'exact'})"
    out = {FLOOR: [sys.executable, "-c", IO_FLOOR, str(a), str(b), str(work / "io")],
           "otfuse fuse --align none": otfuse + ["--align", "none", "-o", str(work / "avg")],
           weights: [*otfuse[:3], "--verbose", *otfuse[3:], *otfuse_args, "-o", str(work / "ot")]}  # phase times
    if mergekit:
        config = work / "mergekit.yml"
        config.write_text(f"merge_method: linear\ndtype: bfloat16\nmodels:\n  - model: {a}\n    parameters:\n"
                          f"      weight: 0.5\n  - model: {b}\n    parameters:\n      weight: 0.5\n")
        out["mergekit linear"] = [str(ensure_mergekit()), str(config), str(work / "mergekit"), "--lazy-unpickle"]
    return out


FLOOR = "I/O floor (read both, write one)"


def run_size(size: str, root: Path, mergekit: bool, otfuse_args: list[str], only: list[str] | None = None,
             rounds: int = 3, once: list[str] | None = None) -> dict:
    """Every selected route (and always the I/O floor) measured `rounds` times, in rounds that each run every
    route once, in rotated order; routes named by `once` run in the first round only (the long ones). A route's
    figures are its medians, and its ratio is to the floor's median in this same run."""
    shape = SHAPES[size]
    a, b = root / size / "a", root / size / "b"
    t = time.perf_counter()
    for folder, seed in ((a, 0), (b, 1)):
        if not (folder / "model.safetensors.index.json").exists():
            write_random_llama(folder, shape, seed)
    record = {"size": size, "shape": dict(zip(("hidden", "layers", "heads", "kv_heads", "ffn", "vocab"), shape)),
              "model_gib": folder_bytes(a) / 2**30, "build_s": time.perf_counter() - t, "rounds": rounds,
              "routes": {}}
    chosen = {name: cmd for name, cmd in routes(a, b, root / size, mergekit, otfuse_args).items()
              if name == FLOOR or not only or any(word in name for word in only)}
    weights = next((name for name in chosen if name.startswith("otfuse fuse (weights")), None)
    estimates = work_estimates(a, b, root / size, otfuse_args) if weights and exact_weights(otfuse_args) else None
    rates = []
    samples: dict[str, list[dict]] = {name: [] for name in chosen}
    names = list(chosen)
    outputs = {root / size / o for o in ("io", "avg", "ot", "mergekit")}  # what the routes write (routes())
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if r and once and any(word in name for word in once):
                continue
            for made in outputs.intersection(map(Path, chosen[name])):  # this route's own output, from its last run
                shutil.rmtree(made, ignore_errors=True)  # absent before its first run
            samples[name].append(measure(chosen[name], env={**os.environ, "PYTHONPATH": str(HERE.parent)}))
            print(f"  {size} {name} (round {r + 1}): {samples[name][-1]}", file=sys.stderr, flush=True)
        if estimates:  # the arithmetic floor's rates, once per round, beside the routes
            rates.append(measure_rates(shape, estimates, seed=r, **TINY_RATES if size == "tiny" else {}))
            print(f"  {size} arithmetic floor rates (round {r + 1}): {rates[-1]}", file=sys.stderr, flush=True)
    for name, runs in samples.items():
        median = {key: statistics.median(run[key] for run in runs)
                  for key in ("wall_s", "cpu_s", "peak_rss_gib", "peak_anon_gib")}
        record["routes"][name] = {**median, "runs": runs}
    floor = record["routes"][FLOOR]
    for r in record["routes"].values():
        r["cpu_vs_floor"] = r["cpu_s"] / floor["cpu_s"]
        r["rss_vs_model"] = r["peak_rss_gib"] / record["model_gib"]
    if estimates and samples[weights]:
        route = record["routes"][weights]
        solves = route["runs"][0].get("solves", {})
        if any(run.get("solves", {}) != solves for run in route["runs"]):
            raise SystemExit(f"the weights route solved different spaces in different runs: {route['runs']}")
        if route["runs"][0].get("threads", estimates["threads"]) != estimates["threads"]:
            raise SystemExit("the weights route ran with another thread count than --dry-run reported")
        route["arith_floor"] = arithmetic_floor(estimates, solves, rates)
        route["cpu_vs_arith_floor"] = route["cpu_s"] / route["arith_floor"]["cpu_s"]
        route["wall_vs_arith_floor"] = route["wall_s"] / route["arith_floor"]["wall_s"]
    return record


# ---------------------------------------------------------------- the weights route's arithmetic floor

def work_estimates(a: Path, b: Path, work: Path, otfuse_args: list[str]) -> dict:
    """What `otfuse fuse A B --dry-run --json` prints (workplan.plan_of_work, from the headers alone), run in
    this process through the command line (typer's CliRunner, as the tests do), and the thread count that
    command gave torch here: the count every route gets."""
    from typer.testing import CliRunner

    from otfuse_cli.cli import app

    result = CliRunner().invoke(app, ["fuse", str(a), str(b), "-o", str(work / "dry-run"), "--dry-run", "--json",
                                      *otfuse_args])
    if result.exit_code != 0:
        raise SystemExit(f"otfuse fuse --dry-run failed ({result.exit_code}):\n{result.output[-3000:]}")
    return {**json.loads(result.stdout), "threads": torch.get_num_threads()}


def exact_weights(otfuse_args: list[str]) -> bool:
    """Whether the weights route solves exactly (the floor counts assignments; Sinkhorn has none)."""
    return "sinkhorn" not in otfuse_args


def gemm_shapes(shape) -> dict[str, tuple[int, int, int, str]]:
    """The matrix product one solve of each kind of space is made of, (rows, inner, columns, dtype), as
    alignment/cost.py computes it: an FFN space folds gate, up and down one at a time, each an
    (ffn, hidden) x (hidden, ffn) float32 product; the residual stream folds every tensor as (hidden, k) x
    (k, hidden), mostly k = ffn (the MLP's three tensors); head channels are float64 grams, the query
    projection's (hidden, hidden) x (hidden, hidden)."""
    hidden, _, _, _, ffn, _ = shape
    return {"ffn": (ffn, hidden, ffn, "float32"), "residual": (hidden, ffn, hidden, "float32"),
            "heads": (hidden, hidden, hidden, "float64")}


TINY_RATES = {"min_cpu": 0.05, "most": 5}  # the smoke test's size: the floor's arithmetic, not its rates
FEATURE_CAP = 8192  # feature columns of the random costs lapjvs is timed on (the residual stream has 10^5-10^6)


def assignment_sizes(estimates: dict) -> dict[int, int]:
    """{assignment size: feature columns of its random costs}: every space's width and every head dim."""
    sizes: dict[int, int] = {}
    for sp in estimates["spaces"]:
        n, m = sp["width"]
        if n != m:
            raise SystemExit(f"space {sp['space']} is {n} x {m}: the floor counts square assignments only")
        sizes.setdefault(n, min(FEATURE_CAP, max(1, sp["plain_features"] or sp["head_features"])))
        if sp["head_dim"]:
            sizes.setdefault(sp["head_dim"], min(FEATURE_CAP, max(1, sp["head_features"])))
    return sizes


def assignments_run(estimates: dict, solves: dict[str, int]) -> dict[int, int]:
    """{size: count} of the exact assignments the route solved: per solve of a space, one of its width, and in a
    head space one head-dim map per unit pair (at least: the value/output channel's; RoPE fixes the
    query/key dims, and a reordered query group adds more)."""
    counts: dict[int, int] = {}
    for sp in estimates["spaces"]:
        k = solves.get(sp["space"], 0)
        n, m = sp["width"]
        counts[n] = counts.get(n, 0) + k
        if sp["head_dim"]:
            counts[sp["head_dim"]] = counts.get(sp["head_dim"], 0) + k * n * m
    return {size: c for size, c in counts.items() if c}


def time_gemm(rows: int, inner: int, cols: int, dtype: str, seed: int, min_cpu: float = 0.5) -> dict:
    """torch.matmul's rate at one shape (after one untimed product): GFLOP per CPU second and per wall second."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inner, generator=gen, dtype=getattr(torch, dtype))
    y = torch.randn(inner, cols, generator=gen, dtype=getattr(torch, dtype))
    torch.matmul(x, y)
    reps, cpu, wall = 0, 0.0, 0.0
    while reps < 2 or cpu < min_cpu:
        c, w = time.process_time(), time.perf_counter()
        torch.matmul(x, y)
        cpu, wall, reps = cpu + time.process_time() - c, wall + time.perf_counter() - w, reps + 1
    gflop = 2 * rows * inner * cols * reps / 1e9
    return {"gflop_per_cpu_s": gflop / cpu, "gflop_per_wall_s": gflop / wall, "reps": reps}


def time_assignment(n: int, features: int, seed: int, min_cpu: float = 0.2, most: int = 50) -> dict:
    """CPU and wall seconds per exact assignment (otfuse's solvers.assignment: lapjvs, float32 kernel) of n x n
    random costs made as the route makes them from the benchmark's random weights: squared distances between
    two sets of n random bf16 feature vectors (0.02 N(0, 1), as write_random_llama), scaled by their mean."""
    from otfuse_cli.alignment.metrics import METRICS
    from otfuse_cli.alignment.solvers import assignment, normalize

    gen = torch.Generator().manual_seed(seed)
    reps, cpu, wall = 0, 0.0, 0.0
    while reps < 1 or (cpu < min_cpu and reps < most):
        x, y = ((torch.randn(n, features, generator=gen) * 0.02).bfloat16().float() for _ in range(2))
        dot = (x @ y.T).double()
        cost = normalize(METRICS["sqeuclidean"](dot, (x.double() ** 2).sum(1), (y.double() ** 2).sum(1)).numpy(),
                         "mean")
        c, w = time.process_time(), time.perf_counter()
        assignment(cost)
        cpu, wall, reps = cpu + time.process_time() - c, wall + time.perf_counter() - w, reps + 1
    return {"cpu_s": cpu / reps, "wall_s": wall / reps, "reps": reps}


def measure_rates(shape, estimates: dict, seed: int, min_cpu: float = 0.5, most: int = 50) -> dict:
    """One round's GEMM rates (per kind of space) and lapjvs times (per size), with the routes' thread count;
    each rate from at least min_cpu CPU seconds of products (and of assignments, up to `most` of them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(estimates["threads"])
    try:
        kinds = {sp["kind"] for sp in estimates["spaces"]}
        gemm = {kind: {"shape": list(dims[:3]), "dtype": dims[3], **time_gemm(*dims, seed=seed, min_cpu=min_cpu)}
                for kind, dims in gemm_shapes(shape).items() if kind in kinds}
        lap = {str(n): {"features": k, **time_assignment(n, k, seed, min_cpu=min_cpu / 2.5, most=most)}
               for n, k in assignment_sizes(estimates).items()}
    finally:
        torch.set_num_threads(before)
    return {"gemm": gemm, "assignment": lap}


def arithmetic_floor(estimates: dict, solves: dict[str, int], rates: list[dict]) -> dict:
    """The weights route's arithmetic floor: its products (each space's estimated GFLOP per solve x the solves
    it ran) at the median GEMM rate of their kind, plus its assignments at the median lapjvs time of their
    size; in CPU seconds and in wall seconds."""
    gemm: dict[str, dict] = {}
    for sp in estimates["spaces"]:
        g = gemm.setdefault(sp["kind"], {"gflop": 0.0})
        g["gflop"] += sp["cost_gflops"] * solves.get(sp["space"], 0)
    for kind, g in gemm.items():
        for unit in ("cpu", "wall"):
            g[f"gflop_per_{unit}_s"] = statistics.median(r["gemm"][kind][f"gflop_per_{unit}_s"] for r in rates)
            g[f"{unit}_s"] = g["gflop"] / g[f"gflop_per_{unit}_s"]
    lap = {}
    for size, count in assignments_run(estimates, solves).items():
        each = {unit: statistics.median(r["assignment"][str(size)][f"{unit}_s"] for r in rates)
                for unit in ("cpu", "wall")}
        lap[str(size)] = {"count": count, "cpu_s_each": each["cpu"], "wall_s_each": each["wall"],
                          "cpu_s": count * each["cpu"], "wall_s": count * each["wall"]}
    total = {f"{unit}_s": sum(g[f"{unit}_s"] for g in gemm.values()) + sum(a[f"{unit}_s"] for a in lap.values())
             for unit in ("cpu", "wall")}
    gflop = sum(g["gflop"] for g in gemm.values())
    return {**total, "gemm_gflop": gflop, "gemm": gemm, "assignments": lap, "threads": estimates["threads"],
            "solves": solves, "estimated_most_solves_per_space": estimates["most_solves_per_space"],
            "spaces": [{k: sp[k] for k in ("space", "kind", "width", "head_dim", "cost_gflops")}
                       for sp in estimates["spaces"]],
            "rates": rates}


# ---------------------------------------------------------------- exactness at scale

def recovery(size: str, root: Path, otfuse_args: list[str]) -> dict:
    """Fuse a float32 random model with a hidden, independently permuted copy of itself (+1% noise): the fused
    model's logits must match the plain average of the model and its unpermuted noisy copy. Held at once: the
    noisy copy and its permutation (2 x the model in float32); the model itself stays memory-mapped."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from oracle_permute import permute_llama
    from safetensors import safe_open
    from transformers import AutoConfig, LlamaForCausalLM

    import otfuse_cli as otf

    work = root / size / "recovery"
    shutil.rmtree(work, ignore_errors=True)
    a = write_random_llama(work / "a", SHAPES[size], seed=0, dtype=torch.float32)
    config = AutoConfig.from_pretrained(a)
    sd = {k: f.get_tensor(k) for shard in sorted(a.glob("*.safetensors"))
          for f in [safe_open(str(shard), "pt")] for k in f.keys()}
    gen = torch.Generator().manual_seed(1)
    noisy = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=gen) for k, v in sd.items()}
    (work / "b").mkdir()
    shutil.copy(a / "config.json", work / "b" / "config.json")
    permuted = permute_llama(noisy, config, torch.Generator().manual_seed(2))
    save_sharded(((k, permuted.pop(k)) for k in list(permuted)), work / "b")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "otfuse_cli", "fuse", str(a), str(work / "b"), "-o", str(work / "fused"),
                    *otfuse_args], check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    seconds = time.perf_counter() - t
    ids = torch.randint(0, config.vocab_size, (2, 32), generator=gen)
    with torch.no_grad():
        average = {k: (sd[k] + noisy.pop(k)) / 2 for k in list(sd)}
        plain = LlamaForCausalLM(config)  # rotary buffers are built, not loaded: the model is made, then filled
        plain.load_state_dict(average)
        del average
        ref = plain.eval()(ids).logits
        del plain
    otf.fuse([str(a), str(work / "b")], str(work / "vanilla"), options=otf.AlignOptions(align="none"))
    errors = {}
    with torch.no_grad():
        for name in ("fused", "vanilla"):  # vanilla: shows the permutation was really hidden
            out = LlamaForCausalLM.from_pretrained(work / name, dtype=torch.float32).eval()(ids).logits
            errors[name] = float((out - ref).norm() / ref.norm())
    shutil.rmtree(work)
    return {"size": size, "options": otfuse_args, "fuse_s": seconds, "relative_logit_error": errors["fused"],
            "vanilla_relative_logit_error": errors["vanilla"]}


def table(records: list[dict]) -> str:
    lines = ["| size (one model) | route | wall s | CPU s | CPU / I/O floor | arithmetic floor CPU s | CPU / arithmetic "
             "floor | peak RSS GiB (/ model) | peak anon GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        for name, m in r["routes"].items():
            arith = (f"{m['arith_floor']['cpu_s']:.3g} | {m['cpu_vs_arith_floor']:.2f}x" if "arith_floor" in m
                     else "– | –")
            lines.append(f"| {r['size']} ({r['model_gib']:.2f} GiB) | {name} | {m['wall_s']:.1f} | {m['cpu_s']:.1f} | "
                         f"{m['cpu_vs_floor']:.1f}x | {arith} | {m['peak_rss_gib']:.2f} ({m['rss_vs_model']:.1f}x) | "
                         f"{m['peak_anon_gib']:.2f} |")
    for r in records:
        for name, m in r["routes"].items():
            if "arith_floor" in m:
                lines.append(floor_line(r["size"], m["arith_floor"]))
    return "\n".join(lines)


def floor_line(size: str, f: dict) -> str:
    """The arithmetic floor in words: its products and assignments, and the rates measured in this run."""
    gemm = ", ".join(f"{kind} {g['gflop']:,.0f} GFLOP at {g['gflop_per_cpu_s']:.0f} GFLOP/CPU-s ({g['cpu_s']:.3g} s)"
                     for kind, g in f["gemm"].items())
    lap = ", ".join(f"{a['count']} x n = {n} at {a['cpu_s_each'] * 1e3:.3g} ms ({a['cpu_s']:.3g} s)"
                    for n, a in sorted(f["assignments"].items(), key=lambda kv: -int(kv[0])))
    return (f"\narithmetic floor, {size} weights route ({f['threads']} threads): {f['cpu_s']:.3g} CPU-s "
            f"({f['wall_s']:.3g} s wall) = products [{gemm}] + assignments [{lap}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["125m", "1.1b"], choices=list(SHAPES))
    ap.add_argument("--work", type=Path, default=None, help="where the random pairs go (default: a temp dir)")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--recovery", action="store_true", help="also check hidden-permutation recovery per size")
    ap.add_argument("--recovery-only", action="store_true", help="only the recovery check, no routes")
    ap.add_argument("--only", nargs="+", default=None, metavar="WORDS",
                    help="run only the routes whose names contain one of these words (e.g. none, weights); the "
                         "I/O floor always runs, since every ratio is to the floor of the same run")
    ap.add_argument("--rounds", type=int, default=3, help="measure each route this many times (medians)")
    ap.add_argument("--once", nargs="+", default=None, metavar="WORDS",
                    help="routes (by words of their names) measured in the first round only, e.g. weights")
    ap.add_argument("--otfuse-args", default="", help="extra options for the weights route, e.g. '--refine 1'")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", action="store_true", help="write benchmarks/scale.json")
    args = ap.parse_args()
    root = args.work or Path(tempfile.mkdtemp(prefix="otfuse-scale-"))
    records = [] if args.recovery_only else \
        [run_size(s, root, not args.no_mergekit, args.otfuse_args.split(), args.only, args.rounds, args.once)
         for s in args.sizes]
    checks = [recovery(s, root, args.otfuse_args.split()) for s in args.sizes] \
        if args.recovery or args.recovery_only else []
    doc = {"command": " ".join(["benchmarks/scale.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"),
           "sizes": records, "recovery": checks, "otfuse_args": args.otfuse_args, "cpus": os.cpu_count()}
    if args.save:  # one more run in benchmarks/scale.json (README and RESULTS quote runs by their command)
        path = HERE / "scale.json"
        saved = json.loads(path.read_text()) if path.exists() else {"runs": []}
        saved["runs"].append(doc)
        path.write_text(json.dumps(saved, indent=1) + "\n")
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(table(records))
        for c in checks:
            print(f"recovery {c['size']}: relative logit error {c['relative_logit_error']:.2e} against the plain "
                  f"average ({c['fuse_s']:.0f} s; vanilla fusion: {c['vanilla_relative_logit_error']:.2e})")
    if args.work is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
