"""Least-squares refit after compression (`compress --repair` on a Hugging Face model).

Merging units, or dropping them, changes what a layer that reads them receives. Every linear layer whose
input is a compressed space (a transformer FFN's down projection) gets the weights that best reproduce the
original layer's output from the compressed units on --data:

    [W' b'] = argmin  sum over tokens |W h + b - W' h' - b'|^2 + ridge |W'|^2
            = (W A + b g) (G + ridge D)^-1,   z = [h', 1], A = sum h z^T, G = sum z z^T, g = sum z^T

with h the original model's input to the layer and h' the compressed model's, on the same tokens (a layer
without a bias fits W' alone). The ridge is RIDGE times the mean of G's diagonal, on the weight part only.
Every reader is refitted from one forward pass of each model over --data, PASSES times: a pass fits each
layer to inputs that the layers before it, as the previous pass left them, still perturb. Exact where the
compressed units span the original ones (merged copies of a unit, a pruned unit that was a multiple of a kept
one) after as many passes as layers read compressed units in sequence. Fitting one layer at a time (REPAIR's
order) would take a forward pass per layer; two passes cost four."""

from __future__ import annotations

import torch
from torch import nn

from otfuse_cli import interrupts
from otfuse_cli.errors import OtfuseError
from otfuse_cli.options import DataOptions

RIDGE = 1e-3
BATCH = 8  # texts per forward pass: each reader's input is held for one batch of the original model
PASSES = 2


def readers(spec, targets: dict[str, int], module: nn.Module, role: str = "in") -> list[tuple[str, str, str]]:
    """(module name, checkpoint tensor name, space name) of every linear layer whose whole input is one compressed
    space (role "out": whose whole output is one, unit by unit: an FFN's up/gate projection), in forward order.
    A base model class (no task head) names its modules without the checkpoint's prefix."""
    linear = {name for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    axis = 1 if role == "in" else 0
    found = {}
    for space in spec.spaces:
        if space.name not in targets:
            continue
        for e in space.entries:
            if not (e.role == role and e.axis == axis and e.tensor.endswith(".weight") and e.start == 0
                    and (role == "in" or (e.rep, e.inner) == (1, 1))):  # heads' q/k/v rows are not units
                continue
            parts = e.tensor.removesuffix(".weight").split(".")
            name = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in linear), None)
            if name is not None:
                found[name] = (e.tensor, space.name)
    order = [name for name, _ in module.named_modules()]
    return sorted(((name, tensor, space) for name, (tensor, space) in found.items()),
                  key=lambda item: order.index(item[0]))


@torch.no_grad()
def refit_readers(state_dict: dict, original, spec, targets: dict[str, int], overrides: dict,
                  data: DataOptions) -> dict:
    """The compressed state dict with every reader of a compressed space refitted (module docs)."""
    from otfuse_cli.alignment.activations import sample_batches
    from otfuse_cli.runnable import load_runnable, runnable_from_state_dict

    full = load_runnable(original, device=data.device)
    names = readers(spec, targets, full.module)
    if not names:
        raise OtfuseError("compress --repair: no linear layer reads a compressed space here")
    batches = sample_batches(full, data.data, data.samples, data.seed, data.max_length, batch_size=BATCH,
                             split=data.split)
    layers = dict(full.module.named_modules())
    out = dict(state_dict)
    for _ in range(PASSES):
        small = runnable_from_state_dict(out, original, device=data.device, config_overrides=overrides)
        sums = {name: _Sums(layers[name], out[tensor].shape[1]) for name, tensor, _ in names}
        for batch, masks in batches:
            interrupts.check()
            seen: dict[str, torch.Tensor] = {}
            with Hooks(full, sums, lambda name, h: seen.__setitem__(name, h)):
                full.predict_logits(batch)
            with Hooks(small, sums, lambda name, h: sums[name].add(seen.pop(name), h, masks)):
                small.predict_logits(batch)
        for name, tensor, _ in names:
            out.update(sums[name].fitted(tensor, out))
    return out


class Hooks:
    """Forward pre-hooks that hand each named layer's input to record(name, input), removed on exit."""

    def __init__(self, model, names, record):
        modules = dict(model.module.named_modules())
        self.handles = [modules[name].register_forward_pre_hook(self._hook(name, record)) for name in names]

    @staticmethod
    def _hook(name, record):
        def hook(_module, args):
            record(name, args[0].detach().double())
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def token_rows(h: torch.Tensor, masks) -> torch.Tensor:
    """A layer input's rows, one per token: token models keep the positions that hold a token (an
    encoder-decoder's decoder has its own mask)."""
    keep = next((m for m in masks or () if tuple(m.shape) == tuple(h.shape[:-1])), None)
    if keep is not None:
        h = h[keep.to(h.device)]
    return h.reshape(-1, h.shape[-1])


class _Sums:
    """One reader's sums over tokens: A = sum h z^T and G = sum z z^T, z = [h', 1] (h' alone without a bias)."""

    def __init__(self, layer: nn.Linear, k: int):
        self.weight, self.bias, self.k = layer.weight.double(), layer.bias, k
        width = k + (self.bias is not None)
        self.cross = self.weight.new_zeros(self.weight.shape[1], width)
        self.gram = self.weight.new_zeros(width, width)

    def add(self, h: torch.Tensor, h_small: torch.Tensor, masks) -> None:
        h, h_small = token_rows(h, masks), token_rows(h_small, masks)
        z = torch.cat([h_small, h_small.new_ones(len(h_small), 1)], 1) if self.bias is not None else h_small
        self.cross += h.T @ z
        self.gram += z.T @ z

    def fitted(self, tensor: str, out: dict) -> dict:
        """The refitted weight (and bias) under the checkpoint's names, `tensor` being the weight's."""
        k = self.k
        target = self.weight @ self.cross  # sum over tokens of (W h) z^T
        if self.bias is not None:
            target += self.bias.double()[:, None] * self.gram[-1][None, :]  # ... + b z^T
        reg = self.gram.clone()
        reg.diagonal()[:k] += RIDGE * float(self.gram.diagonal()[:k].mean())
        fitted = torch.linalg.solve(reg, target.T).T  # fitted @ reg = target
        new = {tensor: fitted[:, :k].to(out[tensor].dtype).cpu().contiguous()}
        bias = tensor.removesuffix(".weight") + ".bias"
        if self.bias is not None:
            new[bias] = fitted[:, k].to(out[bias].dtype).cpu().contiguous()
        return new
