"""GPU check: every route that takes `--device` today, run on the device and on the CPU, its plans and fused
tensors compared; the 1.1B weights route timed against the CPU's arithmetic floor. One script, about 5 minutes
on one GPU.

    .venv/bin/python benchmarks/gpu_check.py --save            # cuda (if torch sees one), else the smoke mode
    .venv/bin/python benchmarks/gpu_check.py --smoke --json    # cpu against cpu, small pairs (the test suite)
    .venv/bin/python benchmarks/gpu_check.py --device cpu --full   # the full run's path, cpu against cpu

Routes, each run through the real command line (in-process, typer's CliRunner) once with `--device cpu` and
once with `--device DEVICE`:
- activation alignment: `otfuse align A B --align activations --data CALIB -o plans.safetensors` (plans) and
  `otfuse fuse A B --align activations --data CALIB -o fused` (fused tensors);
- RegMean (`--merge regmean`, Grams from forward passes on --data): fused tensors;
- REPAIR (`--repair`, MLPs and CNNs): fused tensors;
- the weights route (`--align weights`, exact and `--solver sinkhorn`): features, cross terms, costs and
  Sinkhorn run on `--device`, the exact assignments on the CPU; its fused tensors are compared like the others
  (a version that refuses `--device` for it is recorded as "runs on CPU (refused with --device)").
A route refused on both devices (e.g. a merge rule a family lacks) is recorded as refused, not compared.

Pairs: the bundled ones (fixtures/: digit MLPs, digit CNNs, the BERT sentiment pair) and a 125M Llama pair
(random, independent seeds, written with benchmarks/scale.py's helpers, the BERT fixture's tokenizer, data
fixtures/sentiment/calib.jsonl). The smoke mode (`--smoke`, or no GPU) runs the same comparisons with cpu against
cpu on the smallest bundled pair (digit CNNs) and a tiny Llama pair, and times the tiny shape: it proves the
script works, not the device.

Equality, stated: plan files hold the same names, shapes and dtypes; integer tensors (hard plans' index
vectors, inner maps) are identical; floating tensors (soft plans, fused weights) agree to a relative error
max|x - y| / max|y| <= RTOL (1e-4) per tensor. Device float32 sums reduce in another order than the CPU's, so
bit equality is not asked of floating tensors; a plan that differs on a near tie is reported, not forgiven.

Timing (the weights route at 1.1B, or the tiny shape in smoke mode): the route's arithmetic floor on this
machine's CPU (benchmarks/scale.py: its products from `--dry-run`'s estimates at the measured CPU GEMM rate plus
its assignments at the measured lapjvs time; the solves counted from one CPU run in full mode, the dry-run's
first solve only in smoke mode), the device's GEMM rate at the same shapes and what the products take at it,
and the route itself with `--device`: its wall seconds (its error line where a version refuses it) and ratio to
the CPU floor.

Output: a JSON document (stdout with --json; benchmarks/gpu_check.json with --save) and a summary table."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import scale  # noqa: E402  (benchmarks/scale.py: random Llama pairs, GEMM and lapjvs rates, the floor)

FIXTURES = REPO / "fixtures"
RTOL = 1e-4
REFUSED_WEIGHTS = "runs on CPU (refused with --device)"
TINY_LLAMA = (64, 2, 4, 2, 172, 2048)  # scale.py's tiny shape, with room for the BERT tokenizer's 2,000 ids


# ---------------------------------------------------------------- comparing outputs

def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, or of every .safetensors file in a folder (by name)."""
    from safetensors.torch import load_file

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors in {path}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def compare_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = RTOL) -> dict:
    """{equal, tensors, max_rel_error, differing: [names]}: the same names, shapes and dtypes; integer and
    bool tensors identical, floating ones within rtol of the reference's largest magnitude."""
    differing, worst = [], 0.0
    for name in sorted(set(got) | set(want)):
        if name not in got or name not in want:
            differing.append(f"{name} (only in {'the device run' if name in got else 'the cpu run'})")
            continue
        x, y = got[name], want[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            differing.append(f"{name} ({tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype})")
            continue
        if not (x.is_floating_point() or x.is_complex()):
            if not torch.equal(x, y):
                differing.append(f"{name} ({int((x != y).sum())} of {x.numel()} entries differ)")
            continue
        x, y = x.double(), y.double()
        if not torch.equal(torch.isfinite(x), torch.isfinite(y)) or not torch.equal(x[~torch.isfinite(x)],
                                                                                      y[~torch.isfinite(y)]):
            differing.append(f"{name} (non-finite entries differ)")
            continue
        fin = torch.isfinite(y)
        scale_ = float(y[fin].abs().max()) if fin.any() else 0.0
        err = float((x[fin] - y[fin]).abs().max()) if fin.any() else 0.0
        rel = err / scale_ if scale_ > 0 else (0.0 if err == 0 else float("inf"))
        worst = max(worst, rel)
        if rel > rtol:
            differing.append(f"{name} (relative error {rel:.2e})")
    return {"equal": not differing, "tensors": len(set(got) | set(want)), "max_rel_error": worst,
            "differing": differing[:20], "rtol": rtol}


# ---------------------------------------------------------------- running the command line in-process

def otfuse(args: list) -> tuple[int, str]:
    """Run `otfuse ARGS` in this process (as the test suite does): (exit code, its output)."""
    from typer.testing import CliRunner

    from otfuse_cli.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    return lines[-1] if lines else output.strip().splitlines()[-1] if output.strip() else ""


# ---------------------------------------------------------------- pairs and routes

def pairs(smoke: bool, work: Path) -> list[dict]:
    """The pairs checked: name, the two models, calibration data and sampling options, what they support."""
    digits = FIXTURES / "digits"
    cnn = {"pair": "digits CNN (bundled)", "models": [digits / "cnn_a.safetensors", digits / "cnn_b.safetensors"],
           "data": ["--data", digits / "calib.safetensors", "--samples", 64], "out": "file", "repair": True}
    if smoke:
        return [cnn, llama_pair("tiny Llama (random)", TINY_LLAMA, work / "llama-tiny")]
    mlp = {"pair": "digits MLP (bundled)", "models": [digits / "mlp_a.safetensors", digits / "mlp_b.safetensors"],
           "data": ["--data", digits / "calib.safetensors", "--samples", 256], "out": "file", "repair": True}
    bert = {"pair": "BERT sentiment (bundled)",
            "models": [FIXTURES / "sentiment" / "bert_a", FIXTURES / "sentiment" / "bert_b"],
            "data": ["--data", FIXTURES / "sentiment" / "calib.jsonl", "--samples", 128], "out": "folder",
            "repair": False}
    return [mlp, cnn, bert, llama_pair("125M Llama (random)", scale.SHAPES["125m"], work / "llama-125m")]


def llama_pair(name: str, shape, folder: Path) -> dict:
    """Two random Llamas (scale.write_random_llama, seeds 0 and 1) with the BERT fixture's tokenizer, so they
    read real sentences offline."""
    models = []
    for seed in (0, 1):
        m = folder / "ab"[seed]
        if not (m / "model.safetensors.index.json").exists():
            scale.write_random_llama(m, shape, seed)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(FIXTURES / "sentiment" / "bert_a" / f, m / f)
        models.append(m)
    return {"pair": name, "models": models, "out": "folder", "repair": False,
            "data": ["--data", FIXTURES / "sentiment" / "calib.jsonl", "--samples", 32, "--max-length", 32],
            "activations": ["--max-tokens", 512]}


def routes(pair: dict) -> list[tuple[str, str, list, str]]:
    """(route, command, options, what it writes: plans or fused) for one pair; the data options follow."""
    activations = ["--align", "activations", *pair["data"], *pair.get("activations", [])]
    out = [("activation alignment", "align", activations, "plans"),
           ("activation alignment", "fuse", activations, "fused"),
           ("RegMean merge", "fuse", ["--align", "none", "--merge", "regmean", *pair["data"]], "fused")]
    if pair["repair"]:
        out.append(("REPAIR", "fuse", ["--align", "weights", "--repair", *pair["data"]], "fused"))
    return out


def output_path(work: Path, pair: dict, what: str) -> Path:
    return work / ("plans.safetensors" if what == "plans" else
                  "fused.safetensors" if pair["out"] == "file" else "fused")


def run_route(pair: dict, command: str, options: list, what: str, device: str | None, work: Path) -> dict:
    """One run: its exit code, error line, seconds and output path (removed first if it exists)."""
    work.mkdir(parents=True, exist_ok=True)
    out = output_path(work, pair, what)
    shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    t = time.perf_counter()
    code, output = otfuse([command, *pair["models"], "-o", out, *options,
                           *(["--device", device] if device else [])])
    return {"exit": code, "seconds": time.perf_counter() - t, "error": error_line(output) if code else "",
            "out": out}


def check_route(pair: dict, route: str, command: str, options: list, what: str, device: str, work: Path) -> dict:
    """The route on cpu and on the device, its outputs compared."""
    ref = run_route(pair, command, options, what, "cpu", work / "cpu")
    dev = run_route(pair, command, options, what, device, work / "device")
    record = {"pair": pair["pair"], "route": route, "command": command, "compares": what, "device": device,
              "cpu_s": ref["seconds"], "device_s": dev["seconds"]}
    if ref["exit"] and dev["exit"]:
        return {**record, "status": "refused on both", "message": ref["error"]}
    if ref["exit"] or dev["exit"]:
        bad = ref if ref["exit"] else dev
        return {**record, "status": f"failed on {'cpu' if bad is ref else device}", "equal": False,
                "message": bad["error"]}
    return {**record, "status": "compared", **compare_tensors(read_tensors(dev["out"]), read_tensors(ref["out"]))}


def check_weights(pair: dict, device: str, work: Path, solver: str = "exact") -> dict:
    """The weights route with --device, compared with the run without it (recorded as refused where a
    version refuses --device for it)."""
    options = ["--align", "weights", "--solver", solver]
    dev = run_route(pair, "fuse", options, "fused", device, work / "device")
    record = {"pair": pair["pair"], "route": "weights" if solver == "exact" else f"weights, {solver}",
              "command": "fuse", "compares": "fused", "device": device, "device_s": dev["seconds"]}
    if dev["exit"]:
        return {**record, "status": REFUSED_WEIGHTS, "message": dev["error"]}
    ref = run_route(pair, "fuse", options, "fused", "cpu", work / "cpu")
    if ref["exit"]:
        return {**record, "status": "failed on cpu", "equal": False, "message": ref["error"]}
    return {**record, "status": "compared", "cpu_s": ref["seconds"],
            **compare_tensors(read_tensors(dev["out"]), read_tensors(ref["out"]))}


# ---------------------------------------------------------------- timing the weights route

def device_gemm_rates(shape, kinds: set[str], device: str, min_s: float = 0.2) -> dict:
    """torch.matmul's GFLOP/s on the device at scale.py's shapes (wall seconds, synchronised)."""
    out = {}
    for kind, (rows, inner, cols, dtype) in scale.gemm_shapes(shape).items():
        if kind not in kinds:
            continue
        x = torch.randn(rows, inner, dtype=getattr(torch, dtype), device=device)
        y = torch.randn(inner, cols, dtype=getattr(torch, dtype), device=device)
        torch.matmul(x, y)
        sync(device)
        reps, t = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t < min_s:
            torch.matmul(x, y)
            reps += 1
            sync(device)
        out[kind] = {"shape": [rows, inner, cols], "dtype": dtype,
                     "gflop_per_wall_s": 2 * rows * inner * cols * reps / 1e9 / (time.perf_counter() - t)}
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


SOLVES = 2  # solves per space of the exact weights route at 1.1B: aligning + one refining sweep, which converges
# (benchmarks/scale.json: every 1.1B run; the tiny pair too)


def time_weights_route(size: str, shape, device: str, work: Path, run_cpu: bool) -> dict:
    """The weights route at one size: its CPU arithmetic floor (scale.py), the device's GEMM rate at the same
    shapes, and the route with --device. run_cpu: also run the route on the CPU once (minutes at
    1.1B), which counts the solves it runs; else the floor counts SOLVES per space."""
    a, b = work / "a", work / "b"
    t = time.perf_counter()
    for folder, seed in ((a, 0), (b, 1)):
        if not (folder / "model.safetensors.index.json").exists():
            scale.write_random_llama(folder, shape, seed)
    record = {"size": size, "build_s": time.perf_counter() - t}
    estimates = scale.work_estimates(a, b, work, [])  # in this process, with the threads its routes get
    rates = [scale.measure_rates(shape, estimates, seed=0, **scale.TINY_RATES if size == "tiny" else {})]
    solves = {sp["space"]: SOLVES for sp in estimates["spaces"]}
    if run_cpu:
        cpu = scale.measure([sys.executable, "-m", "otfuse_cli", "--verbose", "fuse", str(a), str(b), "--align",
                             "weights", "-o", str(work / "cpu")],
                            env={**os.environ, "PYTHONPATH": str(REPO)})
        solves = cpu.get("solves", solves)
        record["cpu_route"] = {k: cpu[k] for k in ("wall_s", "cpu_s")}
    floor = scale.arithmetic_floor(estimates, solves, rates)
    record["cpu_floor"] = {k: floor[k] for k in ("cpu_s", "wall_s", "gemm_gflop", "threads", "solves")}
    record["cpu_floor"]["solves_from"] = "a CPU run" if run_cpu else f"{SOLVES} per space (as measured at 1.1B)"
    record["cpu_floor"]["gemm_gflop_per_cpu_s"] = {k: g["gflop_per_cpu_s"] for k, g in floor["gemm"].items()}
    record["cpu_floor"]["lapjvs_s_each"] = {n: x["cpu_s_each"] for n, x in floor["assignments"].items()}
    if "cpu_route" in record:
        record["cpu_route"]["cpu_vs_arith_floor"] = record["cpu_route"]["cpu_s"] / floor["cpu_s"]
    gemm = device_gemm_rates(shape, {sp["kind"] for sp in estimates["spaces"]}, device)
    products = sum(floor["gemm"][k]["gflop"] / g["gflop_per_wall_s"] for k, g in gemm.items())
    record["device_gemm"] = {"rates": gemm, "products_wall_s": products,
                             "products_at_cpu_rate_wall_s": sum(g["wall_s"] for g in floor["gemm"].values())}
    dev = measure_device_route(a, b, device, work / "device")
    record["device_route"] = dev
    if "wall_s" in dev:
        dev["vs_cpu_floor_wall"] = dev["wall_s"] / floor["wall_s"]
    return record


def measure_device_route(a: Path, b: Path, device: str, out: Path) -> dict:
    """The weights route with --device, timed (in this process); its error line where it is refused."""
    t = time.perf_counter()
    code, output = otfuse(["fuse", a, b, "--align", "weights", "--device", device, "-o", out])
    if code:
        return {"status": REFUSED_WEIGHTS, "message": error_line(output)}
    return {"status": "ran", "wall_s": time.perf_counter() - t}


# ---------------------------------------------------------------- the report

def summary(doc: dict) -> str:
    lines = [f"device {doc['device']} against cpu ({'smoke mode' if doc['smoke'] else 'full'}), rtol {RTOL:g}",
             "| pair | route | compares | status | max rel. error | cpu s | device s |", "|---|---|---|---|---|---|---|"]
    for c in doc["checks"] + doc["weights_route"]:
        status = c["status"] if c["status"] != "compared" else ("equal" if c["equal"] else
                                                                 "UNEQUAL: " + "; ".join(c["differing"][:3]))
        err = f"{c['max_rel_error']:.1e}" if "max_rel_error" in c else "–"
        if c["status"] not in ("compared", REFUSED_WEIGHTS) and c.get("message"):
            status += f": {c['message']}"
        seconds = " | ".join(f"{c[k]:.1f}" if k in c else "–" for k in ("cpu_s", "device_s"))
        lines.append(f"| {c['pair']} | {c['route']} ({c['command']}) | {c['compares']} | {status} | {err} | {seconds} |")
    t = doc.get("timing")
    if t:
        f, g = t["cpu_floor"], t["device_gemm"]
        lines.append(f"\nweights route at {t['size']}: CPU arithmetic floor {f['cpu_s']:.3g} CPU-s ({f['wall_s']:.3g} s "
                     f"wall, {f['threads']} threads, solves from {f['solves_from']}); its {f['gemm_gflop']:,.0f} GFLOP "
                     f"of products take {g['products_wall_s']:.3g} s at the device's GEMM rate "
                     f"({g['products_at_cpu_rate_wall_s']:.3g} s at the CPU's)")
        if "cpu_route" in t:
            lines.append(f"  on the CPU: {t['cpu_route']['wall_s']:.1f} s wall, {t['cpu_route']['cpu_s']:.1f} CPU-s "
                         f"({t['cpu_route']['cpu_vs_arith_floor']:.2f}x its floor)")
        d = t["device_route"]
        lines.append(f"  with --device {doc['device']}: " + (f"{d['wall_s']:.1f} s wall ({d['vs_cpu_floor_wall']:.2f}x "
                                                             f"the CPU floor's wall s)" if "wall_s" in d else
                                                             f"{d['status']}: {d['message']}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="the device compared with cpu (default: cuda if torch sees one, else cpu)")
    ap.add_argument("--smoke", action="store_true",
                    help="cpu against cpu on the smallest bundled pair and a tiny Llama pair (also without a GPU)")
    ap.add_argument("--full", action="store_true",
                    help="the full pairs and the 1.1B timing even with --device cpu (tries the GPU run's path here)")
    ap.add_argument("--no-timing", action="store_true", help="skip timing the weights route")
    ap.add_argument("--cpu-run", action="store_true",
                    help="also run the 1.1B weights route on the CPU (minutes; counts its solves)")
    ap.add_argument("--work", type=Path, default=None, help="where pairs and outputs go (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    ap.add_argument("--save", action="store_true", help="write benchmarks/gpu_check.json")
    args = ap.parse_args(argv)
    smoke = args.smoke or (args.device == "cpu" and not args.full)
    device = "cpu" if smoke else args.device
    root = args.work or Path(tempfile.mkdtemp(prefix="otfuse-gpu-check-"))
    t = time.perf_counter()
    checks, weights = [], []
    for pair in pairs(smoke, root):
        slug = "".join(ch if ch.isalnum() else "-" for ch in pair["pair"].lower())
        for i, (route, command, options, what) in enumerate(routes(pair)):
            checks.append(check_route(pair, route, command, options, what, device, root / slug / str(i)))
            print(f"  {checks[-1]['pair']}, {route} ({command}): {checks[-1]['status']}", file=sys.stderr, flush=True)
        for solver in ("exact", "sinkhorn"):
            weights.append(check_weights(pair, device, root / slug / f"weights-{solver}", solver))
    timing = None
    if not args.no_timing:
        size = "tiny" if smoke else "1.1b"
        timing = time_weights_route(size, scale.SHAPES[size], device, root / f"timing-{size}", run_cpu=args.cpu_run)
    doc = {"command": " ".join(["benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
           "date": time.strftime("%Y-%m-%d"), "device": device, "smoke": smoke, "rtol": RTOL,
           "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "checks": checks, "weights_route": weights, "timing": timing,
           "all_equal": all(c.get("equal", True) for c in checks + weights), "seconds": time.perf_counter() - t}
    for c in checks + weights:
        c.pop("out", None)
    if args.save:
        (HERE / "gpu_check.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1) if args.json else summary(doc))
    if args.work is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if doc["all_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
