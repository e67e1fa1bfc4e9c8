"""Evaluation data, task detection and per-task scoring of runnable models.

Each scorer takes [(name, RunnableModel)] and the loaded data and returns (rows, notes): one row of
metrics per model, plus an "ensemble" row when asked (classification: mean probabilities; causal LM:
mean next-token probabilities, which needs identical tokenization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from otfuse_cli.data import (batched, fields_of, is_tensor_file, load_records, load_tensors, require_fields,
                             source_summary, tokenize_texts)
from otfuse_cli.errors import OtfuseError
from otfuse_cli.evaluation import metrics as M

TASK_METRICS: dict[str, list[str]] = {
    "classification": ["accuracy", "f1_weighted", "f1_macro", "ece", "nll"],
    "lm": ["perplexity", "tokens"],
    "mlm": ["mlm_accuracy", "pseudo_perplexity", "tokens"],
    "translation": ["bleu", "chrf"],
}
TASK_CHOICES = ("auto", *TASK_METRICS)
MASK_RATE = 0.15
ENSEMBLE = "ensemble"


@dataclass
class EvalData:
    path: Path
    records: list[dict[str, Any]] | None = None
    tensors: dict[str, torch.Tensor] | None = None
    fields: list[str] = field(default_factory=list)
    source: dict = field(default_factory=dict)  # a table's split and files (data.source_summary)

    @property
    def samples(self) -> int:
        return len(self.records) if self.records is not None else int(self.tensors["x"].shape[0])

    def column(self, name: str) -> list:
        return [r[name] for r in self.records]

    def texts(self, name: str) -> list[str]:
        out = []
        for i, r in enumerate(self.records, 1):
            v = r[name]
            if not isinstance(v, str):
                raise OtfuseError(f"{self.path}: record {i}: field {name!r} must be a string, got {type(v).__name__}")
            out.append(v)
        return out


def load_eval_data(path: str | Path, *, max_samples: int | None = None, seed: int = 0,
                   columns: dict[str, str] | None = None, split: str | None = None) -> EvalData:
    """The data file's records or tensors. columns {standard field: the file's column} (e.g. {"source": "en",
    "target": "de"}) reads a file's own column names as the fields the tasks expect. split: the split of a
    DatasetDict folder, a folder of split shards or a cached dataset id (data.load_records)."""
    path = Path(path)
    columns = {k: v for k, v in (columns or {}).items() if v}
    if is_tensor_file(path) and split is None:
        if columns:
            raise OtfuseError(f"{path}: --source-field/--target-field name columns of text records, not arrays")
        t = load_tensors(path, max_samples=max_samples, seed=seed)
        return EvalData(path, tensors=t, fields=sorted(t))
    recs = load_records(path, max_samples=max_samples, seed=seed, split=split)
    if columns:
        require_fields(recs, list(columns.values()), path)
        recs = [{**r, **{field: r[col] for field, col in columns.items()}} for r in recs]
    return EvalData(path, records=recs, fields=fields_of(recs), source=source_summary(path, split))


def _describe_heads(name: str, m) -> str:
    arch = (getattr(m.config, "architectures", None) or [type(m.module).__name__])[0] if m.config else m.kind
    return f"model {name!r} ({arch}, heads: {', '.join(sorted(m.task_heads)) or 'none'})"


def resolve_task(task: str, data: EvalData, models: list[tuple[str, Any]]) -> str:
    """The concrete task: explicit, or from the data fields and model heads; checks every model has the head."""
    if task not in TASK_CHOICES:
        raise OtfuseError(f"unknown task {task!r} (expected one of {', '.join(TASK_CHOICES)})")
    f = set(data.fields)
    if task == "auto":
        if data.tensors is not None:
            if "y" not in f:
                raise OtfuseError(f"{data.path}: no usable field: tensor data needs labels 'y' next to 'x' "
                                  f"(arrays present: {', '.join(data.fields)})")
            task = "classification"
        elif "label" in f:
            task = "classification"
        elif {"source", "target"} <= f:
            task = "translation"
        elif "text" in f:
            task = "lm"
        else:
            raise OtfuseError(f"{data.path}: no usable field: expected 'label' (classification), 'source'+'target' "
                              f"(translation) or 'text' (language modelling); fields present: {', '.join(data.fields)}")
    if task == "lm" and models and all("mlm" in m.task_heads and "lm" not in m.task_heads for _, m in models):
        task = "mlm"  # masked LMs score text with MLM accuracy / pseudo-perplexity
    for name, m in models:
        if task not in m.task_heads:
            raise OtfuseError(f"{_describe_heads(name, m)} has no head for {task}"
                              + ("; use a *ForSequenceClassification checkpoint" if task == "classification" else ""))
    need = {"classification": ["x", "y"] if data.tensors is not None else ["text", "label"],
            "lm": ["text"], "mlm": ["text"], "translation": ["source", "target"]}[task]
    if data.tensors is not None:
        if task != "classification":
            raise OtfuseError(f"{data.path}: tensor data can only be used for classification, not {task}")
        missing = [k for k in need if k not in f]
        if missing:
            raise OtfuseError(f"{data.path}: missing array {missing[0]!r}; arrays present: {', '.join(data.fields)}")
    else:
        require_fields(data.records, need, data.path)
    return task


def _text_model(name: str, m, data: EvalData):
    if m.kind != "hf":
        raise OtfuseError(f"model {name!r} is a bare {m.kind} state dict: it takes tensor data (.npz/.safetensors), "
                          f"not text from {data.path.name}")
    return m.require_tokenizer()


# --------------------------------------------------------------------------- classification

def _label_set(m) -> str:
    names = [n for n, _ in sorted(m.label2id.items(), key=lambda kv: kv[1])]
    if names and names != [f"LABEL_{i}" for i in range(len(names))]:
        return "{" + ", ".join(names) + "}"
    return f"{{0..{m.num_labels - 1}}}"


def _gold_ids(name: str, m, data: EvalData) -> np.ndarray:
    k = m.num_labels
    if data.tensors is not None:
        y = data.tensors["y"]
        if y.is_floating_point() or y.dtype == torch.bool:
            if not torch.equal(y, y.round()):
                raise OtfuseError(f"{data.path}: labels 'y' must be integers, got {y.dtype}")
        y = y.long()
        bad = ((y < 0) | (y >= k)).nonzero()
        if len(bad):
            raise OtfuseError(f"{data.path}: label {int(y[bad[0, 0]])} is not in the label set of model {name!r}, {_label_set(m)}")
        return y.numpy()
    l2id = m.label2id
    lower = {n.lower(): i for n, i in l2id.items()}
    out = []
    for i, r in enumerate(data.records, 1):
        v = r["label"]
        idx = None
        if isinstance(v, bool):
            idx = None
        elif isinstance(v, int):
            idx = v
        elif isinstance(v, float) and v.is_integer():
            idx = int(v)
        elif isinstance(v, str):
            s = v.strip()
            if s in l2id:
                idx = l2id[s]
            elif s.lower() in lower:
                idx = lower[s.lower()]
            elif s.lstrip("-").isdigit():
                idx = int(s)
        if idx is None or not 0 <= idx < k:
            raise OtfuseError(f"{data.path}: record {i}: label {v!r} is not in the label set of model {name!r}, {_label_set(m)}")
        out.append(idx)
    return np.asarray(out, dtype=np.int64)


def class_probs(m, data: EvalData, *, batch_size: int, max_length: int, name: str = "model") -> np.ndarray:
    """Softmax probabilities (float64, N x K) of one model on the data."""
    chunks = []
    if data.tensors is not None:
        if m.kind == "hf" and getattr(m.module, "main_input_name", "input_ids") != "pixel_values":
            raise OtfuseError(f"model {name!r} is a text model; {data.path.name} holds tensors, not text")
        x = data.tensors["x"]
        for s in batched(len(x), batch_size):
            chunks.append(_softmax64(_run(name, m, x[s])))
    else:
        tok = _text_model(name, m, data)
        texts = data.texts("text")
        pairs = data.texts("text_pair") if "text_pair" in data.fields else None
        ml = m.token_limit(max_length)
        for s in batched(len(texts), batch_size):
            enc = tokenize_texts(tok, texts[s], pairs[s] if pairs else None, max_length=ml)
            chunks.append(_softmax64(_run(name, m, enc)))
    return np.concatenate(chunks)


def _run(name: str, m, batch) -> torch.Tensor:
    try:
        logits = m.predict_logits(batch)
    except OtfuseError as e:  # the runnable's own line (inputs that do not fit), with the row's name
        raise OtfuseError(f"model {name!r} cannot run on this data: {e}") from None
    if not torch.isfinite(logits).all():  # every metric would be NaN: say why instead of printing it
        raise OtfuseError(f"model {name!r} gives NaN or Inf outputs on this data (its weights hold non-finite "
                          "values or overflow)")
    return logits


def _softmax64(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), dim=-1).cpu().numpy()


def ensemble_members(ensemble, count: int) -> list[int]:
    """`ensemble` is True (every model) or the indices of the models to ensemble (e.g. only the parents)."""
    return list(range(count)) if ensemble is True else list(ensemble)


def score_classification(models, data: EvalData, *, batch_size=32, max_length=256, ensemble=False, **_):
    ks = {name: m.num_labels for name, m in models}
    if len(set(ks.values())) > 1:
        raise OtfuseError("models have different label counts: " + ", ".join(f"{n}={k}" for n, k in ks.items()))
    golds = {name: _gold_ids(name, m, data) for name, m in models}
    first = models[0][0]
    for name in golds:
        if not np.array_equal(golds[name], golds[first]):
            raise OtfuseError(f"models {first!r} and {name!r} map the label names to different class ids "
                              "(label2id differs)")
    labels = golds[first]
    rows, all_probs = [], []
    for name, m in models:
        probs = class_probs(m, data, batch_size=batch_size, max_length=max_length, name=name)
        all_probs.append(probs)
        rows.append({"model": name, **M.classification_metrics(probs, labels)})
    if ensemble:
        members = [all_probs[i] for i in ensemble_members(ensemble, len(models))]
        rows.append({"model": ENSEMBLE, **M.classification_metrics(np.mean(members, axis=0), labels)})
    m0 = models[0][1]
    names = [n for n, _ in sorted(m0.label2id.items(), key=lambda kv: kv[1])]
    notes = {"ece_bins": M.ECE_BINS, "num_labels": int(ks[first])}
    if names:
        notes["labels"] = names
    if ensemble:
        notes["ensemble"] = "mean of the models' class probabilities"
    return rows, notes


# --------------------------------------------------------------------------- language modelling

def causal_token_logprobs(m, texts: list[str], *, batch_size=32, max_length=256, name="model"):
    """Per text: (token ids scored, log-probability of each given its prefix). Padding excluded."""
    tok = m.require_tokenizer()
    ml = m.token_limit(max_length)
    out = []
    for s in batched(len(texts), batch_size):
        enc = tokenize_texts(tok, texts[s], max_length=ml, padding_side="right")
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        logits = _run(name, m, enc)
        ids, att = enc["input_ids"].to(logits.device), enc["attention_mask"].to(logits.device).bool()
        lp = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        keep = att[:, 1:] & att[:, :-1]
        for i in range(len(ids)):
            out.append((ids[i, 1:][keep[i]].cpu().numpy(), lp[i][keep[i]].cpu().numpy()))
    return out


def score_lm(models, data: EvalData, *, batch_size=32, max_length=256, ensemble=False, **_):
    texts = data.texts("text")
    rows, per_model = [], []
    for name, m in models:
        _text_model(name, m, data)
        scored = causal_token_logprobs(m, texts, batch_size=batch_size, max_length=max_length, name=name)
        per_model.append(scored)
        rows.append(_lm_row(name, np.concatenate([lp for _, lp in scored])))
    if ensemble:
        ref = per_model[0]
        for (name, _), scored in zip(models[1:], per_model[1:]):
            if any(not np.array_equal(a[0], b[0]) for a, b in zip(ref, scored)):
                raise OtfuseError(f"--ensemble needs identical tokenization; model {name!r} tokenizes the texts differently")
        # Averaging the full next-token distributions and reading the true token = averaging its probabilities.
        lps = [np.concatenate([lp for _, lp in per_model[i]]) for i in ensemble_members(ensemble, len(models))]
        rows.append(_lm_row(ENSEMBLE, np.logaddexp.reduce(np.stack(lps), axis=0) - math.log(len(lps))))
    notes = {"perplexity": "exp of the token-weighted mean NLL over all texts; padding excluded",
             "max_length": int(max_length)}
    if ensemble:
        notes["ensemble"] = "mean of the models' next-token probabilities"
    return rows, notes


def _lm_row(name: str, lp: np.ndarray) -> dict:
    if lp.size == 0:
        raise OtfuseError("no tokens to score: every text is a single token long")
    return {"model": name, "perplexity": M.perplexity(float(-lp.sum()), int(lp.size)), "tokens": int(lp.size)}


def mlm_scores(m, texts: list[str], *, batch_size=32, max_length=256, seed=0, name="model"):
    """(total NLL, correct, masked tokens): mask 15% of non-special tokens of each text (seeded per text)."""
    tok = m.require_tokenizer()
    if tok.mask_token_id is None:
        raise OtfuseError(f"model {name!r}'s tokenizer has no mask token")
    ml = m.token_limit(max_length)
    total, correct, count = 0.0, 0, 0
    for s in batched(len(texts), batch_size):
        enc = tokenize_texts(tok, texts[s], max_length=ml, return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask").bool()
        ids = enc["input_ids"]
        cand = enc["attention_mask"].bool() & ~special
        masked = torch.zeros_like(cand)
        for i, j in enumerate(range(s.start, s.stop)):
            pos = cand[i].nonzero().squeeze(-1)
            if len(pos) == 0:
                continue
            # One generator per text: the masks do not depend on batch size or order.
            r = torch.rand(len(pos), generator=torch.Generator().manual_seed(seed * 1_000_003 + j))
            pick = pos[r < MASK_RATE]
            masked[i, pick if len(pick) else pos[r.argmin()]] = True  # at least one masked token per text
        gold = ids[masked]
        enc["input_ids"] = ids.masked_fill(masked, tok.mask_token_id)
        logits = _run(name, m, enc)
        lp = torch.log_softmax(logits[masked.to(logits.device)].double(), dim=-1).cpu()
        total += float(-lp.gather(-1, gold[:, None]).sum())
        correct += int((lp.argmax(-1) == gold).sum())
        count += int(gold.numel())
    return total, correct, count


def score_mlm(models, data: EvalData, *, batch_size=32, max_length=256, seed=0, ensemble=False, **_):
    if ensemble:
        raise OtfuseError("--ensemble is supported for classification, causal language modelling and translation")
    texts = data.texts("text")
    rows = []
    for name, m in models:
        _text_model(name, m, data)
        total, correct, count = mlm_scores(m, texts, batch_size=batch_size, max_length=max_length, seed=seed, name=name)
        if count == 0:
            raise OtfuseError(f"{data.path}: no maskable tokens in the texts")
        rows.append({"model": name, "mlm_accuracy": correct / count,
                     "pseudo_perplexity": M.perplexity(total, count), "tokens": count})
    return rows, {"mask_rate": MASK_RATE, "mask_seed": int(seed),
                  "pseudo_perplexity": "exp of the mean NLL of the masked tokens (all replaced by the mask token)"}


# --------------------------------------------------------------------------- translation

def score_translation(models, data: EvalData, *, batch_size=32, max_length=256, num_beams=1, ensemble=False,
                      progress=None, **_):
    """BLEU and chrF (sacrebleu, with each row's signatures) of every model's translations, and of the
    ensemble's (mean next-token probabilities, same search) when asked. progress advances once per batch."""
    from otfuse_cli.evaluation.generation import translate

    if num_beams < 1:
        raise OtfuseError(f"num_beams must be at least 1, got {num_beams}")
    sources, targets = data.texts("source"), data.texts("target")
    runs = [(name, [m]) for name, m in models]
    if ensemble:
        runs.append((ENSEMBLE, [models[i][1] for i in ensemble_members(ensemble, len(models))]))
    rows = []
    for name, members in runs:
        for m in members:
            _text_model(name, m, data)
        hyps = translate(members, sources, batch_size=batch_size, max_length=max_length, num_beams=num_beams,
                         name=name, on_batch=progress.advance if progress is not None else None)
        b, bsig = M.bleu(hyps, targets)
        c, csig = M.chrf(hyps, targets)
        rows.append({"model": name, "bleu": b, "chrf": c, "signatures": {"bleu": bsig, "chrf": csig}})
    notes = {"num_beams": int(num_beams), "decoding": "greedy" if num_beams == 1 else f"beam search ({num_beams})",
             "max_new_tokens": int(max_length)}
    if ensemble:
        notes["ensemble"] = "mean of the models' next-token probabilities at every step, same search"
    return rows, notes


SCORERS = {"classification": score_classification, "lm": score_lm, "mlm": score_mlm, "translation": score_translation}


def score(task: str, models, data: EvalData, **opts) -> tuple[list[dict], dict]:
    return SCORERS[task](models, data, **opts)
