"""The thread policy (otfuse_cli/threads.py): the cores a process may use (affinity, cgroup quota), the
`--threads` option and OTFUSE_THREADS, and that torch runs with the count chosen.

Oracles: cgroup files written as the kernel documents them (v2 `cpu.max` "QUOTA PERIOD" or "max PERIOD", v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us`, -1 for none); torch.get_num_threads() in a fresh process, and the
kernel's affinity mask set with os.sched_setaffinity."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from otfuse_cli import threads

REPO_FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "digits", "mlp_a.safetensors")


@pytest.mark.parametrize("text, cpus", [("max 100000\n", None), ("150000 100000\n", 1.5),
                                        ("50000 100000\n", 0.5), ("400000 100000\n", 4.0)])
def test_cgroup_v2_quota(tmp_path, text, cpus):
    (tmp_path / "cpu.max").write_text(text)
    assert threads.cgroup_cpus(tmp_path) == cpus


@pytest.mark.parametrize("quota, cpus", [("-1", None), ("250000", 2.5)])
def test_cgroup_v1_quota(tmp_path, quota, cpus):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpus(tmp_path) == cpus


def test_no_cgroup_files_is_no_quota(tmp_path):
    assert threads.cgroup_cpus(tmp_path) is None


def test_usable_cores_is_the_affinity_capped_by_the_quota_rounded_up(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert threads.usable_cores(tmp_path) == affinity  # no quota
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU still gets one thread
    assert threads.usable_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{(affinity + 8) * 100000} 100000\n")  # a quota above the mask
    assert threads.usable_cores(tmp_path) == affinity


@pytest.mark.parametrize("value", ["x", "1.5", "0", "-2", "5000"])
def test_bad_counts_are_refused_in_words(value):
    with pytest.raises(ValueError, match="--threads must be"):
        threads.parse(value, "--threads")


def _torch_threads(code: str, env: dict) -> int:
    out = subprocess.run([sys.executable, "-c", code + "\nimport torch; print(torch.get_num_threads())"],
                         env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", threads.ENV)}
    return {**env, **extra}


def test_torch_runs_with_the_count_chosen_before_or_after_its_import():
    before = "from otfuse_cli import threads; threads.configure(1)"
    after = "import torch; torch.set_num_threads(2); from otfuse_cli import threads; threads.configure(1)"
    assert _torch_threads(before, _env()) == 1
    assert _torch_threads(after, _env()) == 1
    assert _torch_threads("from otfuse_cli import threads; threads.configure()", _env(OTFUSE_THREADS="1")) == 1


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to narrow the mask to one")
def test_the_default_follows_the_affinity_mask_not_the_machine():
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
            "from otfuse_cli import threads; print(threads.configure())")
    assert _torch_threads(code, _env()) == 1
    # the user's OMP_NUM_THREADS stands when nothing else is asked
    assert _torch_threads("from otfuse_cli import threads; threads.configure()", _env(OMP_NUM_THREADS="1")) == 1


def test_cli_option_and_environment():
    cmd = [sys.executable, "-m", "otfuse_cli", "-v", "--threads", "1", "inspect", REPO_FIXTURE]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0 and "threads: 1 (--threads)" in done.stderr  # one thread never waits
    done = subprocess.run([sys.executable, "-m", "otfuse_cli", "--threads", "0", "inspect", REPO_FIXTURE],
                          env=_env(), capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr == "error: --threads must be between 1 and 1024, not 0\n"
    done = subprocess.run([sys.executable, "-m", "otfuse_cli", "inspect", REPO_FIXTURE], env=_env(OTFUSE_THREADS="a"),
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: OTFUSE_THREADS must be a whole number")


def test_idle_threads_sleep_only_on_a_busy_machine(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert threads.wait_policy(2, load=2.5) == "PASSIVE"
    assert threads.wait_policy(2, load=1.2) is None
    assert threads.wait_policy(4, load=3.9) is None
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice stands
    assert threads.wait_policy(2, load=9.0) is None


def test_the_wait_policy_is_set_before_torch_loads_and_reaches_openmp():
    """With a load average above the cores (patched), configure() sets OMP_WAIT_POLICY=PASSIVE before torch is
    imported, and libgomp then spins 0 times before sleeping (OMP_DISPLAY_ENV=VERBOSE prints GOMP_SPINCOUNT as it
    read it at load; left unset, it spins 300,000 times)."""
    code = ("import os; os.getloadavg = lambda: (999.0, 999.0, 999.0)\n"
            "from otfuse_cli import threads; print(threads.configure())\n"
            "import torch; torch.ones(4).sum()")
    done = subprocess.run([sys.executable, "-c", code], env=_env(OMP_DISPLAY_ENV="VERBOSE"), capture_output=True,
                          text=True, check=True)
    assert "idle threads sleep" in done.stdout
    assert "GOMP_SPINCOUNT = '0'" in done.stderr
    quiet = code.replace("999.0, 999.0, 999.0", "0.0, 0.0, 0.0")
    done = subprocess.run([sys.executable, "-c", quiet], env=_env(OMP_DISPLAY_ENV="VERBOSE"), capture_output=True,
                          text=True, check=True)
    assert "idle threads sleep" not in done.stdout
    assert "GOMP_SPINCOUNT = '300000'" in done.stderr


def test_one_thread_from_omp_num_threads_never_changes_the_wait_policy(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setitem(sys.modules, "torch", None)  # as before torch's import: the environment route
    assert threads.configure() == (None, "OMP_NUM_THREADS")
    assert "OMP_WAIT_POLICY" not in os.environ
