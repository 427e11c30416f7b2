"""How many threads fuyu computes with, and how idle OpenMP threads wait.

torch sizes its thread pool by the machine's core count, but a container or `taskset` may grant
a process fewer CPUs: then its threads oversubscribe the cores it has. And OpenMP threads spin
while they wait for work: that keeps a decode step's many short parallel regions fast (on a
2-core AMD EPYC, mid model, batch 1: 37.8 ms/step spinning, 49.9 waiting passively), but two
processes that spin on the same cores burn each other's time (263 ms/step each, 5.6×; passive:
66.7, 1.1×). So the wait policy is chosen by looking at the machine when fuyu starts: if other
work already runs on our CPUs, OpenMP waits passively; if not, it keeps libgomp's default spin.
Hence, at CLI start:

    threads.before_torch()     # before anything imports torch: OpenMP reads its variables once
    ...
    threads.configure(n)       # after: torch's intra-op threads = n or the CPUs we may use

A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT always wins. Numbers: benchmarks/threads_bench.py.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

# What OpenMP does with a thread that has no work, when other work shares our CPUs: sleep at once.
WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}
LOADAVG = Path("/proc/loadavg")


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


def busy_elsewhere(samples: int = 3, interval: float = 0.005, loadavg: Path = LOADAVG) -> bool:
    """Whether other work runs on the CPUs this process may use, now: in each of a few samples of
    the kernel's count of running tasks (/proc/loadavg), the others (this process aside) are more
    than the CPUs outside our share. False where that count cannot be read (not Linux)."""
    outside = max(0, (os.cpu_count() or 1) - available_cpus())
    for i in range(samples):
        if i:
            time.sleep(interval)
        try:
            running = int(loadavg.read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return False
        if running - 1 <= outside:
            return False
    return True


def before_torch(threads: int | None = None, environ=os.environ, busy: bool | None = None) -> bool:
    """Set OpenMP's and torch's variables for this process, unless the user set them: threads
    (default: the CPUs we may use), huge pages for torch's big buffers, and, when other work
    already runs on our CPUs (`busy`, default: measured now), the passive wait policy. Returns False (and sets nothing) when torch is already
    imported, since OpenMP has then read them."""
    if "torch" in sys.modules:
        return False
    environ.setdefault("OMP_NUM_THREADS", str(threads or available_cpus()))
    # torch's CPU allocator asks for transparent huge pages for its big buffers: a Fuyu-8B load
    # faults 2 MB pages, not 4 KB ones (measured: the bf16 load 58-62 s -> 32-46 s, AMD EPYC
    # family 25 model 17, pages in from the page cache); where THP is off it does nothing
    environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return True
    if busy_elsewhere() if busy is None else busy:
        environ.update(WAIT_POLICY)
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
