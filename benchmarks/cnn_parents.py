"""CNN parents (issue 33, "Show"): otfuse against independent re-implementations of Git Re-Basin
(Ainsworth et al. 2023) and REPAIR (Jordan et al. 2022) on small BatchNorm CNNs, 2 and 3 parents, several seeds.

Setting (Re-Basin's): parents of one architecture trained from different seeds on the SAME data. Fashion-MNIST
from ../shared/data/fashion-mnist: 5,000 of the 60,000 training images held out as validation (a seeded
choice), the other 55,000 train every parent; every number reported is on the 10,000 test images, and every
choice (which otfuse route, which peer route is "best") is made on the validation images.

Model: three conv3x3-BatchNorm-ReLU-maxpool2 blocks (widths 32-64-64 by default) and a linear classifier, saved
as a bare nn.Sequential state dict (keys 0, 1, 4, 5, 8, 9, 13; safetensors with otfuse.input_shape metadata),
the layout otfuse reads as its "cnn" family (otfuse_cli/arch/sequential.py). SGD with Nesterov momentum, a
one-cycle learning rate, no augmentation, one compute thread; parent k of seed s uses torch seed 100*s + k,
so the 2-parent run of a seed uses the first two of its three parents.

Routes, each scored by test accuracy (and validation accuracy, for choices) and CPU seconds:
  parents, their mean, and the ensemble (softmax outputs averaged);
  otfuse through its CLI, one subprocess each, OTFUSE_THREADS=1 (CPU = that process's user + sys, start-up
    included: `startup_cpu_s` in the JSON is that of a Python that only imports torch, the CLI and transformers):
      --align none | weights | weights --repair | activations | activations --repair, and, when `fuse --help`
      lists --rounds, also --align weights --rounds 5 (+/- --repair) and --align activations --rounds 5 (+/- --repair)
      (--data: a safetensors file of --calib training images, --samples the same number);
  peers, written here from the papers (numpy/scipy/torch; nothing from otfuse_cli), in-process CPU seconds:
      wm        Re-Basin weight matching, anchor = parent 0: coordinate descent over the three channel
                permutations in random order, each a linear assignment (scipy) maximising sum <W_A, P W_B>
                over every parameter the permutation touches (conv kernels, BN weight/bias, next layer's
                input axis); BN running statistics move with their channels. Until a full pass improves nothing.
      mergemany Re-Basin's MergeMany: repeatedly, for each model in random order, match it to the mean of the
                others' aligned weights, until no permutation changes; then average.
      am        activation matching: per layer, correlation of post-ReLU channel activations of parent k and
                the anchor over every position of the --calib training images; one assignment per layer.
    each + RESET (BatchNorm running statistics recomputed on the --calib images: train-mode passes,
    cumulative average) and + REPAIR (every channel's post-BatchNorm activation (the ReLU's input) gets, on
    the --calib images, the mean and std interpolated from its aligned parent channels; folded into the BN
    affine parameters gamma, beta; layer by layer in forward order).
  Diagnostic: "otfuse weights + peer RESET" (the otfuse weights output with this file's RESET), and how many
  channels otfuse's weight matching assigns as this file's does (fused weights row-equal).

For each (parents, seed): the otfuse route and the peer route with the best validation accuracy, and a paired
bootstrap (1,000 resamples of the 10,000 test images) of their test-accuracy difference, with its 95% interval.

    .venv/bin/python benchmarks/cnn_parents.py                 # 3 seeds, 2 and 3 parents (47 min here, one thread, beside other jobs)
    .venv/bin/python benchmarks/cnn_parents.py --seeds 1 --parents 2
    .venv/bin/python benchmarks/cnn_parents.py --smoke         # tiny widths and data: seconds, numbers meaningless

Writes benchmarks/cnn_parents.json (--json; the smoke run writes to the temporary directory unless told) and a
markdown table to stdout. Trained parents are cached in --cache (default: $OTFUSE_BENCH_CACHE or a folder under
the system's temporary directory; the smoke run trains into a fresh temporary folder)."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST pixel mean/std (of x/255)
META = {"otfuse.arch": "cnn", "otfuse.input_shape": "1,28,28", "otfuse.activation": "relu", "format": "pt"}

CONVS, BNS, RELUS, HEAD = ("0", "4", "8"), ("1", "5", "9"), (2, 6, 10), "13"
BN_PARAMS = ("weight", "bias", "running_mean", "running_var")

PEERS = ("wm", "mergemany", "am")
PEER_LABEL = {"wm": "Re-Basin weight matching", "mergemany": "Re-Basin MergeMany", "am": "activation matching"}
REPAIRS = ("", " +RESET", " +REPAIR")
ROUNDS = 5


# The smoke run's otfuse routes: one per code path (plain average, weights, data + repair, rounds); each is a
# process with its own start-up, and all of them made the suite's smoke test a minute long
SMOKE_ROUTES = ("otfuse none", "otfuse weights", "otfuse activations +repair", f"otfuse weights rounds{ROUNDS}")


def otfuse_routes(rounds: bool, smoke: bool = False) -> dict[str, list[str]]:
    """otfuse route name -> fuse arguments; "DATA" stands for --data FILE --samples N. The plain routes align
    to parent 0 (--rounds 0 where the flag exists: three parents would take rounds by default)."""
    anchor = ["--rounds", "0"] if rounds else []
    routes = {"otfuse none": ["--align", "none"],
              "otfuse weights": ["--align", "weights", *anchor],
              "otfuse weights +repair": ["--align", "weights", *anchor, "--repair", "DATA"],
              "otfuse activations": ["--align", "activations", *anchor, "DATA"],
              "otfuse activations +repair": ["--align", "activations", *anchor, "--repair", "DATA"]}
    if rounds:
        routes.update({f"otfuse weights rounds{ROUNDS}": ["--align", "weights", "--rounds", str(ROUNDS)],
                       f"otfuse weights rounds{ROUNDS} +repair": ["--align", "weights", "--rounds", str(ROUNDS),
                                                                   "--repair", "DATA"],
                       f"otfuse activations rounds{ROUNDS}": ["--align", "activations", "--rounds", str(ROUNDS),
                                                              "DATA"],
                       f"otfuse activations rounds{ROUNDS} +repair": ["--align", "activations", "--rounds",
                                                                      str(ROUNDS), "--repair", "DATA"]})
    return {k: v for k, v in routes.items() if k in SMOKE_ROUTES} if smoke else routes


def peer_routes() -> list[str]:
    return [p + r for p in PEERS for r in REPAIRS]


def route_names(n_parents: int, rounds: bool, smoke: bool = False) -> list[str]:
    """Every row one (parents, seed) run scores, in table order."""
    return ([f"parent {k}" for k in range(n_parents)] + ["mean parent", "ensemble"]
            + list(otfuse_routes(rounds, smoke))
            + peer_routes() + ["otfuse weights + peer RESET"])


# ---------------------------------------------------------------- data


def read_fashion(split: str, data: Path) -> tuple[np.ndarray, np.ndarray]:
    images = np.frombuffer(gzip.open(data / f"{split}-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    labels = np.frombuffer(gzip.open(data / f"{split}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    return images.reshape(-1, 28, 28), labels.astype(np.int64)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return ((torch.from_numpy(images.astype(np.float32)) / 255 - MEAN) / STD).unsqueeze(1).contiguous()


def load_splits(data: Path, n_val: int = 5000, n_train: int | None = None, n_test: int | None = None) -> dict:
    """train / val (a seeded choice of n_val of the 60,000 training images) / test, normalised (N, 1, 28, 28)."""
    x, y = read_fashion("train", data)
    xt, yt = read_fashion("t10k", data)
    order = np.random.default_rng(33).permutation(len(x))
    val, train = order[:n_val], order[n_val:]
    if n_train is not None:
        train = train[:n_train]
    test = np.arange(len(xt) if n_test is None else n_test)
    return {"train": (to_tensor(x[train]), torch.from_numpy(y[train])),
            "val": (to_tensor(x[val]), torch.from_numpy(y[val])),
            "test": (to_tensor(xt[test]), torch.from_numpy(yt[test]))}


# ---------------------------------------------------------------- model


def make_net(widths) -> nn.Sequential:
    a, b, c = widths
    return nn.Sequential(
        nn.Conv2d(1, a, 3, padding=1, bias=False), nn.BatchNorm2d(a), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(b, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c * 3 * 3, 10))


def net_of(sd: dict, widths) -> nn.Sequential:
    net = make_net(widths)
    net.load_state_dict({k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
                         for k, v in sd.items()})
    return net.float().eval()


def train_parent(widths, seed: int, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int = 128,
                 lr: float = 0.05) -> dict:
    torch.manual_seed(seed)
    net = make_net(widths)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    warm = max(1, steps // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.1 + 0.9 * t / warm if t < warm else max(0.0, (steps - t) / (steps - warm)))
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return {k: v.detach().clone() for k, v in net.eval().state_dict().items()}


def parents_for(seed: int, n: int, widths, epochs: int, data: dict, cache: Path) -> tuple[list[Path], list[float]]:
    """Paths of parents 0..n-1 of a seed (trained on first use) and their training CPU seconds."""
    from safetensors.torch import save_file

    cache.mkdir(parents=True, exist_ok=True)
    tag = f"cnn{'-'.join(map(str, widths))}_e{epochs}_n{len(data['train'][0])}"
    paths, cpus = [], []
    for k in range(n):
        path = cache / f"{tag}_seed{100 * seed + k}.safetensors"
        info = path.with_suffix(".json")
        if not (path.exists() and info.exists()):
            start, cpu0 = time.time(), time.process_time()
            sd = train_parent(widths, 100 * seed + k, *data["train"], epochs)
            cpu = time.process_time() - cpu0
            tmp = path.with_suffix(".tmp")
            save_file({k2: v.contiguous() for k2, v in sd.items()}, tmp, metadata=META)
            tmp.rename(path)
            info.write_text(json.dumps({"train_cpu_s": round(cpu, 1)}))
            print(f"  trained parent seed {100 * seed + k}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
        paths.append(path)
        cpus.append(json.loads(info.read_text())["train_cpu_s"])
    return paths, cpus


def default_cache() -> Path:
    return Path(os.environ.get("OTFUSE_BENCH_CACHE", Path(tempfile.gettempdir()) / "otfuse-bench")) / "cnn_parents"


def load_sd(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@torch.inference_mode()
def logits(sd: dict, widths, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    net = net_of(sd, widths)
    return torch.cat([net(x[i:i + batch]) for i in range(0, len(x), batch)])


# ---------------------------------------------------------------- peers: permutations (numpy, float64)


def as_numpy(sd: dict) -> dict:
    return {k: v.detach().cpu().double().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
            for k, v in sd.items()}


def as_torch(sd: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).float() if v.dtype.kind == "f" else torch.from_numpy(v)
            for k, v in sd.items()}


def _consumer(sd: dict, layer: int) -> tuple[str, np.ndarray]:
    """The next layer's weight with the channels of `layer` on axis 1 (the head's columns c*9..c*9+8 grouped)."""
    if layer + 1 < len(CONVS):
        name = f"{CONVS[layer + 1]}.weight"
        return name, sd[name]
    w = sd[f"{HEAD}.weight"]
    return f"{HEAD}.weight", w.reshape(w.shape[0], sd[f"{CONVS[layer]}.weight"].shape[0], -1)


def permute(sd: dict, perms: list[np.ndarray]) -> dict:
    """The same function with channels reordered: new channel i of layer l is old channel perms[l][i]."""
    out = dict(sd)
    for layer, p in enumerate(perms):
        out[f"{CONVS[layer]}.weight"] = out[f"{CONVS[layer]}.weight"][p]
        for k in BN_PARAMS:
            out[f"{BNS[layer]}.{k}"] = out[f"{BNS[layer]}.{k}"][p]
        name, w = _consumer(out, layer)
        out[name] = w[:, p].reshape(out[name].shape)
    return out


def _similarity(a: dict, b: dict, layer: int, perms: list[np.ndarray]) -> np.ndarray:
    """S[i, j] = sum over every parameter permuted by `layer` of <a's unit i, b's unit j>, with b's other axes
    already mapped by the other layers' permutations (Re-Basin's weight matching, one coordinate)."""
    conv, bn = CONVS[layer], BNS[layer]
    wa, wb = a[f"{conv}.weight"], b[f"{conv}.weight"]
    if layer > 0:
        wb = wb[:, perms[layer - 1]]
    n = wa.shape[0]
    s = wa.reshape(n, -1) @ wb.reshape(n, -1).T
    for k in ("weight", "bias"):  # parameters only; running statistics are buffers (moved, not matched)
        s += np.outer(a[f"{bn}.{k}"], b[f"{bn}.{k}"])
    _, ca = _consumer(a, layer)
    _, cb = _consumer(b, layer)
    if layer + 1 < len(CONVS):
        cb = cb[perms[layer + 1]]
    s += np.moveaxis(ca, 1, 0).reshape(n, -1) @ np.moveaxis(cb, 1, 0).reshape(n, -1).T
    return s


def weight_matching(a: dict, b: dict, rng: np.random.Generator, init: list[np.ndarray] | None = None,
                    max_iter: int = 100) -> list[np.ndarray]:
    """Permutations of b's channels that maximise sum <a, P(b)> (coordinate descent, Ainsworth et al. Alg. 1)."""
    widths = [a[f"{c}.weight"].shape[0] for c in CONVS]
    perms = [np.arange(w) for w in widths] if init is None else [p.copy() for p in init]
    for _ in range(max_iter):
        progress = False
        for layer in rng.permutation(len(CONVS)):
            s = _similarity(a, b, layer, perms)
            _, cols = linear_sum_assignment(s, maximize=True)
            old = s[np.arange(len(cols)), perms[layer]].sum()
            new = s[np.arange(len(cols)), cols].sum()
            if new > old + 1e-12:
                progress = True
                perms[layer] = cols
        if not progress:
            break
    return perms


