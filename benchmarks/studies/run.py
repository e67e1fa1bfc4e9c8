"""Run one study from scratch and write its results: results/<study>.json, a Markdown table and a PNG.

    .venv/bin/python benchmarks/studies/run.py languages            # 3 seeds, the full scale
    .venv/bin/python benchmarks/studies/run.py vision --seeds 0 1 2
    .venv/bin/python benchmarks/studies/run.py languages --smoke    # tiny models, one seed (the test suite's)
    .venv/bin/python benchmarks/studies/run.py translation --merge s0.json s1.json s2.json  # seeds run apart

Nothing is downloaded: the data come from --data-dir (default ../shared/data beside the checkout).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import DEFAULT_DATA, bar_plot, table  # noqa: E402

STUDIES = {"languages": "languages", "vision": "vision", "shards": "shards", "federated": "federated",
           "federated_pretrained": "federated_pretrained",
           "translation": "translation", "translation_domains": "translation_domains", "multitask": "multitask",
           "llm_domains": "llm_domains"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=sorted(STUDIES))
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (smoke: 0)")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--results", type=Path, default=HERE / "results", help="where the JSON, table and PNG go")
    ap.add_argument("--smoke", action="store_true", help="tiny models, one seed: checks the pipeline only")
    ap.add_argument("--report-only", action="store_true", help="rebuild the table and plot from the JSON")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                    help="combine results of the same study run separately (e.g. one seed per process)")
    ap.add_argument("--keep", type=Path, default=None, metavar="DIR",
                    help="work in DIR/<study> and keep it: every seed's checkpoints and splits, so new domains can "
                         "be scored without retraining (default: a temporary folder, removed)")
    ap.add_argument("--add-routes", nargs="+", default=None, metavar="ROUTE",
                    help="fuse and score these routes on the checkpoints a --keep run kept, and add their rows to "
                         "its JSON (no retraining; the study must offer add_routes)")
    args = ap.parse_args(argv)
    seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    name = args.study + ("_smoke" if args.smoke else "")
    args.results.mkdir(parents=True, exist_ok=True)
    if args.report_only or args.add_routes:
        result = json.loads((args.results / f"{name}.json").read_text())
        if args.add_routes:
            module = __import__(STUDIES[args.study])
            if not hasattr(module, "add_routes") or "kept" not in result:
                sys.exit("run.py: --add-routes needs a study with add_routes and a result made with --keep")
            start = time.perf_counter()
            module.add_routes(result, args.add_routes)
            result["seconds"] = round(result["seconds"] + time.perf_counter() - start, 1)
            (args.results / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    elif args.merge:
        result = merged([json.loads(p.read_text()) for p in args.merge])
        (args.results / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    else:
        module = __import__(STUDIES[args.study])
        start = time.perf_counter()
        if args.keep:
            work = args.keep / name
            if work.exists() and any(work.iterdir()):
                sys.exit(f"run.py: --keep {args.keep}: {work} is not empty; give an empty or new folder")
            work.mkdir(parents=True, exist_ok=True)
            result = module.run(args.data_dir, work, seeds, smoke=args.smoke)
            result["kept"] = str(work)
        else:
            with tempfile.TemporaryDirectory(prefix=f"otfuse-study-{args.study}-") as tmp:
                result = module.run(args.data_dir, Path(tmp), seeds, smoke=args.smoke)
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["seeds"] = seeds
        (args.results / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    # fractions are shown x100; a study whose values are not fractions (perplexity) says value_scale 1
    md = table(result["runs"], result["columns"], result["rows"], scale=result.get("value_scale", 100.0)) \
        + summary(result)
    module = __import__(STUDIES[args.study])
    report = getattr(module, "report", None)  # a study's own lines below the table
    md += report(result) if report else ""
    (args.results / f"{name}.md").write_text(md)
    if hasattr(module, "plot"):  # a study's own plot
        module.plot(result, args.results / f"{name}.png")
    else:
        bar_plot(result["runs"], result["columns"], result["rows"], args.results / f"{name}.png",
                 f"{args.study}: {result.get('metric', 'accuracy')}, mean ± 95% CI over {len(result['seeds'])} "
                 f"seed(s)", ylabel=f"{result.get('metric', 'accuracy')} (%)" if "metric" in result else "accuracy (%)")
    print(md)
    print(f"{args.study}: {result['seconds']} s, seeds {result['seeds']} → {args.results / name}.{{json,md,png}}")
    return 0


def merged(parts: list[dict]) -> dict:
    """One result from runs of the same study over different seeds: runs, timings and seeds concatenated,
    seconds summed. Runs whose rows, columns or chosen settings differ are not one study: refused."""
    first = parts[0]
    same = ("study", "rows", "columns", "lr", "metric", "ablated_route")
    for part in parts[1:]:
        differ = [k for k in same if part.get(k) != first.get(k)]
        if differ:
            sys.exit(f"run.py: cannot merge: the runs differ in {', '.join(differ)}")
    seeds = [s for p in parts for s in p["seeds"]]
    if len(set(seeds)) < len(seeds):
        sys.exit(f"run.py: cannot merge: a seed appears twice ({seeds})")
    result = {k: v for p in reversed(parts) for k, v in p.items()}  # every field any run has; the first's win
    result.update({"runs": [r for p in parts for r in p["runs"]], "seeds": seeds,
                   "timing": [t for p in parts for t in p.get("timing", [])],
                   "seconds": round(sum(p["seconds"] for p in parts), 1)})
    result["lr_validation"] = next((p["lr_validation"] for p in parts if p.get("lr_validation")), {})
    notes = [p["note"] for p in parts if p.get("note")]
    result["note"] = "; ".join(["merged from runs over seeds " + " | ".join(str(p["seeds"]) for p in parts)
                                + ", the minutes summed", *notes])
    return result


def summary(result: dict) -> str:
    """Below the table: the run's cost, the chosen learning rate, and study 4's plan-change fractions."""
    lines = [f"\nSeeds {result['seeds']}; {result['seconds'] / 60:.1f} min in all on this machine; learning rate "
             f"{result['lr']}" + (f" (validation {'BLEU' if 'metric' in result else 'accuracy'} by rate: "
                                  + ", ".join(f"{k}: {100 * v:.1f}" for k, v in result["lr_validation"].items())
                                  + ")" if result["lr_validation"] else "") + "."]
    if result.get("note"):
        lines.append(result["note"][0].upper() + result["note"][1:] + ".")
    if result.get("timing"):
        keys = list(result["timing"][0])
        lines.append(f"Wall-clock seconds (mean over {len(result['timing'])} timed seed(s)): " + ", ".join(
            f"{k} {sum(t.get(k, 0) for t in result['timing']) / len(result['timing']):.0f}" for k in keys) + ".")
    chosen_on = sorted({k for r in result["runs"] for k in r if k.endswith(", validation")})
    if chosen_on:  # scores a choice was made on (translation: the ablated route), per seed
        lines.append("On validation, per seed: " + "; ".join(
            f"{k.replace('|', ', ')} " + " / ".join(f"{100 * r[k]:.1f}" if k in r else "–" for r in result["runs"])
            for k in chosen_on) + ".")
    if result.get("mass_changes"):
        keys = list(result["mass_changes"][0])
        lines.append("Support masses, fraction of parent units whose match changed against uniform masses (mean "
                     "over seeds): " + ", ".join(
                         f"{k} {100 * sum(c[k] for c in result['mass_changes']) / len(result['mass_changes']):.1f}%"
                         for k in keys) + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
