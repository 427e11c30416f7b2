"""How many threads fuyu computes with, and how idle OpenMP threads wait.

torch sizes its thread pool by the machine's core count, but a container or `taskset` may grant
a process fewer CPUs: then its threads oversubscribe the cores it has. And OpenMP threads spin
while they wait for work, so two fuyu processes that share cores burn each other's time (two
concurrent runs on 2 cores were each ~10x slower than one run). Hence, at CLI start:

    threads.before_torch()     # before anything imports torch: OpenMP reads its variables once
    ...
    threads.configure(n)       # after: torch's intra-op threads = n or the CPUs we may use

Numbers behind the choice: benchmarks/threads_bench.py.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

# What OpenMP does with a thread that has no work: sleep at once instead of spinning ~0.2 s.
WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_quota()
    return max(1, min(n, math.ceil(quota))) if quota else n


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the cgroup may use (cgroup v2 cpu.max, v1 cfs quota), or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # "max 100000" or "150000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def before_torch(threads: int | None = None, environ=os.environ) -> bool:
    """Set OpenMP's variables for this process, unless the user set them: threads (default: the
    CPUs we may use) and the passive wait policy. Returns False (and sets nothing) when torch
    is already imported, since OpenMP has then read them."""
    if "torch" in sys.modules:
        return False
    environ.setdefault("OMP_NUM_THREADS", str(threads or available_cpus()))
    for key, value in WAIT_POLICY.items():
        environ.setdefault(key, value)
    return True


def configure(threads: int | None = None) -> int:
    """torch's intra-op threads: `threads` (the --threads option), else the CPUs we may use.
    Returns the count."""
    import torch

    n = threads or available_cpus()
    if n < 1:
        raise ValueError(f"threads must be at least 1, not {n}")
    torch.set_num_threads(n)
    return n
