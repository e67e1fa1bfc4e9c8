"""BatchNorm repair: after fusion, a BatchNorm's running statistics (transported and averaged from the
parents) no longer describe the fused network's own activations; recompute them on sample inputs."""

from __future__ import annotations

import torch
from torch import nn

from otfuse_cli import interrupts
from otfuse_cli.errors import OtfuseError
from otfuse_cli.options import DataOptions


def batchnorm_modules(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def repair_batchnorm(state_dict: dict, like, data: DataOptions) -> dict:
    """Fused weights with every BatchNorm's running mean/var re-estimated on the sample inputs in `data.data`
    (cumulative average, everything else in eval mode). `like` is the checkpoint whose architecture they have."""
    from otfuse_cli.alignment.activations import sample_batches
    from otfuse_cli.runnable import runnable_from_state_dict

    model = runnable_from_state_dict(state_dict, like, activation=data.activation, device=data.device)
    batches = sample_batches(model, data.data, data.samples, data.seed, data.max_length, split=data.split)
    norms = batchnorm_modules(model.module)
    if not norms:
        raise OtfuseError("--repair-bn: the model has no BatchNorm layers")
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over all batches
        bn.train()
    for batch, _ in batches:
        interrupts.check()
        model.predict_logits(batch)
    for bn in norms:
        bn.eval()
    repaired = {}
    state = model.module.state_dict()
    for name, tensor in state_dict.items():
        new = state.get(name)
        repaired[name] = new.to(tensor.dtype).cpu() if new is not None and name.endswith(("running_mean", "running_var")) \
            else tensor
    return finite(repaired)


def finite(state_dict: dict) -> dict:
    """A repair measured on data far out of range (1e30 inputs) overflows: refuse rather than publish inf."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise OtfuseError(f"--repair: {name} became NaN or Inf on this data (values out of range?)")
    return state_dict


# ---------------------------------------------------------------- REPAIR (Jordan et al., 2022)

def repaired_layers(spec) -> list[str]:
    """Layers whose units REPAIR renormalises: the producers of a bare chain's hidden spaces (MLP, VGG-style
    CNN without BatchNorm). BatchNorm nets are repaired by resetting their statistics instead."""
    if spec.family not in ("mlp", "cnn"):
        return []
    return [space.entries[0].tensor.rsplit(".", 1)[0] for space in spec.spaces]


def unit_statistics(model, layers: list[str], data: DataOptions) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-unit mean and std of each layer's output (pre-activation) over samples and spatial positions."""
    from otfuse_cli.alignment.activations import sample_batches

    batches = sample_batches(model, data.data, data.samples, data.seed, data.max_length, split=data.split)
    # rows = samples (x positions), columns = units
    with torch.no_grad():
        return _moments(model, layers, batches, lambda x, _masks: x.movedim(1, -1).reshape(-1, x.shape[1]))


