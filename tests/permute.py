"""Hide a random function-preserving permutation in every space of a Spec (test helper)."""

from __future__ import annotations

import torch

from otfuse_cli.alignment.transport import Plan, Transporter


def random_plans(spec, seed: int = 0) -> dict[str, Plan]:
    gen = torch.Generator().manual_seed(seed)
    plans = {}
    for space in spec.spaces:
        n = space.size
        perm = torch.randperm(n, generator=gen)
        coupling = torch.zeros(n, n, dtype=torch.float64)
        coupling[perm, torch.arange(n)] = 1.0 / n
        inner = {}
        for channel in space.channels:
            if channel in space.fixed_inner:
                continue
            d = next(e.inner for e in space.entries if e.channel == channel)
            inner[channel] = torch.stack([torch.stack([torch.randperm(d, generator=gen) for _ in range(n)])
                                          for _ in range(n)])
        plans[space.name] = Plan(coupling, inner)
    return plans


def permuted_state_dict(state_dict: dict, spec, seed: int = 0) -> dict:
    plans = random_plans(spec, seed)
    mover = Transporter(spec, spec)
    return {k: (mover.move(k, v, plans) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}


def save_permuted_copy(src, dst, seed: int):
    """Copy an HF folder (config, tokenizer, ...) with its weights hidden behind random permutations."""
    import shutil

    from safetensors.torch import save_file

    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli.arch import build_spec

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model*.safetensors*", "otfuse.json"))
    ckpt = open_checkpoint(src)
    save_file(permuted_state_dict(ckpt.state_dict(), build_spec(ckpt), seed), f"{dst}/model.safetensors",
              metadata={"format": "pt"})
    return dst
