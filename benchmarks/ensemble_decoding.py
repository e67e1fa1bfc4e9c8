"""The translation ensemble's decoding cost: the other members decoding with key/value caches (what
`otfuse evaluate --ensemble` does) against the same members re-reading the whole prefix at every step (what
it did before), measured side by side in one run, with identical outputs checked.

Two encoder-decoders of one shape from different seeds (untrained, and kept from ending a sentence, so every
hypothesis runs to the length limit: the case where the prefix cost shows most), a tokenizer learnt on
Multi30k's English and German, and Multi30k validation sources; greedy and beam 4, up to `--max-length` new
tokens. Shapes: the studies' small mBART (128 wide, 2 layers a stack) and a Marian-base shape (512 wide, 6
layers, 8 heads, FFN 2048).

    .venv/bin/python benchmarks/ensemble_decoding.py                   # writes benchmarks/ensemble_decoding.json
    .venv/bin/python benchmarks/ensemble_decoding.py --sentences 16 --max-length 16 --out /tmp/e.json  # quick
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "studies"))

from common import DEFAULT_DATA, save_model  # noqa: E402
from translation import MTScale, mt_model, train_tokenizer  # noqa: E402

from otfuse_cli.checkpoint import open_checkpoint  # noqa: E402
from otfuse_cli.evaluation import generation  # noqa: E402
from otfuse_cli.runnable import load_runnable  # noqa: E402

SHAPES = {
    "study (128 wide, 2+2 layers)": MTScale(hidden=128, layers=2, heads=4, ffn=512, vocab=3000, epochs=0, lrs=()),
    "Marian-base shape (512 wide, 6+6 layers)": MTScale(hidden=512, layers=6, heads=8, ffn=2048, vocab=8000,
                                                        epochs=0, lrs=()),
}


def endless(model):
    """An untrained model that never ends a sentence (end-of-sentence logit pushed down): every hypothesis runs
    to the length limit, the case where reading the whole prefix costs most."""
    with torch.no_grad():
        model.final_logits_bias[:, model.config.eos_token_id] = -1e4
    return model


def decode(members: list, sources: list[str], beams: int, max_length: int, whole_prefix: bool):
    """Seconds and the ensemble's translations; `whole_prefix` makes every step miss the cache (each member
    then reads its whole prefix, as before caches)."""
    parents = (lambda self, ids: None) if whole_prefix else generation.MeanProbabilities._parents
    with mock.patch.object(generation.MeanProbabilities, "_parents", parents):
        start = time.perf_counter()
        out = generation.translate(members, sources, batch_size=32, max_length=max_length, num_beams=beams)
        return time.perf_counter() - start, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=HERE / "ensemble_decoding.json")
    args = ap.parse_args(argv)

    def read(split, lang):
        with gzip.open(args.data_dir / "multi30k" / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
            return f.read().split("\n")[:-1]

    train = read("train", "en")[:5000] + read("train", "de")[:5000]
    sources = read("val", "en")[:args.sentences]
    results = []
    with tempfile.TemporaryDirectory(prefix="otfuse-ensemble-") as tmp:
        for shape, scale in SHAPES.items():
            tok = train_tokenizer(train, scale.vocab)
            members = [load_runnable(open_checkpoint(save_model(endless(mt_model(scale, len(tok), s)),
                                                                Path(tmp) / f"{shape[:5]}{s}", tok)))
                       for s in (0, 1)]
            for beams in (1, 4):
                cached, out_c = decode(members, sources, beams, args.max_length, whole_prefix=False)
                whole, out_w = decode(members, sources, beams, args.max_length, whole_prefix=True)
                row = {"shape": shape, "beams": beams, "sentences": len(sources), "max_length": args.max_length,
                       "seconds, cached": round(cached, 2), "seconds, whole prefix": round(whole, 2),
                       "speed-up": round(whole / cached, 2), "identical translations": out_c == out_w,
                       "mean output tokens": round(  # the text re-tokenised, end-of-sentence included
                           sum(len(tok(t)["input_ids"]) for t in out_c) / len(out_c), 1)}
                results.append(row)
                print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"note": "seconds include both members and the lead's own decoding, "
                                            "on this machine in one run", "rows": results}, indent=1) + "\n")
    print(f"→ {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
