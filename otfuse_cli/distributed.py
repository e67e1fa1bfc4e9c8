"""Data-parallel statistics across processes (`torchrun --nproc-per-node N -m otfuse_cli stats ...`).

A launch by torchrun (WORLD_SIZE > 1 with RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the environment)
starts one process group (gloo for CPU tensors, nccl for CUDA ones). Every rank builds the same seeded
subsample and the same batches one process would, runs only its share of the batches (rank r: batches
r, r + N, ...), and its float64 sums (Gram matrices, Fisher sums, counts, activation cross terms and norms)
are SUM-reduced before anything is normalised or solved, so the union of the shares is the one-process
sample set exactly. Only rank 0 writes outputs and prints; a rank that fails makes every rank fail with the
same exit code at the next synchronisation point (agree), and rank 0 prints the one `error:` line.

One process is the N = 1 case of the same code: every helper here is then the identity."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

from otfuse_cli.errors import OtfuseError

T = TypeVar("T")
_state = {"group": False, "failed": False}


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if world_size() > 1 else 0


def world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_writer() -> bool:
    """Whether this process writes outputs and prints (rank 0; the only process without torchrun)."""
    return rank() == 0


def start() -> None:
    """Join the process group torchrun's environment describes; nothing for one process."""
    if world_size() < 2 or _state["group"]:
        return
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    try:
        dist.init_process_group(backend=backend)
    except Exception as exc:  # an unreachable MASTER_ADDR, a port in use, ...
        raise OtfuseError(f"cannot join the process group of {world_size()} ranks: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    _state["group"], _state["failed"] = True, False


def stop() -> None:
    if _state["group"]:
        import torch.distributed as dist

        _state["group"] = False
        dist.destroy_process_group()


def shard(items: Iterable[T]) -> list[tuple[int, T]]:
    """This rank's share of `items` as (index in the whole list, item): every world_size-th from rank on.
    The shares of all ranks are the whole list, each item once."""
    r, n = rank(), world_size()
    return [(i, item) for i, item in enumerate(items) if i % n == r]


def agree(error: BaseException | None = None) -> None:
    """A synchronisation point: every rank says whether it failed. When any did, every rank raises an
    OtfuseError (this rank's own, or the first failed rank's message and exit code) and no further collective
    is made. Nothing for one process (its own error, if any, is already being raised)."""
    if not _state["group"] or _state["failed"]:
        return
    import torch.distributed as dist

    mine = None if error is None else (str(error) or type(error).__name__, getattr(error, "exit_code", 2))
    said: list = [None] * world_size()
    dist.all_gather_object(said, mine)
    failed = [(r, s) for r, s in enumerate(said) if s is not None]
    if not failed:
        return
    _state["failed"] = True
    if error is None:
        r, (message, code) = failed[0]
        failure = OtfuseError(f"rank {r} of {world_size()}: {message}")
        failure.exit_code = code
        raise failure


def all_reduce_sums(sums: dict) -> dict:
    """{key: tensor or int} summed over the ranks (after agree: a rank that failed makes all fail first).
    Keys may be missing on a rank that saw no rows of them (a share with no batches): they count as zeros.
    Tensors keep their device and dtype; the reduction is in float64 for floating tensors."""
    agree()
    if not _state["group"]:
        return sums
    import torch
    import torch.distributed as dist

    layout = {k: ("int", (), None) if isinstance(v, int) else ("tensor", tuple(v.shape), str(v.dtype))
              for k, v in sums.items()}
    seen: list = [None] * world_size()
    dist.all_gather_object(seen, layout)
    union: dict = {}
    for part in seen:
        for k, v in part.items():
            union.setdefault(k, v)
    out = {}
    for key in sorted(union, key=str):
        kind, shape, dtype = union[key]
        value = sums.get(key)
        if kind == "int":
            t = torch.tensor(int(value or 0), dtype=torch.int64)
        elif value is None:
            t = torch.zeros(shape, dtype=torch.float64)
        else:
            t = value.detach().to("cpu", torch.float64 if value.is_floating_point() else torch.int64)
        t = t.contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if kind == "int":
            out[key] = int(t)
        elif value is None:
            out[key] = t.to(getattr(torch, dtype.removeprefix("torch.")))
        else:
            out[key] = t.to(value.device, value.dtype)
    return out
