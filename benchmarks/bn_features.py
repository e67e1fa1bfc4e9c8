"""Do a BatchNorm's running statistics belong in weight matching's features? Validation data only.

Weight alignment compares each unit's weights in the two models; a BatchNorm channel's unit holds its affine
parameters (gamma, beta) and its running mean and variance, which are measured on data, not learnt, and whose
scale follows the conv's output. Re-Basin's weight matching leaves them out; otfuse put them in until this
measurement (otfuse_cli/alignment/weights.py, NORM_STATISTICS_IN_FEATURES). Earlier
single measurements disagreed (the bundled digit CNN pair lost 5 points without them, the Fashion-MNIST CNNs
of benchmarks/cnn_parents.py gained 3-11), so this script measures both choices on three kinds of BatchNorm
CNN, on validation images only, and applies a rule fixed before it ran:

    leave them out if the mean validation gain over the three configurations is positive AND at least two of
    the three configurations gain on their own mean.

Configurations (each CNN conv-BN-ReLU-maxpool, saved as a bare nn.Sequential state dict, otfuse's cnn family):
    fixture     the bundled digit CNN pair (fixtures/digits/cnn_a, cnn_b: 8-16 channels with conv biases, a
                32-unit linear layer; 4,000 MNIST digits); validation = the first half of its held-out file
                (500 images), as benchmarks/merge_rules.py splits it
    small       the same architecture and recipe (10 epochs, Adam 2e-3, batch 64) trained on 4,000
                Fashion-MNIST training images; seeds 0-2, 2 and 3 parents; 5,000 validation images
    wide        benchmarks/cnn_parents.py's parents (32-64-64 channels, 2 epochs on 55,000 images; its cache)
                seeds 0-2, 2 and 3 parents; the same 5,000 validation images
Routes: `--align weights --rounds 0`, the same `--repair` (BatchNorm statistics re-estimated on 2,000 training
images; 256 for the fixture, its calibration file), and with 3 parents the default (--rounds 5) + repair.
otfuse runs in this process (otfuse_cli.fuse) with otfuse_cli.alignment.weights.NORM_STATISTICS_IN_FEATURES
set each way; the fused models are scored by this file's own forward pass.

    .venv/bin/python benchmarks/bn_features.py             # writes benchmarks/bn_features.json
    .venv/bin/python benchmarks/bn_features.py --smoke     # one seed, tiny training: the pipeline only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import otfuse_cli as otf  # noqa: E402
from otfuse_cli.alignment import weights as weight_features  # noqa: E402


# Fashion-MNIST splits, the wide parents and their cache; loaded by path (benchmarks/ stays off sys.path: its
# run.py would shadow the studies')
_SPEC = importlib.util.spec_from_file_location("cnn_parents", REPO / "benchmarks" / "cnn_parents.py")
cnn_parents = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(cnn_parents)

FIXTURES = REPO / "fixtures" / "digits"
SMALL = dict(n_train=4000, epochs=10, lr=2e-3, batch=64)  # the fixture's recipe (fixtures/make_fixtures.py)
META = {"format": "pt", "otfuse.arch": "cnn", "otfuse.activation": "relu", "otfuse.input_shape": "1,28,28"}


def small_cnn() -> nn.Sequential:
    """The bundled digit CNN's architecture (fixtures/make_fixtures.py make_cnn)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10))


def train_small(seed: int, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int) -> dict:
    torch.manual_seed(seed)
    net = small_cnn()
    gen = torch.Generator().manual_seed(10_000 + seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: v.detach().clone().contiguous() for k, v in net.eval().state_dict().items()}


