"""How many compute threads torch uses: `--threads N` (or OTFUSE_THREADS), else the cores this process may
actually run on — its CPU affinity, capped by a cgroup CPU quota (a container limited to 2 CPUs on a 64-core
host gets 2 threads, not 64; torch's own default sees only the affinity).

The count never follows the machine's momentary load: some reductions (a long sum split over threads) add in
an order that depends on the thread count, so a count that backed off under load would make the same
command's output depend on what else was running. What backs off instead is how idle threads wait: when the
load average already fills the usable cores, OpenMP's threads sleep at a barrier instead of spinning
(OMP_WAIT_POLICY=PASSIVE), which changes no result. Spinning threads fight the other work for the cores they
wait on: MiniLM activation alignment beside two busy processes took 36.1 CPU-s spinning and 19.1 sleeping, on a
quiet machine 11.7 s and 12.7 s wall (benchmarks/threads.py, README: Threads)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

ENV = "OTFUSE_THREADS"
CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpus(root: Path = CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (quota / period), or None when there is none.
    cgroup v2 (`cpu.max`: "max 100000" or "200000 100000") first, then v1 (`cpu.cfs_quota_us`, -1 for none)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores(root: Path = CGROUP) -> int:
    """Cores this process may run on: its affinity mask, capped by the cgroup quota rounded up (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpus(root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def parse(value: str | int | None, source: str) -> int | None:
    """A thread count from the command line or the environment; None for unset. Raises ValueError in words."""
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source} must be a whole number of threads (e.g. 1), not {value!r}") from None
    if not 1 <= n <= 1024:
        raise ValueError(f"{source} must be between 1 and 1024, not {n}")
    return n


def choose(requested: int | None = None) -> tuple[int | None, str]:
    """(threads, why): the count to set and where it came from; threads None leaves torch as it is (the user
    set OMP_NUM_THREADS, which torch reads itself)."""
    if requested is not None:
        return requested, "--threads"
    env = parse(os.environ.get(ENV), ENV)
    if env is not None:
        return env, ENV
    if os.environ.get("OMP_NUM_THREADS"):
        return None, "OMP_NUM_THREADS"
    return usable_cores(), "the cores this process may use: affinity, cgroup quota"


def busy(cores: int, load: float | None = None) -> bool:
    """Whether the machine's 1-minute load average already fills `cores`."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            return False
    return load >= cores


def wait_policy(cores: int, load: float | None = None) -> str | None:
    """OMP_WAIT_POLICY to set before torch loads: PASSIVE on a busy machine, else None (OpenMP's default, spin
    a while then sleep). A policy the user set stands."""
    if os.environ.get("OMP_WAIT_POLICY"):
        return None
    return "PASSIVE" if busy(cores, load) else None


def configure(requested: int | None = None) -> tuple[int | None, str]:
    """Apply `choose`: before torch is imported through OMP_NUM_THREADS, which its OpenMP runtime reads when it
    loads (so a command that fails before its first tensor never pays torch's import), after it through
    torch.set_num_threads. Returns `choose`'s (threads, why)."""
    threads, why = choose(requested)
    torch = sys.modules.get("torch")
    if torch is not None:  # loaded: its OpenMP has read its settings, only the count can still change
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return threads, why
    # before torch loads: OpenMP reads its thread count and its wait policy then, once
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    count = int(omp) if omp.isdigit() else usable_cores()
    if count > 1 and (policy := wait_policy(count)):  # one thread has no one to wait for
        os.environ["OMP_WAIT_POLICY"] = policy
        why += "; idle threads sleep: the load average fills the cores"
    return threads, why
