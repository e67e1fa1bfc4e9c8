"""Study 7's budget question, on validation only: how many training steps (and which strings) does one party
need before it translates its own domain? One party trained once, scored greedy on its domain's validation
strings at checkpoints along the run.

    .venv/bin/python benchmarks/studies/translation_domains_curve.py --steps 3000 --at 500 1000 2000 3000
    .venv/bin/python benchmarks/studies/translation_domains_curve.py --max-words 6 ...   # short strings only

The learning rate decays linearly to the last step (the study's schedule), so a mid-run checkpoint scores no
better than a run of that length would: the curve is a lower bound before its last point. Seconds are
training only (scoring excluded). Writes results/translation_domains_curve_<party>_<words>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import DEFAULT_DATA, save_model  # noqa: E402
from translation import fit_mt, mt_model, train_tokenizer, write_pairs  # noqa: E402
from translation_domains import DOMAINS, FULL, load, words  # noqa: E402

import otfuse_cli as otf  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--party", choices=sorted(DOMAINS), default="desktop")
    ap.add_argument("--max-words", type=int, default=None, help="keep strings of at most this many English words")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--at", type=int, nargs="+", default=[500, 1000, 2000, 3000])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = replace(FULL, limit=None)
    data = load(args.data_dir, scale, smoke=False, max_words=None)
    train = {d: words(data[f"{d} train"], args.max_words) for d in DOMAINS}
    tok = train_tokenizer([t for d in DOMAINS for pair in train[d] for t in pair], scale.vocab)
    model = mt_model(scale, len(tok), 0)
    points, clock = [], {"train": 0.0}
    with tempfile.TemporaryDirectory(prefix="otfuse-curve-") as tmp:
        val = {"own domain": write_pairs(Path(tmp) / "val.jsonl", words(data[f"{args.party} val"], args.max_words)),
               "own domain, every length": write_pairs(Path(tmp) / "val_all.jsonl", data[f"{args.party} val"])}

        def checkpoint(step: int) -> None:
            if step not in args.at:
                return
            clock["train"] += time.perf_counter() - clock["since"]
            path = save_model(model, Path(tmp) / f"step{step}", tok)
            point = {"step": step, "train_seconds": round(clock["train"], 1)}
            for name, file in val.items():
                row = otf.evaluate({"party": str(path)}, file, task="translation", max_length=64,
                                   batch_size=64)["rows"][0]
                point[f"BLEU, {name}"], point[f"chrF, {name}"] = row["bleu"], row["chrf"]
            points.append(point)
            print(json.dumps(point), flush=True)
            clock["since"] = time.perf_counter()

        clock["since"] = time.perf_counter()
        fit_mt(scale, tok, train[args.party], 0, args.lr, steps=args.steps, model=model,
               after_step=checkpoint)
    label = f"max{args.max_words}words" if args.max_words else "all"
    result = {"party": args.party, "max_words": args.max_words, "training_strings": len(train[args.party]),
              "validation_strings": len(words(data[f"{args.party} val"], args.max_words)), "lr": args.lr,
              "threads": torch.get_num_threads(), "scale": scale.__dict__, "points": points}
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"translation_domains_curve_{args.party}_{label}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"→ {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
