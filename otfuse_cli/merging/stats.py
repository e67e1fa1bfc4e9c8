"""Shareable statistics: what the merge rules need from a party's data, computed in the model's own basis so
the data never leaves the party (`otfuse stats MODEL --data FILE -o STATS`).

  gram    for every linear map (nn.Linear, GPT-2's Conv1D) the Gram matrix G = XᵀX of its inputs, summed
          over tokens (padding excluded) or samples, in float64 — RegMean (Jin et al., 2023);
  fisher  every parameter's diagonal Fisher information, the mean squared gradient of log p(y|x) with y
          drawn from the model's own prediction (no labels needed) — Fisher-weighted averaging.

Convolutions have no Gram here: RegMean falls back to the weighted average for them (documented)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from otfuse_cli import distributed, inputs, interrupts
from otfuse_cli.errors import OtfuseError
from otfuse_cli.options import DataOptions

KINDS = ("gram", "fisher")


@dataclass
class Stats:
    grams: dict[str, torch.Tensor] = field(default_factory=dict)  # weight name -> (in, in) sum of x xᵀ
    in_axis: dict[str, int] = field(default_factory=dict)  # weight name -> the axis its inputs index
    counts: dict[str, int] = field(default_factory=dict)  # weight name -> rows summed into its Gram
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> diagonal Fisher
    info: dict = field(default_factory=dict)  # provenance: model, data, samples


def _linear_modules(module: nn.Module, tensors: list[str]) -> dict[str, tuple[str, int]]:
    """Loaded module name -> (checkpoint weight name, input axis) for every linear map in the checkpoint."""
    import sys

    from otfuse_cli.alignment.activations import loaded_names

    # GPT-2's Conv1D (weight stored transposed); only a loaded transformers can have made one
    utils = sys.modules.get("transformers.pytorch_utils")
    Conv1D = utils.Conv1D if utils is not None else ()

    by_loaded = {loaded: saved for saved, loaded in loaded_names(module, tensors).items()}
    out = {}
    for name, mod in module.named_modules():
        axis = 1 if isinstance(mod, nn.Linear) else 0 if isinstance(mod, Conv1D) else None
        saved = by_loaded.get(f"{name}.weight")
        if axis is not None and saved is not None:
            out[name] = (saved, axis)
    return out


def _gram_hooks(model, tensors: list[str], stats: Stats, state: dict) -> list:
    from otfuse_cli.alignment.activations import mask_for

    modules = dict(model.module.named_modules())
    handles = []
    for name, (saved, axis) in _linear_modules(model.module, tensors).items():
        stats.in_axis[saved] = axis

        def hook(_mod, args, saved=saved):
            x = args[0]
            mask = mask_for(state["masks"], x) if x.dim() == 3 and state.get("masks") else None
            if mask is not None:
                x = x[mask]  # padding tokens are not data
            x = x.reshape(-1, x.shape[-1]).double()
            stats.grams[saved] = stats.grams.get(saved, 0) + (x.T @ x).cpu()
            stats.counts[saved] = stats.counts.get(saved, 0) + len(x)
        handles.append(modules[name].register_forward_pre_hook(hook))
    return handles


def _log_likelihood_of_own_sample(logits: torch.Tensor, mask, gen: torch.Generator) -> torch.Tensor:
    """log p(y|x) with y drawn from the model's prediction at every output position (valid tokens only)."""
    logp = torch.log_softmax(logits.float(), -1)
    y = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]), 1, generator=gen)
    picked = logp.reshape(-1, logp.shape[-1]).gather(1, y.to(logp.device)).reshape(logp.shape[:-1])
    if mask is not None and picked.shape == mask.shape:
        picked = picked[mask]
    return picked.sum()


