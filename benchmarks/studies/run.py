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

STUDIES = {"languages": "languages", "vision": "vision", "shards": "shards", "federated": "federated"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=sorted(STUDIES))
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (smoke: 0)")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--results", type=Path, default=HERE / "results", help="where the JSON, table and PNG go")
    ap.add_argument("--smoke", action="store_true", help="tiny models, one seed: checks the pipeline only")
    args = ap.parse_args(argv)
    seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    module = __import__(STUDIES[args.study])
    args.results.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"otfuse-study-{args.study}-") as tmp:
        result = module.run(args.data_dir, Path(tmp), seeds, smoke=args.smoke)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["seeds"] = seeds
    name = args.study + ("_smoke" if args.smoke else "")
    (args.results / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = table(result["runs"], result["columns"], result["rows"])
    (args.results / f"{name}.md").write_text(md)
    bar_plot(result["runs"], result["columns"], result["rows"], args.results / f"{name}.png",
             f"{args.study}: accuracy, mean ± 95% CI over {len(seeds)} seed(s)")
    print(md)
    print(f"{args.study}: {result['seconds']} s, seeds {seeds} → {args.results / name}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
