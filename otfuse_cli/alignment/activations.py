"""Activation-based unit features: neurons are matched by what they do on the same sample inputs.

Every module that *produces* a space (an "out" entry: Linear/Conv/Embedding/norm weights) is hooked; its
output, restricted to the entry's slice, is in that space's basis. Rows are samples: tokens (padding
excluded) or spatial positions; a seeded choice of at most --max-tokens rows per module enters the costs.
No raw activations are kept: a first pass gives each feature's moments over those rows (the
standardisation), a second runs both models side by side and adds each batch's chosen rows into the costs'
sufficient statistics (cross terms, norms, head grams), so memory is those statistics plus one batch.
Costs are then built by the same code as weight-based ones (ActivationFeatures). Under torchrun each rank
runs its share of the batches (otfuse_cli.distributed) and the moments and sufficient statistics of every
rank are summed before any cost is built."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from otfuse_cli import distributed, interrupts
from otfuse_cli.alignment.cost import FeaturePair
from otfuse_cli.alignment.metrics import STANDARDIZE
from otfuse_cli.alignment.weights import TensorSource, WeightFeatures
from otfuse_cli.data import (counting_truncation, is_tensor_file, load_records, load_tensors, source_record,
                             tokenize_targets, tokenize_texts, truncation_note)
from otfuse_cli.errors import OtfuseError
from otfuse_cli.options import DataOptions
from otfuse_cli.runnable import load_runnable, resolve_device
from otfuse_cli.arch.model import Spec

CHANNEL_FIRST = (nn.Conv2d, nn.BatchNorm2d, nn.Conv1d, nn.BatchNorm1d)
ACTIVATIONS = {"relu": torch.relu, "gelu": nn.functional.gelu, "tanh": torch.tanh}


def sample_batches(model, data: str, samples: int, seed: int, max_length: int, batch_size: int = 32,
                   label: str = "the model", split: str | None = None, say_truncation: bool = True):
    """Batches of model inputs (fixed order) and, for token inputs, a tuple of token masks (the source's, and
    for an encoder-decoder given targets the decoder's: see mask_for). Texts cut to the
    model's position limit (or max_length) are counted and said in one `note:` line naming `label` (unless a
    step that runs the models again on the same texts says it was said already: say_truncation=False)."""
    if samples < 1:
        raise OtfuseError(f"--samples must be at least 1, got {samples}")
    if is_tensor_file(data) and split is None:
        x = load_tensors(data, max_samples=samples, seed=seed)["x"].float()
        if model.input_shape and x[0].numel() != torch.Size(model.input_shape).numel():
            raise OtfuseError(f"{data}: samples of shape {tuple(x.shape[1:])} do not fit the model's input "
                              f"{model.input_shape}")
        return [(x[i:i + batch_size], None) for i in range(0, len(x), batch_size)]
    records = load_records(data, max_samples=samples, seed=seed, split=split)
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
    if say_truncation and (note := truncation_note(cut, "sample texts")):
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


def mask_index(masks, out: torch.Tensor) -> int | None:
    """Which token mask (of a batch's masks: one, or source and target for an encoder-decoder) has out's
    (batch, tokens) shape; None when none fits (not per-token rows)."""
    return next((i for i, m in enumerate(masks) if tuple(out.shape[:2]) == tuple(m.shape)), None)


def mask_for(masks, out: torch.Tensor) -> torch.Tensor | None:
    """The token mask mask_index picks, or None."""
    i = mask_index(masks, out)
    return None if i is None else masks[i]


def loaded_names(module: nn.Module, tensors: list[str]) -> dict[str, str]:
    """Checkpoint tensor name -> the name it has inside the loaded module. transformers 5 renames some
    families on load (ViT's attention.attention.query -> attention.q_proj); ask it how."""
    mapping = {t: t for t in tensors}
    if getattr(module, "config", None) is None:  # a bare module (MLP, CNN): loaded as saved, and no 2.5 CPU-s
        return mapping                            # of importing transformers to be told so
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


class Tap:
    """Forward hooks on the modules that produce spaces: each call's output rows (tokens without padding,
    spatial positions, or one per sequence for a pooler), float32, go to sink(module name, rows, kind), where
    kind says what the rows are: "sequence" (one per sequence), "mask0"/"mask1" (the tokens of the batch's
    first or second mask) or "positions" (inputs without masks: a fixed number of rows per sample)."""

    def __init__(self, module: nn.Module, tensors: list[str], sink: Callable[[str, torch.Tensor, str], None],
                 post_fn=None):
        self.sink, self.post_fn = sink, post_fn
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
            kind = "positions"
            if self.masks is not None and out.dim() == 2 and out.shape[0] == self.masks[0].shape[0]:
                kind = "sequence"  # one row per sequence (a pooler): every row counts
            elif self.masks is not None:
                i = mask_index(self.masks, out)
                if i is None:
                    return  # e.g. position embeddings computed once per batch: not per-token rows
                kind = f"mask{i}"
                out = out[self.masks[i]]
            self.sink(name, out.reshape(-1, out.shape[-1]).detach().float(), kind)
        return hook

    def close(self) -> None:
        for _, h in self.handles:
            h.remove()


def module_of(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0] if "." in tensor else ""


def check_rows(label: str, module: str, rows: torch.Tensor) -> None:
    if not bool(torch.isfinite(rows).all()):  # finite inputs can still overflow (pixels of 1e38)
        raise OtfuseError(f"{label}: activations of module {module!r} overflow to NaN or Inf on the sample data; "
                          "check the data's scale")


class Moments:
    """Per producer module, each feature's mean and standard deviation over the rows that enter the costs
    (float64, merged batch by batch with Chan's update, which does not cancel the way sum(x²) - N·mean²
    does)."""

    def __init__(self, label: str):
        self.label = label
        self.sums: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}  # rows, mean, squared deviations

    def add(self, name: str, rows: torch.Tensor) -> None:
        check_rows(self.label, name, rows)
        if not len(rows):
            return
        x = rows.double()
        nb, mb = len(x), x.mean(0)
        m2b = ((x - mb) ** 2).sum(0)
        if name in self.sums:
            na, ma, m2a = self.sums[name]
            delta, n = mb - ma, na + nb
            mb, m2b, nb = ma + delta * (nb / n), m2a + m2b + delta * delta * (na * nb / n), n
        self.sums[name] = (nb, mb, m2b)

    def reduce(self) -> None:
        """Every rank's moments merged into the whole sample's (distributed.all_reduce_sums; nothing for one
        process): the total mean from the summed rows and sums, then each share's squared deviations moved to
        that mean (m2 + n·(mean - total mean)²) and summed: the parallel form of Chan's update."""
        rows = distributed.all_reduce_sums({(k, "n"): n for k, (n, _, _) in self.sums.items()})
        sums = distributed.all_reduce_sums({k: m * n for k, (n, m, _) in self.sums.items()})
        means = {k: s / rows[(k, "n")] for k, s in sums.items()}
        m2 = distributed.all_reduce_sums({k: m2 + n * (m - means[k]) ** 2 for k, (n, m, m2) in self.sums.items()})
        self.sums = {k: (rows[(k, "n")], means[k], m2[k]) for k in m2}

    def mean_std(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        n, mean, m2 = self.sums[name]
        return mean.float(), (m2 / max(n - 1, 1)).sqrt().float()


def batch_size(batch, masks) -> int:
    return len(batch) if masks is None else int(masks[0].shape[0])


def row_counts(rules: dict[str, list[tuple[str, int]]], batches: list) -> dict[str, list[list[int]]]:
    """Rows per module, batch and call, without running the model: each call's rule (what its rows are, and
    rows per sample for inputs without masks) was seen on the first batch and holds for every batch."""
    def rows(kind: str, per_sample: int, batch, masks) -> int:
        if kind.startswith("mask"):
            return int(masks[int(kind[4:])].sum())
        return per_sample * batch_size(batch, masks)
    return {name: [[rows(kind, per, batch, masks) for kind, per in calls] for batch, masks in batches]
            for name, calls in rules.items()}


def keep_masks(counts: dict[str, list[list[int]]], max_tokens: int, seed: int) -> dict[str, list[torch.Tensor]]:
    """Per module and batch, the rows that enter the costs: the max_tokens rows with the smallest keys of a
    generator seeded alike for every module and model, drawn call by call as rows arrive, so every model
    keeps the same tokens."""
    masks = {}
    for name, per_batch in counts.items():
        gen = torch.Generator().manual_seed(seed)
        keys = torch.cat([torch.rand(c, generator=gen) for calls in per_batch for c in calls])
        keep = torch.ones(len(keys), dtype=torch.bool)
        if len(keys) > max_tokens:
            keep = torch.zeros(len(keys), dtype=torch.bool)
            keep[torch.topk(keys, max_tokens, largest=False).indices] = True
        masks[name] = list(keep.split([sum(calls) for calls in per_batch]))
    return masks


def data_info(data: DataOptions) -> dict:
    """What produced activation-based plans (recorded in plan files and provenance)."""
    return {**source_record(data.data, data.split), "samples": data.samples, "seed": data.seed,
            "max_tokens": data.max_tokens, "standardize": data.standardize or "zscore",
            "post_activation": bool(data.post_activation), "world_size": distributed.world_size()}


# Bytes of cross-term statistics collected in one pass over the data; the spaces beyond it wait for another
# pass, so memory does not grow with the model (a 7B model's FFN statistics alone are 31 GB).
GROUP_BYTES = 1 << 30


class ActivationFeatures:
    """Feature provider for the engine; activations do not depend on other plans (no refinement).

    Two passes over the sample data, neither keeping raw activations. One forward pass of the first batch
    tells what each hooked module's rows are (tokens of which mask, sequences, positions per sample), which
    gives every batch's row counts and so the rows that enter the costs (at most max_tokens per module, the
    same tokens in every model). Then each model's per-feature moments over those rows: the standardisation
    (the anchor's once however many parents there are; none without one). Then both models run side by side,
    batch by batch, and each batch's kept rows go straight into the spaces' cross terms, norms and head grams
    (FeaturePair), so what is held is the statistics of the spaces in hand plus one batch. Spaces are taken
    in groups of at most GROUP_BYTES of statistics, one pass per group. Unfolded features (compress's
    clustering needs each unit's rows) are the kept rows themselves, grouped the same way."""

    needs_refinement = False

    def __init__(self, anchor_spec: Spec, parent_spec: Spec, anchor: TensorSource, parent: TensorSource,
                 data: DataOptions, on_batch: Callable[[str, int, int], None] | None = None, l1: bool = True,
                 covariance: bool = False):
        """on_batch(detail, done, total) follows every forward pass this provider makes (total: all of them).
        covariance: each space's pair also keeps both sides' row sums and Grams (--align cca)."""
        self.covariance = covariance
        self.anchor_spec, self.parent_spec, self.how = anchor_spec, parent_spec, data.standardize or "zscore"
        self.l1 = l1  # keep L1 norms of folded features (only --marginals l1 reads them)
        self.options, self.on_batch, self.done = data.collect(), on_batch, 0
        self.sources = {"anchor": anchor, "parent": parent}
        self.sides = ("anchor",) if parent is anchor else ("anchor", "parent")  # compress: one model, both sides
        self.specs = {"anchor": anchor_spec, "parent": parent_spec}
        self.models: dict = {}  # runnable models, loaded while passes remain
        self.batches: dict[str, list] = {}
        self.planned = 0  # forward passes planned so far (progress total)
        self.pairs: dict[int, FeaturePair] = {}
        self.groups: list[list[int]] | None = None
        self.anchor_module = {module_of(ep.tensor): module_of(ea.tensor) for sp, sa in
                              zip(parent_spec.spaces, anchor_spec.spaces) for ep, ea in zip(sp.entries, sa.entries)
                              if ep.role == "out"}
        cache = anchor.__dict__.setdefault("_activations", {})
        key = repr(sorted(self.options.items())) + self.how
        scaled = self.how != "none"  # rows used as they are need no moments pass
        self._plan((int(key not in cache) + len(self.sides) - 1) * int(scaled))
        if key not in cache:  # the anchor's batches, kept rows and moments: the same for every parent
            rules = self._rules("anchor")
            self.masks = keep_masks(row_counts(rules, self.batches["anchor"]), self.options["max_tokens"],
                                    self.options["seed"])
            cache[key] = (rules, self.masks, self.batches["anchor"], self._moments("anchor") if scaled else None)
        rules, self.masks, self.batches["anchor"], anchor_moments = cache[key]
        self.moments = {"anchor": anchor_moments}
        if parent is anchor:  # compress: one model on both sides
            self.moments["parent"], self.batches["parent"] = anchor_moments, self.batches["anchor"]
        else:
            counts = row_counts(rules, self.batches["anchor"])
            theirs = row_counts(self._rules("parent"), self.batches["parent"])
            for mp, ma in self.anchor_module.items():
                if theirs.get(mp) != counts.get(ma):
                    raise OtfuseError(f"module {mp!r} gives other numbers of activation rows than the anchor's "
                                      f"{ma!r} on the same samples; the models do not run alike")
            self.moments["parent"] = self._moments("parent") if scaled else None
        self.kept_rows = {name: int(sum(int(m.sum()) for m in ms)) for name, ms in self.masks.items()}
        self.peak_rows = 0  # the most rows of one module held at once (one batch's kept rows)
        self.weights: WeightFeatures | None = None  # tie_features' provider, built on first use

    # ------------------------------------------------------------ running the models

    def _plan(self, passes: int) -> None:
        """Add `passes` passes over the data to the progress total (batches are known after the first)."""
        self.planned += passes

    def _model(self, side: str):
        if side not in self.models:
            o = self.options
            self.models[side] = load_runnable(self.sources[side].ckpt, activation=o["activation"],
                                              device=resolve_device(o["device"]), device_map=o["device_map"])
        return self.models[side]

    def _post(self, side: str):
        model, o = self._model(side), self.options
        if o["post_activation"] and model.kind in ("mlp", "cnn", "resnet"):
            ckpt = self.sources[side].ckpt
            return ACTIVATIONS[o["activation"] or (ckpt.metadata or {}).get("otfuse.activation", "relu")]
        return None

    def _run(self, side: str, names: list[str], sink, what: str, first_only: bool = False):
        """A pass of one model over the batches (or only the first, uncounted), hooked on the modules of
        `names` (tensors), as a generator that yields after each batch; sink(module, rows, kind, batch
        number) takes every hooked output (Tap)."""
        model, label = self._model(side), self.sources[side].label.split(" (")[0]
        if side not in self.batches:
            o = self.options
            self.batches[side] = sample_batches(model, o["data"], o["samples"], o["seed"], o["max_length"],
                                                label=str(self.sources[side].ckpt.path), split=o.get("split"))
        # this rank's share of the batches (all of them in one process), each with its place in the whole list;
        # the first batch alone tells every rank the row rules
        batches = [(0, self.batches[side][0])] if first_only else distributed.shard(self.batches[side])
        current = [0]
        tap = Tap(model.module, names, lambda name, rows, kind: sink(name, rows, kind, current[0]),
                  self._post(side))
        try:
            for b, (batch, mask) in batches:
                interrupts.check()
                current[0] = b
                tap.masks = tuple(m.to(model.device) for m in mask) if mask is not None else None
                try:
                    with torch.no_grad():
                        if isinstance(batch, dict):
                            model.module(**{k: v.to(model.device) for k, v in batch.items()})
                        else:
                            model.predict_logits(batch)
                except RuntimeError as exc:
                    raise OtfuseError(f"the sample inputs do not fit the model: {str(exc).splitlines()[0]}") \
                        from None
                if not first_only:
                    self.done += 1
                    if self.on_batch:
                        self.on_batch(f"{label} {what} {b + 1}/{len(self.batches[side])}", self.done,
                                      self.planned * len(batches))
                yield b
        finally:
            tap.close()

    def _out_tensors(self, side: str) -> list[str]:
        return sorted({e.tensor for s in self.specs[side].spaces for e in s.entries if e.role == "out"})

    def _rules(self, side: str) -> dict[str, list[tuple[str, int]]]:
        """What each hooked call's rows are, from one forward pass of the first batch (see row_counts)."""
        rules: dict[str, list[tuple[str, int]]] = {}

        def sink(name, rows, kind, _batch):
            batch, masks = self.batches[side][0]
            per_sample = len(rows) // batch_size(batch, masks) if kind == "positions" else 1
            rules.setdefault(name, []).append((kind, per_sample))
        for _ in self._run(side, self._out_tensors(side), sink, "", first_only=True):
            pass
        return rules

    def _kept(self, side: str, name: str, x: torch.Tensor, batch: int, seen: dict[str, int]) -> torch.Tensor:
        """The rows of one hooked call that enter the costs; seen counts the batch's rows of each module."""
        start = seen.get(name, 0)
        seen[name] = start + len(x)
        keep = self.masks[name if side == "anchor" else self.anchor_module[name]][batch][start:start + len(x)]
        if len(keep) != len(x):
            raise OtfuseError(f"module {name!r} gives other numbers of activation rows in batch {batch + 1} than "
                              "the first batch's shapes imply; its rows cannot be sampled alike in every model")
        return x[keep.to(x.device)]

    def _moments(self, side: str) -> Moments:
        """The model's moments over the rows that enter the costs: its standardisation."""
        moments, seen = Moments(str(self.sources[side].ckpt.path)), {}

        def sink(name, rows, _kind, batch):
            moments.add(name, self._kept(side, name, rows, batch, seen))
        for _ in self._run(side, self._out_tensors(side), sink, "statistics"):
            seen.clear()
        moments.reduce()  # every rank's rows (a rank that failed makes every rank fail here)
        return moments

    # ------------------------------------------------------------ statistics, space by space

    def _entry_pairs(self, k: int):
        """A space's (parent entry, anchor entry) pairs that read a module output: weight and bias of one
        module give one output."""
        sp, sa = self.parent_spec.spaces[k], self.anchor_spec.spaces[k]
        seen = set()
        for ep, ea in zip(sp.entries, sa.entries):
            if ep.role == "out" and (module_of(ep.tensor), ep.start) not in seen:
                seen.add((module_of(ep.tensor), ep.start))
                yield ep, ea

    def _bytes(self, k: int, fold: bool) -> int:
        """What a space's statistics hold: its cross term and head grams (fold), or its kept rows."""
        n, m = self.parent_spec.spaces[k].size, self.anchor_spec.spaces[k].size
        plain, channels, rows = 0, {}, 0
        for ep, ea in self._entry_pairs(k):
            if not fold:
                rows += 4 * self.kept_rows.get(module_of(ea.tensor), 0) * (ep.span(n) + ea.span(m))
            elif ep.group or ep.inner > 1:
                channels[(ep.group, ep.channel)] = ep.rep * ep.inner if ep.group else ep.inner
            else:
                plain = 8 * (n * m + (n * n + m * m) * self.covariance)
        return rows + plain + sum(8 * n * m * size * size for size in channels.values())

    def _groups(self, fold: bool) -> list[list[int]]:
        groups, used = [[]], 0
        for k in range(len(self.anchor_spec.spaces)):
            size = self._bytes(k, fold)
            if groups[-1] and used + size > GROUP_BYTES:
                groups.append([])
                used = 0
            groups[-1].append(k)
            used += size
        return groups

    def _collect(self, group: list[int], fold: bool) -> None:
        """One pass of both models over the data, side by side, batch by batch into the group's statistics."""
        pairs = {k: FeaturePair(fold, l1=self.l1, covariance=self.covariance) for k in group}
        entries = {k: list(self._entry_pairs(k)) for k in group}
        # this batch's kept rows, and its rows per module so far, for each model
        held: dict[str, dict[str, list[torch.Tensor]]] = {side: {} for side in self.sides}
        seen: dict[str, dict[str, int]] = {side: {} for side in self.sides}

        def sink_for(side: str):
            def sink(name, x, _kind, batch):
                x = self._kept(side, name, x, batch, seen[side])
                if len(x) and self.moments[side] is None:
                    check_rows(str(self.sources[side].ckpt.path), name, x)
                    held[side].setdefault(name, []).append(x)
                elif len(x):
                    mean, std = self.moments[side].mean_std(name)
                    held[side].setdefault(name, []).append(STANDARDIZE[self.how](x, mean.to(x.device),
                                                                                 std.to(x.device)))
            return sink

        runs = [self._run(side, sorted({(ea if side == "anchor" else ep).tensor for k in group
                                        for ep, ea in entries[k]}), sink_for(side), "cross terms")
                for side in self.sides]
        for _ in zip(*runs):  # one batch of every model, then its rows go into the statistics
            rows = {side: {name: torch.cat(parts) for name, parts in held[side].items()} for side in self.sides}
            rows.setdefault("parent", rows["anchor"])
            self.peak_rows = max([self.peak_rows, *(len(x) for x in rows["anchor"].values())])
            for k in group:
                sp, sa = self.parent_spec.spaces[k], self.anchor_spec.spaces[k]
                for ep, ea in entries[k]:
                    up, ua = _unit_rows(rows["parent"], ep, sp.size), _unit_rows(rows["anchor"], ea, sa.size)
                    if up is not None and ua is not None and up.shape[1:] == ua.shape[1:]:
                        pairs[k].add(ep, up, ea, ua)
            for side in self.sides:
                held[side].clear()
                seen[side].clear()
        for run in runs:  # removes the hooks
            run.close()
        _reduce_pairs(pairs)  # every rank's sums (a rank that failed makes every rank fail here)
        self.pairs.update(pairs)

    def features(self, k: int, plans: dict, first_pass: bool, fold: bool = True) -> FeaturePair:
        if k not in self.pairs:
            if self.groups is None:
                self.groups = self._groups(fold)
                self._plan(len(self.groups) * len(self.sides))
            group = next(g for g in self.groups if k in g)
            self._collect(group, fold)
            self.groups.remove(group)
            if not self.groups:
                self.models.clear()  # every statistic is collected: free the models
        return self.pairs.pop(k)

    def unit_scales(self, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The per-unit factors (parent, anchor) the space's rows were divided by (z-scores: each unit's
        standard deviation, as STANDARDIZE clamps it), or None where rows keep their scale."""
        if self.how != "zscore":
            return None
        (ep, ea), = self._entry_pairs(k)  # one producer: spaces that take a linear map (Space.linear)
        n, m = self.parent_spec.spaces[k].size, self.anchor_spec.spaces[k].size
        scales = []
        for side, entry, size in (("parent", ep, n), ("anchor", ea, m)):
            std = self.moments[side].mean_std(module_of(entry.tensor))[1]
            scales.append(std[entry.start:entry.start + size].double().clamp_min(1e-6))
        return scales[0], scales[1]

    def tie_features(self, k: int, plans: dict, first_pass: bool) -> FeaturePair:
        """The features that break ties between units whose activation features are identical (units dead
        after the nonlinearity on every sample): the units' weights, as --align weights reads them (see
        alignment/ties.py). Computed only for spaces that have such ties."""
        if self.weights is None:
            self.weights = WeightFeatures(self.anchor_spec, self.parent_spec, self.sources["anchor"],
                                          self.sources["parent"], l1=False)
        return self.weights.features(k, plans, first_pass)


def _reduce_pairs(pairs: dict[int, FeaturePair]) -> None:
    """The folded statistics of every rank's batches summed into each pair (distributed.all_reduce_sums;
    nothing for one process): cross terms, sketches, head grams and the per-unit norms are all sums over rows."""
    sums: dict = {}
    for k, pair in pairs.items():
        if not pair.fold and distributed.world_size() > 1:
            raise OtfuseError("unfolded activation features (compress) are kept row by row and run in one "
                              "process; launch without torchrun")
        if pair.dot is not None:
            sums[("dot", k)] = pair.dot
        if pair.covariance and pair.auto is not None:
            sums.update({("auto", k, 0): pair.auto[0], ("auto", k, 1): pair.auto[1], ("sums", k, 0): pair.sums[0],
                         ("sums", k, 1): pair.sums[1], ("count", k): torch.tensor(float(pair.count))})
        for i, sketch in enumerate(pair.sketches or ()):
            sums[("sketch", k, i)] = sketch
        for key, (*parts, inner) in pair.grams.items():
            sums.update({("gram", k, key, inner, j): t for j, t in enumerate(parts)})
        for side, features in (("parent", pair.parent), ("anchor", pair.anchor)):
            sums.update({("folded", k, side, order): t for order, t in features.folded.items()})
    sums = distributed.all_reduce_sums(sums)
    grams: dict = {}
    for key, t in sums.items():
        pair = pairs[key[1]]
        if key[0] == "dot":
            pair.dot = t
        elif key[0] in ("auto", "sums"):
            getattr(pair, key[0])[key[2]] = t
        elif key[0] == "count":
            pair.count = int(t.item())
        elif key[0] == "sketch":
            pair.sketches = (pair.sketches or [None, None])
            pair.sketches[key[2]] = t
        elif key[0] == "gram":
            grams.setdefault((key[1], key[2], key[3]), {})[key[4]] = t
        else:
            (pair.parent if key[2] == "parent" else pair.anchor).folded[key[3]] = t
    for (k, key, inner), parts in grams.items():
        pairs[k].grams[key] = (*(parts[j] for j in sorted(parts)), inner)


def _unit_rows(rows: dict[str, torch.Tensor], entry, size: int) -> torch.Tensor | None:
    """An "out" entry's slice of its module's kept rows: (units, rep, inner, rows)."""
    x = rows.get(module_of(entry.tensor))
    if x is None or x.shape[1] < entry.start + entry.span(size):
        return None
    x = x[:, entry.start:entry.start + entry.span(size)]
    return x.reshape(len(x), size, entry.rep, entry.inner).permute(1, 2, 3, 0)
