"""The independent leakage check over every study's own splits: how many test items have a near-duplicate in
that study's training or validation data by a notion other than the key the studies drop by.

    .venv/bin/python benchmarks/studies/leakage.py              # every study, the full splits
    .venv/bin/python benchmarks/studies/leakage.py shards vision

Texts: character 5-gram Jaccard >= 0.9 after NFKC, case folding and white-space collapsing (`common.similar_texts`);
the studies drop near-duplicates by `common.near_duplicate_key` (case, accents, punctuation and spacing removed),
so this check does not share their notion. Images (study 5): L2 distance below `common.PIXEL_L2` between a test
and a training or validation image, pixels in [0, 1] (`common.similar_images`, exact). Each study's own `load`
builds the splits, exactly as its run does; its leak check is intercepted here and counted instead of raised.
Writes results/leakage.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

TEXT_STUDIES = ("shards", "federated", "federated_pretrained", "languages", "translation", "translation_domains",
                "multitask", "llm_domains")
STUDIES = (*TEXT_STUDIES[:5], "vision", *TEXT_STUDIES[5:])
IMAGE_THRESHOLDS = (1.0, common.PIXEL_L2, 2.0)


def _captured(study: str, data_dir: Path, smoke: bool = False) -> list[tuple]:
    """The (test, *others) arguments of every leak check the study's `load` makes, without raising."""
    module = __import__(study)
    calls = []
    name = "check_no_image_leak" if study == "vision" else "check_no_leak"
    # a study may build part of its splits with another study's load (federated_pretrained, multitask): the
    # checks of that part are the other module's, and are intercepted too (and counted apart below)
    patched = [m for m in list(sys.modules.values())
               if getattr(m, "__file__", None) and Path(m.__file__).parent == HERE and hasattr(m, name)]
    originals = [getattr(m, name) for m in patched]
    for m in patched:
        setattr(m, name, lambda test, *others, _m=m.__name__: calls.append((_m, test, *others)) or len(test))
    try:
        scale = module.SMOKE if smoke else module.FULL
        if study in ("shards", "federated"):
            module.load(scale)
        elif study == "federated_pretrained":
            module.load(scale, test_limit=module.TEST_LIMIT, val_limit=module.TEST_LIMIT)
        elif study in ("translation_domains", "multitask"):
            module.load(data_dir, scale, smoke)
        else:
            module.load(data_dir, scale)
    finally:
        for m, f in zip(patched, originals):
            setattr(m, name, f)
    own = [c[1:] for c in calls if c[0] == study]
    return own or [c[1:] for c in calls]


def count(study: str, data_dir: Path, smoke: bool = False) -> dict:
    """{test items checked, test items with a near-duplicate, examples} for one study's splits."""
    start = time.perf_counter()
    calls = _captured(study, data_dir, smoke)
    out = {"checked": 0, "near_duplicates": 0, "examples": []}
    if study == "vision":
        import numpy as np

        (test, *others), = calls
        pool = np.concatenate(others)
        found = common.similar_images(test, pool, threshold=max(IMAGE_THRESHOLDS))
        found = [f for f in found if f[2] < max(IMAGE_THRESHOLDS)]
        out["checked"] = len(test)
        out["by_threshold"] = {str(t): len({i for i, _, d in found if d < t}) for t in IMAGE_THRESHOLDS}
        out["near_duplicates"] = out["by_threshold"][str(common.PIXEL_L2)]
        out["examples"] = [{"test": i, "other": j, "l2": round(d, 3)}
                           for i, j, d in sorted(found, key=lambda f: f[2])[:5]]
        out["criterion"] = f"pixel L2 < {common.PIXEL_L2} (pixels in [0, 1])"
    else:
        for test, *others in calls:
            pool = [t for group in others for t in group]
            found = common.similar_texts(test, pool)
            hit = sorted({i for i, _, _ in found})
            out["checked"] += len(test)
            out["near_duplicates"] += len(hit)
            best = {}
            for i, j, s in found:
                if s > best.get(i, (None, 0))[1]:
                    best[i] = (j, s)
            out["examples"] += [{"test": test[i][:160], "other": pool[best[i][0]][:160],
                                 "jaccard": round(best[i][1], 3)} for i in hit[:max(0, 5 - len(out["examples"]))]]
        out["criterion"] = f"character {common.SHINGLE}-gram Jaccard >= {common.JACCARD}"
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("studies", nargs="*", metavar="STUDY", help=f"default: all of {', '.join(STUDIES)}")
    ap.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=None, help="default: results/leakage.json (smoke: not written)")
    ap.add_argument("--smoke", action="store_true", help="the smoke runs' splits (what the test suite trains on)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.studies) - set(STUDIES))
    if unknown:
        ap.error(f"unknown studies: {', '.join(unknown)}")
    if args.out is None and not args.smoke:
        args.out = HERE / "results" / "leakage.json"
    report = json.loads(args.out.read_text()) if args.out and args.out.is_file() else {}
    for study in args.studies or STUDIES:
        report[study] = count(study, args.data_dir, args.smoke)
        r = report[study]
        print(f"{study}: {r['near_duplicates']} of {r['checked']} test items have a near-duplicate "
              f"({r['criterion']}; {r['seconds']} s)", flush=True)
        if args.out:
            args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
