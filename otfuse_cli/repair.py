"""BatchNorm repair: after fusion, a BatchNorm's running statistics (transported and averaged from the
parents) no longer describe the fused network's own activations; recompute them on sample inputs."""

from __future__ import annotations

import torch
from torch import nn

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
    batches = sample_batches(model, data.data, data.samples, data.seed, data.max_length)
    norms = batchnorm_modules(model.module)
    if not norms:
        raise OtfuseError("--repair-bn: the model has no BatchNorm layers")
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over all batches
        bn.train()
    for batch, _ in batches:
        model.predict_logits(batch)
    for bn in norms:
        bn.eval()
    repaired = {}
    state = model.module.state_dict()
    for name, tensor in state_dict.items():
        new = state.get(name)
        repaired[name] = new.to(tensor.dtype).cpu() if new is not None and name.endswith(("running_mean", "running_var")) \
            else tensor
    return repaired
