"""Run one study from scratch and write its results: results/<study>.json, a Markdown table and a PNG.

    .venv/bin/python benchmarks/studies/run.py languages            # 3 seeds, the full scale
    .venv/bin/python benchmarks/studies/run.py vision --seeds 0 1 2
    .venv/bin/python benchmarks/studies/run.py languages --smoke    # tiny models, one seed (the test suite's)

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
           "translation": "translation", "translation_domains": "translation_domains"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=sorted(STUDIES))
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (smoke: 0)")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--results", type=Path, default=HERE / "results", help="where the JSON, table and PNG go")
    ap.add_argument("--smoke", action="store_true", help="tiny models, one seed: checks the pipeline only")
    ap.add_argument("--report-only", action="store_true", help="rebuild the table and plot from the JSON")
    args = ap.parse_args(argv)
    seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    name = args.study + ("_smoke" if args.smoke else "")
    args.results.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        result = json.loads((args.results / f"{name}.json").read_text())
    else:
        module = __import__(STUDIES[args.study])
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"otfuse-study-{args.study}-") as tmp:
            result = module.run(args.data_dir, Path(tmp), seeds, smoke=args.smoke)
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["seeds"] = seeds
        (args.results / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = table(result["runs"], result["columns"], result["rows"]) + summary(result)
    (args.results / f"{name}.md").write_text(md)
    bar_plot(result["runs"], result["columns"], result["rows"], args.results / f"{name}.png",
             f"{args.study}: {result.get('metric', 'accuracy')}, mean ± 95% CI over {len(result['seeds'])} seed(s)",
             ylabel=f"{result.get('metric', 'accuracy')} (%)" if "metric" in result else "accuracy (%)")
    print(md)
    print(f"{args.study}: {result['seconds']} s, seeds {result['seeds']} → {args.results / name}.{{json,md,png}}")
    return 0


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
        lines.append("Wall-clock seconds (mean over seeds): " + ", ".join(
            f"{k} {sum(t.get(k, 0) for t in result['timing']) / len(result['timing']):.0f}" for k in keys) + ".")
    if result.get("mass_changes"):
        keys = list(result["mass_changes"][0])
        lines.append("Support masses, fraction of parent units whose match changed against uniform masses (mean "
                     "over seeds): " + ", ".join(
                         f"{k} {100 * sum(c[k] for c in result['mass_changes']) / len(result['mass_changes']):.1f}%"
                         for k in keys) + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
