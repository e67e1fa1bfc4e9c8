"""The opt-in wall-clock limit (--time-limit). It is checked between units of work (Sinkhorn iterations,
spaces, tensors) and can only abort the command with one line and exit 2: no result ever depends on how
fast the machine is, so every stopping rule that shapes an output counts work, never seconds."""

from __future__ import annotations

import time

from otfuse_cli import interrupts
from otfuse_cli.errors import OtfuseError

CLOCK = time.monotonic  # tests inject a clock that jumps
_limit: float | None = None
_deadline: float | None = None


def start(seconds: float | None) -> None:
    """Arm the limit for this command (None: no limit)."""
    global _limit, _deadline
    _limit, _deadline = seconds, (None if seconds is None else CLOCK() + seconds)


def check(doing: str) -> None:
    """Between units of work: a pending Ctrl-C/SIGTERM is raised here, then the limit is checked."""
    interrupts.check()
    if _deadline is not None and CLOCK() > _deadline:
        raise OtfuseError(f"--time-limit {_limit:g} s reached while {doing}; nothing was written")