def average(sds: list[dict], weights: list[float]) -> dict:
    out = {}
    for k, v in sds[0].items():
        out[k] = sum(w * sd[k] for w, sd in zip(weights, sds)) if v.dtype.kind == "f" else v
    return out


def merge_many(sds: list[dict], rng: np.random.Generator, max_rounds: int = 100) -> list[list[np.ndarray]]:
    """Re-Basin's MergeMany: each model in turn matched to the mean of the others (as aligned so far), until no
    permutation changes. Returns every model's permutations (model 0's too)."""
    n = len(sds)
    perms = [[np.arange(sds[0][f"{c}.weight"].shape[0]) for c in CONVS] for _ in range(n)]
    aligned = list(sds)
    for _ in range(max_rounds):
        changed = False
        for i in rng.permutation(n):
            others = average([aligned[j] for j in range(n) if j != i], [1 / (n - 1)] * (n - 1))
            new = weight_matching(others, sds[i], rng, init=perms[i])
            if any((p != q).any() for p, q in zip(new, perms[i])):
                changed = True
            perms[i] = new
            aligned[i] = permute(sds[i], new)
        if not changed:
            break
    return perms


# ---------------------------------------------------------------- peers: activations, RESET, REPAIR (torch)


def _batches(x: torch.Tensor, batch: int):
    return (x[i:i + batch] for i in range(0, len(x), batch))


