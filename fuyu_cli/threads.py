"""CPU threads for the model (placeholder until the engine work lands: see issue 10)."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may run on (affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def before_torch() -> None:
    """Settings that must be made before torch is imported."""


def configure(threads: int | None = None) -> int:
    """Set torch's intra-op threads to `threads` or the CPUs available; returns the number."""
    import torch

    n = threads or available_cpus()
    torch.set_num_threads(n)
    return n