def _moments(model, names: list[str], batches, rows) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-unit mean and std of each named module's output over the batches; rows(output, masks) turns one
    output into a (observations, units) matrix."""
    modules = dict(model.module.named_modules())
    sums: dict[str, list] = {name: [0, 0.0, 0.0] for name in names}
    masks_now: list = [None]

    def hook(name):
        def record(_mod, _inp, output):
            y = rows(output.detach().double(), masks_now[0])
            acc = sums[name]
            acc[0] += len(y)
            acc[1] = acc[1] + y.sum(0)
            acc[2] = acc[2] + (y * y).sum(0)
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        for batch, masks in batches:
            interrupts.check()
            masks_now[0] = masks
            model.predict_logits(batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name in names:
        n, s, sq = sums[name]
        mean = s / n
        out[name] = (mean.cpu(), (sq / n - mean * mean).clamp_min(0).sqrt().cpu())
    return out


@torch.no_grad()
def repair_units(state_dict: dict, like, targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 data: DataOptions) -> dict:
    """REPAIR: each repaired layer's units get the target mean and std on the data, folded into the layer's
    weight and bias (W <- W s_t/s_f, b <- (b - m_f) s_t/s_f + m_t), layer by layer in forward order so every
    layer is measured after the ones before it were repaired."""
    from otfuse_cli.runnable import runnable_from_state_dict

    out = dict(state_dict)
    for name, (mean_t, std_t) in targets.items():
        model = runnable_from_state_dict(out, like, activation=data.activation, device=data.device)
        fold(out, f"{name}.weight", unit_statistics(model, [name], data)[name], (mean_t, std_t))
    return finite(out)


def fold(out: dict, weight: str, measured: tuple, target: tuple) -> None:
    """Give the units of the layer whose weight is out[weight] the target mean and std, in place: W <- W s,
    b <- (b - m_f) s + m_t with s = s_t / s_f. Without a bias only the spread can be set."""
    (mean_f, std_f), (mean_t, std_t) = measured, target
    scale = torch.where(std_f > 1e-12, std_t / std_f.clamp_min(1e-12), torch.ones_like(std_f))
    w = out[weight]
    out[weight] = (w.double() * scale.reshape((-1,) + (1,) * (w.dim() - 1))).to(w.dtype)
    bias = weight.removesuffix(".weight") + ".bias"
    if bias in out:
        out[bias] = ((out[bias].double() - mean_f) * scale + mean_t).to(out[bias].dtype)


def check_repairable(parents) -> None:
    """Refuse --repair before any work where it cannot apply: Hugging Face models have no unit layers to
    renormalise and no BatchNorm (the same reason repair_fused would give after the whole alignment)."""
    spec = parents.specs[parents.anchor]
    if parents.ckpts[parents.anchor].config is not None and not repaired_layers(spec):
        raise OtfuseError(f"--repair applies to MLPs and CNNs (and resets BatchNorm statistics), not to "
                          f"{spec.family} models")


def repair_fused(state_dict: dict, parents, plans: list, weights: list[float], data: DataOptions) -> dict:
    """`fuse --repair`: BatchNorm nets get their statistics re-estimated; BatchNorm-free MLPs and CNNs get
    REPAIR, every hidden unit's mean and std set to the weighted average of its aligned parent units'."""
    from otfuse_cli.alignment.transport import Transporter
    from otfuse_cli.runnable import load_runnable, runnable_from_state_dict

    like = parents.ckpts[parents.anchor]
    fused = runnable_from_state_dict(state_dict, like, activation=data.activation)
    if batchnorm_modules(fused.module):
        return repair_batchnorm(state_dict, like, data)
    anchor_spec = parents.specs[parents.anchor]
    layers = repaired_layers(anchor_spec)
    if not layers:
        raise OtfuseError(f"--repair applies to MLPs and CNNs (and resets BatchNorm statistics), not to "
                          f"{anchor_spec.family} models")
    targets: dict[str, list] = {}
    for k, (ckpt, spec) in enumerate(zip(parents.ckpts, parents.specs)):
        parent_layers = repaired_layers(spec)
        measured = unit_statistics(load_runnable(ckpt, activation=data.activation), parent_layers, data)
        mover = Transporter(anchor_spec, spec)
        for layer, parent_layer in zip(layers, parent_layers):
            mean, std = measured[parent_layer]
            if plans[k]:
                mean, std = (mover.move_like(f"{parent_layer}.weight", 0, v, plans[k]) for v in (mean, std))
            acc = targets.setdefault(layer, [0, 0])
            acc[0], acc[1] = acc[0] + weights[k] * mean, acc[1] + weights[k] * std
    return repair_units(state_dict, like, {layer: tuple(v) for layer, v in targets.items()}, data)


def repair_compressed(state_dict: dict, original, spec, target_spec, plans: dict, data: DataOptions) -> dict:
    """`compress --repair`: a BatchNorm net gets its statistics re-estimated; a BatchNorm-free MLP or CNN gets
    REPAIR, every unit's mean and std set to the average of its original members' (a merged unit's
    pre-activation, the mean of theirs, has less spread than each: REPAIR undoes that collapse). A pruned unit's
    members are itself; a unit of an uncompressed layer gets its own original statistics back."""
    from otfuse_cli.alignment.transport import Transporter
    from otfuse_cli.runnable import load_runnable, runnable_from_state_dict

    compressed = runnable_from_state_dict(state_dict, original, activation=data.activation)
    if batchnorm_modules(compressed.module):
        return repair_batchnorm(state_dict, original, data)
    layers = repaired_layers(spec)
    measured = unit_statistics(load_runnable(original, activation=data.activation), layers, data)
    mover = Transporter(target_spec, spec)
    targets = {layer: tuple(mover.move_like(f"{layer}.weight", 0, v, plans) for v in measured[layer])
               for layer in layers}
    return repair_units(state_dict, original, targets, data)


@torch.no_grad()
def repair_producers(state_dict: dict, original, spec, target_spec, plans: dict, overrides: dict,
                     data: DataOptions) -> dict:
    """`compress --repair-by statistics` on a Hugging Face model: REPAIR for the units of its compressed FFNs.
    Every linear layer that produces them (an FFN's up, gate or intermediate projection) gets each unit's mean
    and std over the tokens of --data set to the average of its original members' (only the std where the layer
    has no bias), one compressed space after another in forward order, each measured after the ones before it
    were repaired (the producers of one space read the same input: one pass each)."""
    from otfuse_cli.alignment.activations import sample_batches
    from otfuse_cli.alignment.transport import Transporter
    from otfuse_cli.merging.refit import readers
    from otfuse_cli.runnable import load_runnable, runnable_from_state_dict

    full = load_runnable(original, device=data.device)
    names = readers(spec, plans, full.module, role="out")
    if not names:
        raise OtfuseError("compress --repair-by statistics: no linear layer produces a compressed FFN's units here")
    batches = sample_batches(full, data.data, data.samples, data.seed, data.max_length, batch_size=8,
                             split=data.split, say_truncation=False)
    mover = Transporter(target_spec, spec)
    measured = _output_statistics(full, [name for name, _, _ in names], batches)
    targets = {name: tuple(mover.move_like(tensor, 0, v, plans) for v in measured[name]) for name, tensor, _ in names}
    out = dict(state_dict)
    for space in dict.fromkeys(space for _, _, space in names):
        group = [(name, tensor) for name, tensor, s in names if s == space]
        small = runnable_from_state_dict(out, original, device=data.device, config_overrides=overrides)
        measured = _output_statistics(small, [name for name, _ in group], batches)
        for name, tensor in group:
            fold(out, tensor, measured[name], targets[name])
    return finite(out)


def _output_statistics(model, names: list[str], batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-unit mean and std of each named linear layer's output over the tokens of the batches."""
    from otfuse_cli.merging.refit import token_rows

    return _moments(model, names, batches, token_rows)