@torch.inference_mode()
def accuracy(path: Path, make, x: torch.Tensor, y: torch.Tensor) -> float:
    net = make()
    net.load_state_dict(load_file(str(path)))
    net.eval()
    pred = torch.cat([net(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == y).float().mean())


def routes(n_parents: int) -> dict[str, dict]:
    anchor = {"options": otf.AlignOptions(align="weights", rounds=0)}
    out = {"weights": anchor, "weights +repair": {**anchor, "repair": True}}
    if n_parents >= 3:
        out["weights rounds5 +repair"] = {"options": otf.AlignOptions(align="weights", rounds=5), "repair": True}
    return out


def score_parents(paths: list[Path], calib: Path, n_calib: int, make, x_val, y_val, tmp: Path) -> dict:
    """Validation accuracy of every route, with the statistics in and out of the features."""
    data = otf.DataOptions(data=str(calib), samples=n_calib)
    rows, default = {}, weight_features.NORM_STATISTICS_IN_FEATURES
    try:
        for name, kw in routes(len(paths)).items():
            for inside in (True, False):
                weight_features.NORM_STATISTICS_IN_FEATURES = inside
                out = tmp / "fused.safetensors"
                out.unlink(missing_ok=True)
                otf.fuse([str(p) for p in paths], str(out), data=data if kw.get("repair") else otf.DataOptions(),
                         check=False, **kw)
                rows[f"{name} | {'in' if inside else 'out'}"] = accuracy(out, make, x_val, y_val)
    finally:
        weight_features.NORM_STATISTICS_IN_FEATURES = default
    return rows


def fixture_config(tmp: Path) -> list[dict]:
    held = load_file(str(FIXTURES / "test.safetensors"))
    half = len(held["x"]) // 2
    x_val, y_val = held["x"][:half], held["y"][:half]
    paths = [FIXTURES / "cnn_a.safetensors", FIXTURES / "cnn_b.safetensors"]
    calib = FIXTURES / "calib.safetensors"
    rows = score_parents(paths, calib, 256, small_cnn, x_val, y_val, tmp)
    return [{"config": "fixture", "seed": 0, "parents": 2, "val_images": half, "rows": rows}]


def fashion_configs(tmp: Path, seeds: list[int], counts: list[int], smoke: bool) -> list[dict]:
    data = cnn_parents.load_splits(cnn_parents.DATA, n_train=None if not smoke else 4000,
                                   n_val=5000 if not smoke else 500)
    x_val, y_val = data["val"]
    x_train, y_train = data["train"]
    calib = tmp / "calib.safetensors"
    save_file({"x": x_train[:2000].contiguous()}, str(calib))
    cache = tmp / "cache" if smoke else cnn_parents.default_cache()
    out = []
    # small: the fixture's recipe on 4,000 Fashion-MNIST images
    recipe = dict(SMALL, epochs=1) if smoke else SMALL
    for seed in seeds:
        paths = []
        for k in range(max(counts)):
            path = tmp / f"small_seed{100 * seed + k}.safetensors"
            sd = train_small(100 * seed + k, x_train[:recipe["n_train"]], y_train[:recipe["n_train"]],
                             recipe["epochs"], recipe["lr"], recipe["batch"])
            save_file(sd, str(path), metadata=META)
            paths.append(path)
        for n in counts:
            rows = score_parents(paths[:n], calib, 2000, small_cnn, x_val, y_val, tmp)
            out.append({"config": "small", "seed": seed, "parents": n, "val_images": len(x_val), "rows": rows})
            print(f"small seed {seed} P{n}: {json.dumps(rows)}", file=sys.stderr, flush=True)
    # wide: benchmarks/cnn_parents.py's parents
    widths = (8, 16, 16) if smoke else (32, 64, 64)
    epochs = 1 if smoke else 2
    for seed in seeds:
        paths, _ = cnn_parents.parents_for(seed, max(counts), widths, epochs, data, cache)
        for n in counts:
            rows = score_parents(paths[:n], calib, 2000, lambda: cnn_parents.make_net(widths), x_val, y_val, tmp)
            out.append({"config": "wide", "seed": seed, "parents": n, "val_images": len(x_val), "rows": rows})
            print(f"wide seed {seed} P{n}: {json.dumps(rows)}", file=sys.stderr, flush=True)
    return out


def decide(runs: list[dict]) -> dict:
    """Per configuration the mean validation gain (out - in, points) over its runs and routes; the rule."""
    gains: dict[str, list[float]] = {}
    for run in runs:
        for key, acc in run["rows"].items():
            route, side = key.rsplit(" | ", 1)
            if side == "out":
                gains.setdefault(run["config"], []).append(100 * (acc - run["rows"][f"{route} | in"]))
    per_config = {c: round(float(np.mean(g)), 2) for c, g in gains.items()}
    mean = float(np.mean(list(per_config.values())))
    wins = sum(g > 0 for g in per_config.values())
    return {"gain_by_config": per_config, "mean_gain": round(mean, 2), "configs_gaining": wins,
            "leave_out": bool(mean > 0 and wins >= 2)}


def markdown(runs: list[dict]) -> str:
    lines = ["| config | seed | parents | route | in | out | out − in |", "|---|---:|---:|---|---:|---:|---:|"]
    for run in runs:
        for key, acc in run["rows"].items():
            route, side = key.rsplit(" | ", 1)
            if side == "in":
                out = run["rows"][f"{route} | out"]
                lines.append(f"| {run['config']} | {run['seed']} | {run['parents']} | {route} | {100 * acc:.2f} "
                             f"| {100 * out:.2f} | {100 * (out - acc):+.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--parents", default="2,3")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="one seed, tiny training: checks the pipeline only")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [0] if a.smoke else list(range(a.seeds))
    counts = [int(c) for c in a.parents.split(",")]
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="bn_features_") as tmp:
        tmp = Path(tmp)
        runs = fixture_config(tmp) + fashion_configs(tmp, seeds, counts, a.smoke)
    result = {"benchmark": "bn_features", "smoke": a.smoke, "seeds": seeds, "parents": counts,
              "runs": runs, "decision": decide(runs), "wall_s": round(time.time() - start, 1)}
    print(markdown(runs))
    print(json.dumps(result["decision"]))
    target = a.json or (None if a.smoke else Path(__file__).with_suffix(".json"))
    if target is not None:
        target.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
