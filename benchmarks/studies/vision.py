"""Study 5, vision (Imfeld et al.'s ViT setting, scaled to a 2-core CPU): two small ViTs trained on
Fashion-MNIST from different seeds; OT fusion against vanilla averaging and the ensemble, one-shot and after a
short fine-tune; then heterogeneous fusion of a wide ViT into a narrow one against the narrow model alone and a
narrow model trained from scratch for the fine-tune's steps.

Splits: the last 5,000 training images are validation (learning rate chosen there), the other 55,000 train
both parents (different seeds: initialisation and batch order), the 10,000 test images are only scored.
"""

from __future__ import annotations

import gzip
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from common import check_no_image_leak, fusion_routes, similar_images, mass_routes, save_model, score, seed_all, train

LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass(frozen=True)
class Scale:
    hidden: int = 64
    heads: int = 4
    layers: int = 2
    ffn: int = 128
    patch: int = 7
    wide: int = 2  # the wide ViT: hidden, heads and FFN x2 (same head size)
    epochs: float = 2.0
    batch: int = 128
    finetune: float = 0.1  # fraction of one parent's steps
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    limit: int | None = None  # images per split (smoke mode)


FULL, SMOKE = Scale(), Scale(hidden=16, heads=2, layers=1, ffn=32, epochs=1.0, lrs=(1e-3, 3e-3), limit=512)


def _idx(path: Path) -> np.ndarray:
    raw = gzip.open(path, "rb").read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(data_dir: Path, scale: Scale) -> dict:
    d = data_dir / "fashion-mnist"
    raw, raw_test = _idx(d / "train-images-idx3-ubyte.gz"), _idx(d / "t10k-images-idx3-ubyte.gz")
    y = torch.from_numpy(_idx(d / "train-labels-idx1-ubyte.gz").astype(np.int64))
    yt = torch.from_numpy(_idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64))
    pixels = {"train": raw[:55_000], "val": raw[55_000:], "test": raw_test}
    labels = {"train": y[:55_000], "val": y[55_000:], "test": yt}
    if scale.limit:
        pixels = {k: v[:scale.limit] for k, v in pixels.items()}
        labels = {k: v[:scale.limit] for k, v in labels.items()}
    # training and validation images within PIXEL_L2 of a test image are dropped (82 of 10,000 test images had
    # one); then the check: no test image byte-identical to, or within PIXEL_L2 of, a training or validation image
    pool = np.concatenate([pixels["train"], pixels["val"]]) / 255.0
    near = {j for _, j, _ in similar_images(pixels["test"] / 255.0, pool)}
    dropped = 0
    for k, offset in (("train", 0), ("val", len(pixels["train"]))):
        keep = np.array([offset + i not in near for i in range(len(pixels[k]))], dtype=bool)
        dropped += int((~keep).sum())
        pixels[k], labels[k] = pixels[k][keep], labels[k][torch.from_numpy(keep)]
    check_no_image_leak(*(pixels[k] / 255.0 for k in ("test", "train", "val")))
    data = {k: (torch.from_numpy(v.copy()).float().div(255).sub(0.286).div(0.353)[:, None], labels[k])
            for k, v in pixels.items()}
    return {**data, "dropped_near_duplicates": dropped}


def write(path: Path, xy) -> str:
    save_file({"x": xy[0].contiguous(), "y": xy[1].contiguous()}, path)
    return str(path)


def make_model(scale: Scale, seed: int, width: int = 1):
    import transformers as T

    seed_all(seed)
    config = T.ViTConfig(image_size=28, patch_size=scale.patch, num_channels=1, hidden_size=scale.hidden * width,
                         num_hidden_layers=scale.layers, num_attention_heads=scale.heads * width,
                         intermediate_size=scale.ffn * width, num_labels=10, id2label=dict(enumerate(LABELS)),
                         label2id={n: i for i, n in enumerate(LABELS)})
    return T.ViTForImageClassification(config).eval()


def steps_for(scale: Scale, n: int) -> int:
    return max(1, int(scale.epochs * n / scale.batch))


def fit(model, scale: Scale, xy, steps: int, seed: int, lr: float) -> float:
    x, y = xy

    def batch(g):
        idx = torch.randint(len(x), (scale.batch,), generator=g)
        return {"pixel_values": x[idx]}, y[idx]

    return train(model, batch, steps, lr, seed)