@torch.inference_mode()
def activation_matching(sds: list[dict], widths, x: torch.Tensor, batch: int = 250) -> list[list[np.ndarray]]:
    """Per layer and parent k >= 1: the assignment maximising the correlation between the anchor's (parent 0's)
    post-ReLU channels and parent k's, over every position of the images x."""
    nets = [net_of(as_torch(sd), widths) for sd in sds]
    sums: list[dict] = [dict() for _ in sds]  # per parent: layer -> [n, sum, sumsq, cross with anchor]
    for xb in _batches(x, batch):
        acts = []
        for net in nets:
            h, out = xb, []
            for i, m in enumerate(net):
                h = m(h)
                if i in RELUS:
                    out.append(h.double().movedim(1, -1).reshape(-1, h.shape[1]))
            acts.append(out)
        for k, out in enumerate(acts):
            for layer, z in enumerate(out):
                acc = sums[k].setdefault(layer, [0, 0.0, 0.0, 0.0])
                acc[0] += len(z)
                acc[1] = acc[1] + z.sum(0)
                acc[2] = acc[2] + (z * z).sum(0)
                if k:
                    acc[3] = acc[3] + acts[0][layer].T @ z
    perms = [[np.arange(w) for w in widths]]
    n0 = sums[0]
    for k in range(1, len(sds)):
        pk = []
        for layer in range(len(CONVS)):
            n, s0, q0, _ = n0[layer]
            _, sk, qk, cross = sums[k][layer]
            m0, mk = s0 / n, sk / n
            sd0 = (q0 / n - m0 * m0).clamp_min(0).sqrt()
            sdk = (qk / n - mk * mk).clamp_min(0).sqrt()
            corr = (cross / n - torch.outer(m0, mk)) / (torch.outer(sd0, sdk) + 1e-8)
            _, cols = linear_sum_assignment(corr.numpy(), maximize=True)
            pk.append(cols)
        perms.append(pk)
    return perms


