"""Which torch build each install route in the README resolves to, by pip's own dry-run resolution.

    python benchmarks/install_route.py            # writes benchmarks/install_route.json

Not in the suite: it asks package indexes over the network. Each route runs `pip install --dry-run
--ignore-installed --report` for `torch==2.13.0` with this machine's pip settings cleared (no local wheel
folder, no extra index), so it says what a user's machine with only that index would install:

- `pypi`: the plain route (README: the CUDA build, for GPU machines);
- `pytorch-cpu`: PyTorch's CPU-only index, the route the README gives for CPU machines
  (`make test TORCH_INDEX=...`); it must resolve no `nvidia-*`, `cuda-*` or `triton` package;
- `as-configured`: this machine's own pip settings, what `make test` uses here.

A route whose index cannot be reached is reported as such, not as a pass. Exit code 1 when a reached route
contradicts the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REQUIREMENT = "torch==2.13.0"
CPU_INDEX = os.environ.get("TORCH_CPU_INDEX", "https://download.pytorch.org/whl/cpu")
PYPI = os.environ.get("PYPI_INDEX", "https://pypi.org/simple")
GPU_PREFIXES = ("nvidia-", "cuda-", "triton")

# route -> (index, whether the machine's pip settings stay, whether the README says it pulls GPU packages)
ROUTES = {
    "pypi": (PYPI, False, True),
    "pytorch-cpu": (CPU_INDEX, False, False),
    "as-configured": (None, True, None),
}


def resolve(index: str | None, keep_settings: bool) -> dict:
    env = dict(os.environ)
    if not keep_settings:
        env = {k: v for k, v in env.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull  # no find-links, extra indexes or constraints from this machine
        env["PIP_DEFAULT_TIMEOUT"] = "30"
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--retries", "1", "--report", str(report), REQUIREMENT]
        if index:
            cmd += ["--index-url", index]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            return {"reached": False, "why": last}
        items = json.loads(report.read_text())["install"]
    names = sorted(item["metadata"]["name"].lower() for item in items)
    torch_url = next(item["download_info"]["url"] for item in items if item["metadata"]["name"].lower() == "torch")
    return {"reached": True, "packages": len(names), "names": names,
            "gpu_packages": [n for n in names if n.startswith(GPU_PREFIXES)],
            "torch_from": torch_url.split("?")[0].rsplit("/", 1)[-1]}


def main() -> int:
    results, contradictions = {}, []
    for route, (index, keep, expect_gpu) in ROUTES.items():
        found = resolve(index, keep)
        found["index"] = index or "this machine's pip settings"
        results[route] = found
        if found["reached"]:
            gpu = bool(found["gpu_packages"])
            print(f"{route:14} {found['packages']:3} packages, {len(found['gpu_packages']):2} GPU "
                  f"({found['torch_from']})")
            if expect_gpu is not None and gpu != expect_gpu:
                contradictions.append(f"{route}: README says {'a CUDA' if expect_gpu else 'the CPU-only'} build, "
                                      f"the resolution has {len(found['gpu_packages'])} GPU packages")
        else:
            print(f"{route:14} not reached: {found['why']}")
    out = Path(__file__).with_name("install_route.json")
    out.write_text(json.dumps({"requirement": REQUIREMENT, "routes": results}, indent=2) + "\n")
    for line in contradictions:
        print("contradiction:", line)
    return 1 if contradictions else 0


if __name__ == "__main__":
    sys.exit(main())