def finetuned(path: Path, out: Path, scale: Scale, xy, steps: int, seed: int, lr: float) -> Path:
    import transformers as T

    model = T.ViTForImageClassification.from_pretrained(str(path))
    fit(model, scale, xy, steps, seed, lr / 3)  # a short, gentler run
    return save_model(model, out)


def run(data_dir: Path, out: Path, seeds: list[int], smoke: bool = False) -> dict:
    scale = SMOKE if smoke else FULL
    parts = load(data_dir, scale)
    dropped = parts.pop("dropped_near_duplicates")
    files = {k: write(out / f"{k}.safetensors", v) for k, v in parts.items()}
    steps = steps_for(scale, len(parts["train"][0]))
    ft_steps = max(1, int(scale.finetune * steps))

    choice = {}
    for lr in scale.lrs:  # on validation only, seed 0
        model = make_model(scale, 0)
        fit(model, scale, parts["train"], steps, 0, lr)
        choice[lr] = score({"m": save_model(model, out / f"lr_{lr}")}, files["val"])["m"]
    lr = max(choice, key=choice.get)

    runs, timing, mass_changes = [], [], []
    for seed in seeds:
        root = out / f"seed{seed}"
        root.mkdir(parents=True, exist_ok=True)
        cost, paths = {}, {}
        for name, s, width in (("parent A", seed, 1), ("parent B", seed + 1000, 1), ("wide parent", seed + 2000, 2)):
            model = make_model(scale, s, width)
            cost[name] = fit(model, scale, parts["train"], steps, s, lr)
            paths[name] = save_model(model, root / name.replace(" ", "_"))
        start = time.perf_counter()
        align = write(root / "align.safetensors", (parts["val"][0][:512], parts["val"][1][:512]))
        routes = fusion_routes([paths["parent A"], paths["parent B"]], root, align, None)
        cost["fusion (all routes)"] = time.perf_counter() - start
        masses, changed = mass_routes([paths["parent A"], paths["parent B"]], root, align)
        mass_changes.append(changed)
        routes.update(masses)
        ft_data = parts["train"]
        for name in ("vanilla average", "OT weights (exact)", "parent A"):
            src = routes.get(name, paths.get(name))
            paths[f"{name} + fine-tune"] = finetuned(src, root / f"ft_{len(paths)}", scale, ft_data, ft_steps,
                                                     seed + 3000, lr)
        import otfuse_cli as otf

        hetero = root / "hetero"
        otf.fuse([str(paths["parent A"]), str(paths["wide parent"])], str(hetero))
        paths["wide → narrow OT"] = hetero
        paths["wide → narrow OT + fine-tune"] = finetuned(hetero, root / "hetero_ft", scale, ft_data, ft_steps,
                                                           seed + 3000, lr)
        scratch = make_model(scale, seed + 4000)
        fit(scratch, scale, ft_data, ft_steps, seed + 4000, lr)
        paths["narrow from scratch (fine-tune steps)"] = save_model(scratch, root / "scratch")
        models = {"parent A": paths.pop("parent A"), "parent B": paths.pop("parent B"), **routes, **paths}
        record = {f"{k}|test": v for k, v in score(models, files["test"], ensemble=(0, 1)).items()}
        runs.append(record)
        timing.append(cost)
    rows = ["parent A", "parent B", "ensemble", "vanilla average", "OT weights (exact)", "OT weights (sinkhorn)",
            "OT activations",
            "OT weights, l1 masses", "OT weights, l2 masses", "OT activations (raw)",
            "OT activations, activation masses", "vanilla average + fine-tune", "OT weights (exact) + fine-tune", "parent A + fine-tune", "wide parent",
            "wide → narrow OT", "wide → narrow OT + fine-tune", "narrow from scratch (fine-tune steps)"]
    return {"study": "vision", "runs": runs, "rows": rows, "columns": ["test"], "timing": timing,
            "mass_changes": mass_changes, "lr": lr,
            "lr_validation": {str(k): v for k, v in choice.items()}, "scale": scale.__dict__,
            "steps": steps, "finetune_steps": ft_steps, "sizes": {k: len(v[0]) for k, v in parts.items()},
            "dropped_near_duplicates": dropped}