def _fisher(model, batches, tensors: list[str], seed: int, bar=None) -> dict[str, torch.Tensor]:
    """Mean over samples of the squared per-sample gradient of log p(y|x), y ~ the model's prediction, drawn
    by one generator seeded with --seed in data order. This rank runs its share of the batches
    (distributed.shard); for another rank's sample it only makes the same draw on a placeholder of the same
    shape (the generator advances alike whatever the probabilities), so every sample's y is the one a single
    process draws. The sums of every rank are added before the mean."""
    from otfuse_cli.alignment.activations import loaded_names

    if "translation" in model.task_heads or "mlm" in model.task_heads:
        raise OtfuseError("Fisher statistics support classifiers and causal language models")
    by_loaded = {loaded: saved for saved, loaded in loaded_names(model.module, tensors).items()}
    params = {by_loaded[n]: p for n, p in model.module.named_parameters() if n in by_loaded}
    total = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    mine = {b for b, _ in distributed.shard(batches)}
    count = 0
    for b, (batch, masks) in enumerate(batches):
        interrupts.check()
        mask = None if masks is None else masks[0]  # one mask: encoder-decoders were refused above
        size = len(batch) if isinstance(batch, torch.Tensor) else len(mask)
        ones = [batch[i:i + 1] if isinstance(batch, torch.Tensor) else {k: v[i:i + 1] for k, v in batch.items()}
                for i in range(size)]
        if b not in mine:  # another rank's batch: its draws only (its samples are padded alike: one shape)
            with torch.no_grad():
                shape = model.logits_with_grad(ones[0]).shape
            for _ in ones:
                torch.multinomial(torch.ones(shape.numel() // shape[-1], shape[-1]), 1, generator=gen)
            continue
        for i, one in enumerate(ones):  # per-sample gradients: the Fisher is a mean of squares, not a square of means
            model.module.zero_grad(set_to_none=True)
            with torch.enable_grad():
                logits = model.logits_with_grad(one)
                _log_likelihood_of_own_sample(logits, None if mask is None else mask[i:i + 1].to(logits.device),
                                              gen).backward()
            for name, p in params.items():
                if p.grad is not None:
                    total[name] += p.grad.detach().double().cpu() ** 2
            count += 1
            if bar is not None:
                bar.advance()
    model.module.zero_grad(set_to_none=True)
    summed = distributed.all_reduce_sums({**{f"fisher/{n}": t for n, t in total.items()}, "count": count})
    count = summed.pop("count")
    return {name.removeprefix("fisher/"): t / max(count, 1) for name, t in summed.items()}


def _batch_size(batch, mask) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, dict):
        return len(next(iter(batch.values())))
    return len(mask)


def compute_stats(ckpt, data: DataOptions, kinds: tuple[str, ...] = KINDS, progress=None) -> Stats:
    """The statistics of `ckpt` on its party's data file (`data.data`). progress: a report.Progress (Gram:
    batches; Fisher: samples, one backward pass each), or None."""
    from otfuse_cli.report import start

    from otfuse_cli.alignment.activations import sample_batches
    from otfuse_cli.data import check_source, source_record
    from otfuse_cli.runnable import load_runnable, resolve_device

    if not data.data:
        raise OtfuseError("statistics need --data FILE with the party's inputs")
    check_source(data.data, data.split)
    if unknown := set(kinds) - set(KINDS):
        raise OtfuseError(f"unknown statistics {sorted(unknown)}; choose from {', '.join(KINDS)}")
    model = load_runnable(ckpt, activation=data.activation, device=resolve_device(data.device))
    tensors = list(ckpt.keys())
    batches = sample_batches(model, data.data, data.samples, data.seed, data.max_length, label=str(ckpt.path),
                             split=data.split)
    used = sum(_batch_size(b, m) for b, m in batches)  # fewer than --samples when the file is shorter
    mine = distributed.shard(batches)  # this rank's batches (all of them in one process)
    stats = Stats(info={"data": {**source_record(data.data, data.split), "samples": used,
                                 "requested": data.samples, "seed": data.seed, "max_length": data.max_length},
                        "kinds": list(kinds), "world_size": distributed.world_size()})
    if "gram" in kinds:
        state: dict = {}
        handles = _gram_hooks(model, tensors, stats, state)
        bar = start(progress, "gram", len(mine))
        try:
            with torch.no_grad():
                for _, (batch, mask) in mine:
                    interrupts.check()
                    state["masks"] = tuple(m.to(model.device) for m in mask) if mask is not None else None
                    model.predict_logits(batch)
                    bar.advance()
        except RuntimeError as exc:
            raise OtfuseError(f"the data does not fit the model: {str(exc).splitlines()[0]}") from None
        finally:
            for h in handles:
                h.remove()
        # every rank's sums, added in float64 (a rank that failed makes every rank fail here)
        summed = distributed.all_reduce_sums({**{("gram", n): g for n, g in stats.grams.items()},
                                              **{("count", n): c for n, c in stats.counts.items()}})
        stats.grams = {n: g for (kind, n), g in summed.items() if kind == "gram"}
        stats.counts = {n: c for (kind, n), c in summed.items() if kind == "count"}
    if "fisher" in kinds:
        stats.fisher = _fisher(model, batches, tensors, data.seed,
                               start(progress, "fisher", sum(_batch_size(b, m) for _, (b, m) in mine)))
    return stats


# ---------------------------------------------------------------- stats files

def save_stats(path: str | Path, stats: Stats, ckpt, force: bool = False) -> Path:
    from otfuse_cli.checkpoint import provenance, write_checkpoint

    tensors = {f"gram/{n}": g for n, g in sorted(stats.grams.items())}
    tensors.update({f"fisher/{n}": f for n, f in sorted(stats.fisher.items())})
    if not tensors:
        raise OtfuseError("no statistics to write (the model has no linear layers the data reached)")
    record = provenance("stats", {**stats.info, "in_axis": stats.in_axis, "counts": stats.counts}, [ckpt])
    return write_checkpoint(path, tensors, layout="file", provenance=record, force=force)


def load_stats(path: str | Path) -> Stats:
    """A stats file, checked against the schema save_stats writes: a regular file with a sane header, its
    metadata's size and nesting limited (inputs.py), every count a positive integer (statistics of no samples
    would merge as if they said something), every Gram a square matrix, all values finite."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    inputs.check_input(path, "stats file", missing=f"stats file not found: {path}")  # never a FIFO or device
    if problem := inputs.safetensors_problem(path, "stats file"):
        raise OtfuseError(f"{path} is not an otfuse stats file ({problem})")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {})["otfuse"]
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, KeyError, ValueError, TypeError, AttributeError, OSError) as exc:
        raise OtfuseError(f"{path} is not an otfuse stats file ({exc.__class__.__name__})") from None
    record = inputs.parse_json(raw, f"{path} (its otfuse metadata)")
    try:
        if record.get("command") != "stats":
            raise KeyError("command")
        opts = record["options"]
        stats = Stats(in_axis={str(k): _whole(v, (0, 1)) for k, v in opts["in_axis"].items()},
                      counts={str(k): _whole(v) for k, v in opts["counts"].items()},
                      info={**{k: v for k, v in opts.items() if k not in ("in_axis", "counts")},
                            "inputs": record["inputs"]})
        samples = opts["data"]["samples"]
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise OtfuseError(f"{path} is not an otfuse stats file ({exc.__class__.__name__})") from None
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise OtfuseError(f"{path}: the statistics claim {samples!r} samples; statistics of no data say nothing "
                          "about the model")
    if any(c < 1 for c in stats.counts.values()):
        name = next(n for n, c in stats.counts.items() if c < 1)
        raise OtfuseError(f"{path}: the Gram matrix of {name} claims {stats.counts[name]} input rows; statistics "
                          "of no data say nothing about the model")
    for key, t in tensors.items():
        if not (t.is_floating_point() and bool(torch.isfinite(t).all())):
            raise OtfuseError(f"{path}: statistic {key} contains NaN or Inf" if t.is_floating_point() else
                              f"{path}: statistic {key} holds {str(t.dtype).removeprefix('torch.')} values, "
                              "not real numbers")
        kind, _, name = key.partition("/")
        if kind == "gram" and name in stats.in_axis:
            if t.dim() != 2 or t.shape[0] != t.shape[1]:
                raise OtfuseError(f"{path}: Gram matrix {name} has shape {tuple(t.shape)}; a Gram matrix is square")
            stats.grams[name] = t.double()
        elif kind == "fisher":
            stats.fisher[name] = t.double()
        else:
            raise OtfuseError(f"{path} is not an otfuse stats file (unexpected tensor {key!r})")
    return stats


def _whole(value, allowed: tuple[int, ...] | None = None) -> int:
    """An integer from the metadata, strictly (no 1.5 or "3" or true), within `allowed` when given."""
    if isinstance(value, bool) or not isinstance(value, int) or (allowed is not None and value not in allowed):
        raise ValueError(value)
    return value


def check_fits(stats: Stats, ckpt, path) -> None:
    """Every statistic belongs to a tensor of `ckpt` and has its shape: a Gram is (in, in) for the input axis
    of its weight, a Fisher the shape of its parameter (a mismatched file fails here, not inside the merge)."""
    for name, gram in stats.grams.items():
        axis = stats.in_axis[name]
        if name not in ckpt or axis >= len(ckpt.shape(name)):
            raise OtfuseError(f"{path}: Gram matrix {name} does not match a weight of {ckpt.path}")
        want = ckpt.shape(name)[axis]
        if tuple(gram.shape) != (want, want):
            raise OtfuseError(f"{path}: Gram matrix {name} has shape {tuple(gram.shape)}; the weight's "
                              f"{want} inputs need ({want}, {want})")
    for name, fisher in stats.fisher.items():
        if name not in ckpt or tuple(fisher.shape) != tuple(ckpt.shape(name)):
            raise OtfuseError(f"{path}: Fisher tensor {name} has shape {tuple(fisher.shape)}, not that of a "
                              f"parameter of {ckpt.path}")