@torch.no_grad()
def reset_bn(sd: dict, widths, x: torch.Tensor, batch: int = 250) -> dict:
    """RESET: BatchNorm running statistics recomputed on x (train-mode BatchNorm, cumulative average)."""
    net = net_of(as_torch(sd), widths)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
            m.train()
    for xb in _batches(x, batch):
        net(xb)
    net.eval()
    return as_numpy(net.state_dict())


@torch.inference_mode()
def post_bn_stats(sd: dict, widths, x: torch.Tensor, upto: int, batch: int = 250) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and std of the BatchNorm outputs (eval mode) of layers 0..upto over every position of x."""
    net = net_of(as_torch(sd), widths)
    bn_index = [int(b) for b in BNS[:upto + 1]]
    acc = {i: [0, 0.0, 0.0] for i in bn_index}
    for xb in _batches(x, batch):
        h = xb
        for i, m in enumerate(net):
            h = m(h)
            if i in acc:
                z = h.double().movedim(1, -1).reshape(-1, h.shape[1])
                acc[i][0] += len(z)
                acc[i][1] = acc[i][1] + z.sum(0)
                acc[i][2] = acc[i][2] + (z * z).sum(0)
            if i == bn_index[-1]:
                break
    out = []
    for i in bn_index:
        n, s, q = acc[i]
        mean = s / n
        out.append((mean.numpy(), (q / n - mean * mean).clamp_min(0).sqrt().numpy()))
    return out


def repair(fused: dict, sds: list[dict], perms: list[list[np.ndarray]], weights: list[float], widths,
           x: torch.Tensor) -> dict:
    """REPAIR on a BatchNorm CNN: every channel's post-BN activation gets, on x, the mean and std interpolated
    from its aligned parent channels (goal statistics measured in each parent, moved by its permutation);
    the correction y -> (y - m) s_t / s + m_t is folded into the BN affine parameters, layer by layer."""
    goals = []
    parent_stats = [post_bn_stats(sd, widths, x, len(CONVS) - 1) for sd in sds]
    for layer in range(len(CONVS)):
        mean = sum(w * st[layer][0][p[layer]] for w, st, p in zip(weights, parent_stats, perms))
        std = sum(w * st[layer][1][p[layer]] for w, st, p in zip(weights, parent_stats, perms))
        goals.append((mean, std))
    out = dict(fused)
    for layer, (m_t, s_t) in enumerate(goals):
        m_f, s_f = post_bn_stats(out, widths, x, layer)[layer]
        scale = np.where(s_f > 1e-12, s_t / np.maximum(s_f, 1e-12), 1.0)
        bn = BNS[layer]
        out[f"{bn}.weight"] = out[f"{bn}.weight"] * scale
        out[f"{bn}.bias"] = (out[f"{bn}.bias"] - m_f) * scale + m_t
    return out


# ---------------------------------------------------------------- otfuse (CLI subprocess)


def otfuse_help() -> str:
    return subprocess.run([sys.executable, "-m", "otfuse_cli", "fuse", "--help"], cwd=REPO, capture_output=True,
                          text=True, env=child_env(), check=True).stdout


def child_env() -> dict:
    env = dict(os.environ)
    env.update({"OTFUSE_THREADS": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    return env


def run_otfuse(args: list[str], workdir: Path) -> dict:
    """One `otfuse fuse` process; CPU seconds from its own rusage (os.wait4), so runs may overlap."""
    out_f, err_f = (open(workdir / f"{os.getpid()}_{time.monotonic_ns()}.{s}", "w+") for s in ("out", "err"))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "otfuse_cli", "fuse", *args], cwd=REPO, stdout=out_f,
                            stderr=err_f, env=child_env())
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    err_f.seek(0)
    err = err_f.read()
    out_f.close()
    err_f.close()
    return {"rc": proc.returncode, "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "wall_s": round(wall, 2),
            "stderr": err.strip()[-1500:]}


def otfuse_source() -> dict:
    """The commit otfuse ran from, and whether otfuse_cli/ had uncommitted changes (then the numbers are those
    of the working tree)."""
    def git(*args):
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain", "--", "otfuse_cli")
    return {"commit": git("rev-parse", "HEAD"), "otfuse_cli_modified": None if status is None else bool(status)}


def startup_cpu() -> float:
    """CPU seconds of a Python that only imports what `otfuse fuse` imports (torch, the CLI, transformers)."""
    proc = subprocess.Popen([sys.executable, "-c", "import otfuse_cli.cli, otfuse_cli.fusion, transformers.modeling_utils"],
                            cwd=REPO, env=child_env())
    _, _, usage = os.wait4(proc.pid, 0)
    return round(usage.ru_utime + usage.ru_stime, 2)


# ---------------------------------------------------------------- scoring


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict:
    """Test-accuracy difference a - b with a 95% percentile interval over paired resamples of the test images."""
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    d = a - b
    for i in range(resamples):
        diffs[i] = d[rng.integers(0, len(d), len(d))].mean()
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"diff": float(d.mean()), "ci95": [float(lo), float(hi)], "resamples": resamples}


class Scorer:
    def __init__(self, data: dict, widths):
        self.x_val, self.y_val = data["val"]
        self.x_test, self.y_test = data["test"]
        self.widths = widths

    def probs(self, sd: dict) -> tuple[torch.Tensor, torch.Tensor]:
        sd = as_torch(sd) if isinstance(next(iter(sd.values())), np.ndarray) else sd
        return (torch.softmax(logits(sd, self.widths, self.x_val), 1),
                torch.softmax(logits(sd, self.widths, self.x_test), 1))

    def row(self, probs, cpu_s: float | None, **extra) -> dict:
        pv, pt = probs
        correct = (pt.argmax(1) == self.y_test).numpy()
        row = {"val_acc": float((pv.argmax(1) == self.y_val).float().mean()), "test_acc": float(correct.mean()),
               "cpu_s": None if cpu_s is None else round(cpu_s, 2), **extra}
        return row, correct


def otfuse_jobs(n_parents: int, seed: int, paths: list[Path], calib_file: Path, n_calib: int, rounds: bool,
                workdir: Path, smoke: bool = False) -> dict[str, tuple[list[str], Path]]:
    """route name -> (fuse arguments, output path) for one (parents, seed)."""
    data_args = ["--data", str(calib_file), "--samples", str(n_calib)]
    jobs = {}
    for i, (name, route) in enumerate(otfuse_routes(rounds, smoke).items()):
        out = workdir / f"P{n_parents}_s{seed}_{i}.safetensors"
        args = [str(p) for p in paths[:n_parents]] + ["-o", str(out), "--force"]
        for x in route:
            args += data_args if x == "DATA" else [x]
        jobs[name] = (args, out)
    return jobs


def channels_alike(x: dict, y: dict) -> list[float]:
    """Per layer, the fraction of channels whose fused BatchNorm weight and bias are equal in two fusions with
    anchor 0 (they depend only on which parent channels were merged into that channel, not on other layers)."""
    return [float(np.mean(np.isclose(x[f"{bn}.weight"], y[f"{bn}.weight"], atol=1e-6)
                          & np.isclose(x[f"{bn}.bias"], y[f"{bn}.bias"], atol=1e-6))) for bn in BNS]


def run_config(n_parents: int, seed: int, paths: list[Path], train_cpu: list[float], parent_probs: list,
               scorer: Scorer, a, calib_x: torch.Tensor, jobs: dict, results) -> dict:
    """Score one (parents, seed). `results()` gives the otfuse runs of `jobs` (waiting for them if they run
    in the background) once the peers are done."""
    widths = a.widths
    rows, correct = {}, {}

    def add(name, probs, cpu_s, **extra):
        rows[name], correct[name] = scorer.row(probs, cpu_s, **extra)
        print(f"  P={n_parents} seed={seed} {name:32s} test {rows[name]['test_acc']:.4f} "
              f"val {rows[name]['val_acc']:.4f} cpu {rows[name]['cpu_s']}", file=sys.stderr, flush=True)

    for k in range(n_parents):
        add(f"parent {k}", parent_probs[k], train_cpu[k], note="training")
    rows["mean parent"] = {
        "val_acc": float(np.mean([rows[f"parent {k}"]["val_acc"] for k in range(n_parents)])),
        "test_acc": float(np.mean([rows[f"parent {k}"]["test_acc"] for k in range(n_parents)])),
        "cpu_s": round(float(np.mean(train_cpu[:n_parents])), 2)}
    ens = tuple(sum(p[i] for p in parent_probs[:n_parents]) / n_parents for i in (0, 1))
    add("ensemble", ens, None, note=f"{n_parents} models at inference")

    # peers
    sds = [as_numpy(load_sd(p)) for p in paths[:n_parents]]
    w = [1 / n_parents] * n_parents
    rng = np.random.default_rng(seed)
    fused_by = {}
    for peer in PEERS:
        t0 = time.process_time()
        if peer == "wm":
            perms = [[np.arange(c) for c in widths]] + [weight_matching(sds[0], sd, rng) for sd in sds[1:]]
        elif peer == "mergemany":
            perms = merge_many(sds, rng)
        else:
            perms = activation_matching(sds, widths, calib_x)
        fused = fused_by[peer] = average([permute(sd, p) for sd, p in zip(sds, perms)], w)
        t_align = time.process_time() - t0
        add(peer, scorer.probs(fused), t_align)
        t0 = time.process_time()
        reset = reset_bn(fused, widths, calib_x)
        t_reset = time.process_time() - t0  # measured before the scoring's forward passes
        add(peer + " +RESET", scorer.probs(reset), t_align + t_reset)
        t0 = time.process_time()
        repaired = repair(fused, sds, perms, w, widths, calib_x)
        t_repair = time.process_time() - t0
        add(peer + " +REPAIR", scorer.probs(repaired), t_align + t_repair)

    # otfuse
    done = results()
    for name, (_, out) in jobs.items():
        r = done[name]
        if r["rc"] != 0:
            rows[name] = {"val_acc": None, "test_acc": None, "cpu_s": r["cpu_s"], "error": r["stderr"]}
            print(f"  P={n_parents} seed={seed} {name}: FAILED rc={r['rc']}: {r['stderr'][-300:]}", file=sys.stderr)
            continue
        add(name, scorer.probs(load_sd(out)), r["cpu_s"], wall_s=r["wall_s"])
    sanity = {}
    if rows["otfuse none"]["test_acc"] is not None:
        none_out, plain = as_numpy(load_sd(jobs["otfuse none"][1])), average(sds, w)
        sanity["otfuse_none_vs_peer_average_max_abs"] = float(
            max(np.abs(none_out[k] - plain[k]).max() for k in plain if plain[k].dtype.kind == "f"))
    if rows["otfuse weights"]["test_acc"] is not None:
        ours, theirs = as_numpy(load_sd(jobs["otfuse weights"][1])), fused_by["wm"]
        sanity["otfuse_weights_channels_as_peer_wm"] = channels_alike(ours, theirs)
        t0 = time.process_time()
        reset = reset_bn(ours, widths, calib_x)
        t_reset = time.process_time() - t0
        add("otfuse weights + peer RESET", scorer.probs(reset), rows["otfuse weights"]["cpu_s"] + t_reset,
            note="diagnostic")

    # best by validation, paired bootstrap on test
    def best(names):
        ok = [n for n in names if rows.get(n, {}).get("val_acc") is not None]
        return max(ok, key=lambda n: rows[n]["val_acc"]) if ok else None

    best_o = best([n for n in jobs if n != "otfuse none"])
    best_p = best(peer_routes())
    boot = None if best_o is None or best_p is None else paired_bootstrap(
        correct[best_o], correct[best_p], a.resamples, seed)
    return {"parents": n_parents, "seed": seed, "routes": rows, "best_otfuse": best_o, "best_peer": best_p,
            "bootstrap_otfuse_minus_peer": boot, "sanity": sanity}


# ---------------------------------------------------------------- report


def summarise(runs: list[dict], names: list[str], counts: list[int]) -> dict:
    table = {}
    for name in names:
        table[name] = {}
        for p in counts:
            accs = [r["routes"][name]["test_acc"] for r in runs if r["parents"] == p and name in r["routes"]
                    and r["routes"][name]["test_acc"] is not None]
            cpus = [r["routes"][name]["cpu_s"] for r in runs if r["parents"] == p and name in r["routes"]
                    and r["routes"][name].get("cpu_s") is not None]
            if accs:
                table[name][str(p)] = {"mean": float(np.mean(accs)),
                                       "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                                       "n": len(accs), "cpu_s": float(np.mean(cpus)) if cpus else None}
    return table


def markdown(table: dict, runs: list[dict], counts: list[int]) -> str:
    head = "| route | " + " | ".join(f"{p} parents: test acc | CPU-s" for p in counts) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(counts)]
    for name, cols in table.items():
        cells = []
        for p in counts:
            c = cols.get(str(p))
            if c is None:
                cells += ["–", "–"]
            else:
                cells += [f"{100 * c['mean']:.2f} ± {100 * c['std']:.2f}",
                          "–" if c["cpu_s"] is None else f"{c['cpu_s']:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| parents | seed | otfuse best (val) | test | peer best (val) | test | otfuse − peer, points [95% CI] |",
              "|---:|---:|---|---:|---|---:|---|"]
    for r in runs:
        b = r["bootstrap_otfuse_minus_peer"]
        if b is None:
            continue
        lines.append(f"| {r['parents']} | {r['seed']} | {r['best_otfuse']} | "
                     f"{100 * r['routes'][r['best_otfuse']]['test_acc']:.2f} | {r['best_peer']} | "
                     f"{100 * r['routes'][r['best_peer']]['test_acc']:.2f} | {100 * b['diff']:+.2f} "
                     f"[{100 * b['ci95'][0]:+.2f}, {100 * b['ci95'][1]:+.2f}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1), each its own parents")
    parser.add_argument("--parents", default="2,3", help="parent counts, e.g. 2,3")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--widths", default="32,64,64")
    parser.add_argument("--calib", type=int, default=2000,
                        help="training images for activation matching, RESET, REPAIR (otfuse: --data/--samples)")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=1,
                        help="otfuse processes at a time; above 1 they also run beside the peers (smoke: 2)")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny widths, a few hundred images, 1 epoch, 1 seed, 3 parents")
    a = parser.parse_args(argv)
    counts = sorted({int(p) for p in a.parents.split(",")})
    if a.smoke:
        # three parents only: every code path of two (weight matching onto parent 0) and more (MergeMany)
        a.seeds, a.epochs, a.widths, a.calib, counts, a.jobs = 1, 1, "4,8,8", 64, [3], max(a.jobs, 2)
    a.widths = tuple(int(v) for v in a.widths.split(","))
    if a.json is None:
        a.json = (Path(tempfile.gettempdir()) / "cnn_parents_smoke.json" if a.smoke
                  else REPO / "benchmarks" / "cnn_parents.json")
    torch.set_num_threads(1)
    t_start = time.time()
    data = (load_splits(a.data, n_val=200, n_train=400, n_test=300) if a.smoke else load_splits(a.data))
    help_text = otfuse_help()
    rounds = "--rounds" in help_text
    rounds_note = (f"--rounds found in `fuse --help`: rounds{ROUNDS} routes scored" if rounds else
                   "`fuse --help` has no --rounds: the rounds routes are skipped")
    print(rounds_note, file=sys.stderr)
    runs = []
    with tempfile.TemporaryDirectory(prefix="cnn_parents_") as tmp:
        tmp = Path(tmp)
        cache = a.cache or (tmp / "cache" if a.smoke else default_cache())
        from safetensors.torch import save_file

        calib_x = data["train"][0][:a.calib].contiguous()
        calib_file = tmp / "calib.safetensors"
        save_file({"x": calib_x}, str(calib_file), metadata={"otfuse.dataset": f"fashion-mnist train, {a.calib}"})
        scorer = Scorer(data, a.widths)
        startup = startup_cpu()
        overlap = a.jobs > 1
        pool = ThreadPoolExecutor(max_workers=a.jobs) if overlap else None
        for seed in range(a.seeds):
            paths, train_cpu = parents_for(seed, max(counts), a.widths, a.epochs, data, cache)
            parent_probs = [scorer.probs(load_sd(p)) for p in paths]
            jobs = {n: otfuse_jobs(n, seed, paths, calib_file, len(calib_x), rounds, tmp, a.smoke) for n in counts}
            flat = [(n, name, args) for n in counts for name, (args, _) in jobs[n].items()]
            if overlap:  # otfuse processes in the background while the peers run here
                futures = {(n, name): pool.submit(run_otfuse, args, tmp) for n, name, args in flat}
                results = {n: (lambda n=n: {name: futures[(n, name)].result() for name in jobs[n]}) for n in counts}
            else:  # one thing at a time: otfuse first, then the peers
                done = {(n, name): run_otfuse(args, tmp) for n, name, args in flat}
                results = {n: (lambda n=n: {name: done[(n, name)] for name in jobs[n]}) for n in counts}
            for n in counts:
                runs.append(run_config(n, seed, paths, train_cpu, parent_probs, scorer, a, calib_x, jobs[n],
                                       results[n]))
        if pool is not None:
            pool.shutdown()
    names = route_names(max(counts), rounds, a.smoke)
    table = summarise(runs, names, counts)
    doc = {"benchmark": "cnn_parents", "command": "python benchmarks/cnn_parents.py" + (
        " " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
           "settings": {"seeds": a.seeds, "parents": counts, "epochs": a.epochs, "widths": list(a.widths),
                        "calib": a.calib, "resamples": a.resamples, "smoke": a.smoke,
                        "train": len(data["train"][0]), "val": len(data["val"][0]), "test": len(data["test"][0]),
                        "threads": 1, "jobs": a.jobs},
           "otfuse_source": otfuse_source(), "rounds_available": rounds, "rounds_note": rounds_note,
           "startup_cpu_s": startup,
           "routes": names, "table": table, "runs": runs, "wall_s": round(time.time() - t_start, 1)}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=1))
    print(markdown(table, runs, counts))
    print(f"\n{rounds_note}; otfuse CPU-s include start-up ({startup} CPU-s to import torch, otfuse and transformers); "
          f"wrote {a.json} in {doc['wall_s']} s", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
