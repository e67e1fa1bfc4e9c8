"""Activation-based unit features: neurons are matched by what they do on the same sample inputs.

Every module that *produces* a space (an "out" entry: Linear/Conv/Embedding/norm weights) is hooked; its
output, restricted to the entry's slice, is in that space's basis. Rows are samples: tokens (padding
excluded) or spatial positions; a seeded subset of at most --max-tokens rows is kept per hook, so memory
is bounded by max_tokens x total width. Costs are then built by the same code as weight-based ones."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from otfuse_cli.alignment.cost import FeaturePair
from otfuse_cli.alignment.metrics import STANDARDIZE
from otfuse_cli.alignment.weights import TensorSource
from otfuse_cli.checkpoint import sha256_file
from otfuse_cli.data import (counting_truncation, is_tensor_file, load_records, load_tensors, tokenize_targets,
                             tokenize_texts, truncation_note)
from otfuse_cli.errors import OtfuseError
from otfuse_cli.options import DataOptions
from otfuse_cli.runnable import load_runnable, resolve_device
from otfuse_cli.arch.model import Spec

CHANNEL_FIRST = (nn.Conv2d, nn.BatchNorm2d, nn.Conv1d, nn.BatchNorm1d)
ACTIVATIONS = {"relu": torch.relu, "gelu": nn.functional.gelu, "tanh": torch.tanh}


def sample_batches(model, data: str, samples: int, seed: int, max_length: int, batch_size: int = 32,
                   label: str = "the model"):
    """Batches of model inputs (fixed order) and, for token inputs, a tuple of token masks (the source's, and
    for an encoder-decoder given targets the decoder's: see mask_for). Texts cut to the
    model's position limit (or max_length) are counted and said in one `note:` line naming `label`."""
    if samples < 1:
        raise OtfuseError(f"--samples must be at least 1, got {samples}")
    if is_tensor_file(data):
        x = load_tensors(data, max_samples=samples, seed=seed)["x"].float()
        if model.input_shape and x[0].numel() != torch.Size(model.input_shape).numel():
            raise OtfuseError(f"{data}: samples of shape {tuple(x.shape[1:])} do not fit the model's input "
                              f"{model.input_shape}")
        return [(x[i:i + batch_size], None) for i in range(0, len(x), batch_size)]
    records = load_records(data, max_samples=samples, seed=seed)
    field = next((f for f in ("text", "source", "sentence") if all(f in r for r in records)), None)
    if field is None:
        raise OtfuseError(f"{data}: no 'text' field in every record; fields present: {', '.join(records[0]) or 'none'}")
    tokenizer = model.require_tokenizer()
    texts = [str(r[field]) for r in records]
    # An encoder-decoder's decoder runs on the target sentences when the records have them (teacher forcing,
    # as in training); without targets on the source itself (BART's own default; Marian has none).
    seq2seq = is_seq2seq(model)
    targets = [str(r["target"]) for r in records] if seq2seq and field == "source" and all(
        "target" in r for r in records) else None
    max_length = model.token_limit(max_length)  # GPT-2 with 64 positions must not see 128 tokens
    batches = []
    with counting_truncation() as cut:
        for i in range(0, len(texts), batch_size):
            enc = tokenize_texts(tokenizer, texts[i:i + batch_size], max_length=max_length)
            if "token_type_ids" not in getattr(tokenizer, "model_input_names", []):
                enc.pop("token_type_ids", None)  # e.g. GPT-2 and Llama forwards reject them
            if not seq2seq:
                batches.append((enc, (enc["attention_mask"].bool(),)))
                continue
            # room for the start token: the decoder has max_length positions too
            target = enc if targets is None else tokenize_targets(tokenizer, targets[i:i + batch_size],
                                                                  max(1, max_length - 1))
            dec = decoder_inputs(model, target, avoid_length=enc["input_ids"].shape[1], limit=max_length)
            batches.append(({**enc, **dec}, (enc["attention_mask"].bool(), dec["decoder_attention_mask"].bool())))
    if note := truncation_note(cut, "sample texts"):
        from otfuse_cli.report import note_line

        note_line(f"{label}: {note} (its position limit or --max-length)")
    return batches


def is_seq2seq(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def decoder_inputs(model, target: dict, avoid_length: int, limit: int) -> dict[str, torch.Tensor]:
    """Teacher-forced decoder inputs for tokenized targets: the decoder's start token, then every target
    token (the model's own right shift, as its loss uses, of the targets plus one pad column, so each row's
    last token is read too), at most `limit` positions. Of a length other than the source's, so that a hook
    can tell source rows (encoder, cross-attention keys/values) from target rows by shape."""
    labels, keep = target["input_ids"][:, :limit - 1], target["attention_mask"][:, :limit - 1]
    extra = 1
    if labels.shape[1] + 1 == avoid_length:  # one pad column more, or where that would not fit one token less
        if labels.shape[1] + 2 <= limit or labels.shape[1] == 1:
            extra = 2
        else:
            labels, keep = labels[:, :-1], keep[:, :-1]
    labels = torch.cat([labels, labels.new_full((len(labels), extra), model.module.config.pad_token_id)], 1)
    keep = torch.cat([keep, keep.new_zeros((len(keep), extra))], 1)
    ids = model.module.prepare_decoder_input_ids_from_labels(labels=labels)
    mask = torch.cat([torch.ones_like(keep[:, :1]), keep[:, :-1]], 1)  # the start token, then the targets
    return {"decoder_input_ids": ids, "decoder_attention_mask": mask}


def mask_for(masks, out: torch.Tensor) -> torch.Tensor | None:
    """The token mask (of a batch's masks: one, or source and target for an encoder-decoder) whose shape is
    out's (batch, tokens); None when none fits (not per-token rows)."""
    return next((m for m in masks if tuple(out.shape[:2]) == tuple(m.shape)), None)


def loaded_names(module: nn.Module, tensors: list[str]) -> dict[str, str]:
    """Checkpoint tensor name -> the name it has inside the loaded module. transformers 5 renames some
    families on load (ViT's attention.attention.query -> attention.q_proj); ask it how."""
    mapping = {t: t for t in tensors}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(module)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
        meta = dict(module.state_dict())
        for t in tensors:
            mapping[t] = rename_source_key(t, renamings, converters, getattr(module, "base_model_prefix", None),
                                           meta)[0]
    except Exception:  # bare modules, or a transformers without conversion mappings: names are the same
        pass
    return mapping


class Recorder:
    """Forward hooks that keep a seeded sample of at most max_tokens rows of each producer's output.

    Sampling happens as batches arrive (each row gets a random key, the rows with the smallest keys are
    kept), so memory stays at max_tokens + one batch per hook. Keys come from a generator seeded the same
    way for every model and rows arrive in the same order, so all models keep the same rows."""

    def __init__(self, module: nn.Module, tensors: list[str], max_tokens: int, seed: int, post_fn=None):
        self.max_tokens, self.seed, self.post_fn = max_tokens, seed, post_fn
        self.kept: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # rows, keys, row numbers
        self.seen: dict[str, int] = {}
        self.gens: dict[str, torch.Generator] = {}
        self.peak_rows = 0
        self.masks: tuple[torch.Tensor, ...] | None = None  # the batch's token masks (see mask_for)
        self.handles = []
        modules = dict(module.named_modules())
        for tensor, loaded in loaded_names(module, tensors).items():
            name, inside = module_of(tensor), module_of(loaded)
            if inside in modules and not any(h[0] == name for h in self.handles):
                hook = modules[inside].register_forward_hook(self._hook(name, modules[inside]))
                self.handles.append((name, hook))

    def _hook(self, name: str, mod: nn.Module):
        def hook(_mod, _inp, out):
            out = out[0] if isinstance(out, tuple) else out
            if not isinstance(out, torch.Tensor) or out.dim() < 2:
                return
            if isinstance(mod, CHANNEL_FIRST):
                out = out.movedim(1, -1)
            if self.post_fn is not None:
                out = self.post_fn(out)
            if self.masks is not None and out.dim() == 2 and out.shape[0] == self.masks[0].shape[0]:
                pass  # one row per sequence (a pooler): every row counts
            elif self.masks is not None:
                mask = mask_for(self.masks, out)
                if mask is None:
                    return  # e.g. position embeddings computed once per batch: not per-token rows
                out = out[mask]
            self._keep(name, out.reshape(-1, out.shape[-1]).detach().float())
        return hook

    def _keep(self, name: str, rows: torch.Tensor) -> None:
        gen = self.gens.setdefault(name, torch.Generator().manual_seed(self.seed))
        start = self.seen.get(name, 0)
        self.seen[name] = start + len(rows)
        keys, numbers = torch.rand(len(rows), generator=gen), torch.arange(start, start + len(rows))
        if name in self.kept:
            old_rows, old_keys, old_numbers = self.kept[name]
            rows, keys, numbers = torch.cat([old_rows, rows]), torch.cat([old_keys, keys]), torch.cat([old_numbers, numbers])
        self.peak_rows = max(self.peak_rows, len(rows))
        if len(rows) > self.max_tokens:
            pick = torch.topk(keys, self.max_tokens, largest=False).indices
            rows, keys, numbers = rows[pick.to(rows.device)], keys[pick], numbers[pick]
        self.kept[name] = (rows, keys, numbers)

    def close(self) -> dict[str, torch.Tensor]:
        for _, h in self.handles:
            h.remove()
        # rows in the order they arrived, identical across models
        return {name: rows[numbers.argsort().to(rows.device)] for name, (rows, _, numbers) in self.kept.items()}


def module_of(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0] if "." in tensor else ""


def collect(ckpt, spec: Spec, *, data: str, samples: int, seed: int, max_tokens: int, activation: str | None,
            post_activation: bool, max_length: int, device: str,
            on_batch: Callable[[int, int], None] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Producer outputs on the sample inputs, {module name: (rows, features)}, and the most rows any hook
    held at once (memory is bounded by max_tokens plus one batch). on_batch(done, batches) follows each
    forward pass."""
    model = load_runnable(ckpt, activation=activation, device=resolve_device(device))
    names = sorted({e.tensor for s in spec.spaces for e in s.entries if e.role == "out"})
    post = None
    if post_activation and model.kind in ("mlp", "cnn", "resnet"):
        post = ACTIVATIONS[activation or (ckpt.metadata or {}).get("otfuse.activation", "relu")]
    recorder = Recorder(model.module, names, max_tokens, seed, post)
    try:
        with torch.no_grad():
            batches = sample_batches(model, data, samples, seed, max_length, label=str(ckpt.path))
            for done, (batch, mask) in enumerate(batches, 1):
                recorder.masks = tuple(m.to(model.device) for m in mask) if mask is not None else None
                if isinstance(batch, dict):
                    model.module(**{k: v.to(model.device) for k, v in batch.items()})
                else:
                    model.predict_logits(batch)
                if on_batch:
                    on_batch(done, len(batches))
    except RuntimeError as exc:
        recorder.close()
        raise OtfuseError(f"the sample inputs do not fit the model: {str(exc).splitlines()[0]}") from None
    acts = recorder.close()
    for module, x in acts.items():  # finite inputs can still overflow (pixels of 1e38): say so, not crash later
        if not bool(torch.isfinite(x).all()):
            raise OtfuseError(f"{ckpt.path}: activations of module {module!r} overflow to NaN or Inf on "
                              f"{data}; check the data's scale")
    return acts, recorder.peak_rows


def data_info(data: DataOptions) -> dict:
    """What produced activation-based plans (recorded in plan files and provenance)."""
    return {"file": str(data.data), "sha256": sha256_file(data.data), "samples": data.samples, "seed": data.seed,
            "max_tokens": data.max_tokens, "standardize": data.standardize or "zscore",
            "post_activation": bool(data.post_activation)}


def _for(on_batch, source: TensorSource):
    """on_batch bound to one model's label (None stays None)."""
    return (lambda done, batches: on_batch(source.label, done, batches)) if on_batch else None


class ActivationFeatures:
    """Feature provider for the engine; activations do not depend on other plans (no refinement)."""

    needs_refinement = False

    def __init__(self, anchor_spec: Spec, parent_spec: Spec, anchor: TensorSource, parent: TensorSource,
                 data: DataOptions, on_batch: Callable[[str, int, int], None] | None = None, l1: bool = True):
        """on_batch(model label, done, batches) follows every forward pass of either model."""
        self.anchor_spec, self.parent_spec, self.how = anchor_spec, parent_spec, data.standardize or "zscore"
        self.l1 = l1  # keep L1 norms of folded features (only --marginals l1 reads them)
        collect_options = data.collect()
        cache = anchor.__dict__.setdefault("_activations", {})
        key = repr(sorted(collect_options.items()))
        if key not in cache:  # the anchor runs once however many parents there are
            cache[key] = collect(anchor.ckpt, anchor_spec, **collect_options, on_batch=_for(on_batch, anchor))[0]
        self.anchor_acts = cache[key]
        self.parent_acts, self.peak_rows = collect(parent.ckpt, parent_spec, **collect_options,
                                                   on_batch=_for(on_batch, parent))

    def _unit_rows(self, acts, entry, size):
        """An "out" entry's slice of its module's output features: (units, rep, inner, rows)."""
        x = acts.get(module_of(entry.tensor))
        if x is None or x.shape[1] < entry.start + entry.span(size):
            return None
        x = STANDARDIZE[self.how](x[:, entry.start:entry.start + entry.span(size)])
        return x.reshape(len(x), size, entry.rep, entry.inner).permute(1, 2, 3, 0)

    def features(self, k: int, plans: dict, first_pass: bool, fold: bool = True) -> FeaturePair:
        sa, sp = self.anchor_spec.spaces[k], self.parent_spec.spaces[k]
        pair = FeaturePair(fold, l1=self.l1)
        seen = set()
        for ep, ea in zip(sp.entries, sa.entries):
            module = module_of(ep.tensor)
            if ep.role != "out" or (module, ep.start) in seen:
                continue  # weight and bias of one module give one output
            seen.add((module, ep.start))
            up = self._unit_rows(self.parent_acts, ep, sp.size)
            ua = self._unit_rows(self.anchor_acts, ea, sa.size)
            if up is None or ua is None or up.shape[1:] != ua.shape[1:]:
                continue
            pair.add(ep, up, ea, ua)
        for module, _ in seen:  # each space is solved once: release the parent's rows
            self.parent_acts.pop(module, None)
        return pair
