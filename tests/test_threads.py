"""Threads follow the CPUs a process may use; OpenMP waits passively (set before torch loads)."""

import os
import subprocess
import sys

import pytest

from fuyu import threads


def test_cpus_are_the_affinity_mask_capped_by_the_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)
    assert threads.available_cpus() == 4
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 1.5)  # 150 ms of CPU per 100 ms
    assert threads.available_cpus() == 2
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 0.2)
    assert threads.available_cpus() == 1


@pytest.mark.parametrize("cpu_max, quota", [("max 100000\n", None), ("150000 100000\n", 1.5),
                                            ("50000 100000\n", 0.5)])
def test_cgroup_v2_cpu_max_is_read(tmp_path, cpu_max, quota):
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert threads.cgroup_quota(tmp_path) == quota
    assert threads.cgroup_quota(tmp_path / "absent") is None


def test_before_torch_sets_openmp_defaults_the_user_has_not_set():
    code = ("import os, sys; from fuyu import threads; assert 'torch' not in sys.modules; "
            "assert threads.before_torch(); import torch; "
            "print(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "FUYU_"))}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    policy, n, torch_threads = out.stdout.split()
    assert policy == "PASSIVE" and int(n) == threads.available_cpus() == int(torch_threads)
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "ACTIVE"  # the user's own setting wins


def test_configure_sets_torch_threads_and_before_torch_is_too_late_once_torch_is_loaded():
    import torch

    before = torch.get_num_threads()
    try:
        assert threads.configure(1) == 1 and torch.get_num_threads() == 1
        assert threads.configure() == threads.available_cpus()
    finally:
        torch.set_num_threads(before)
    assert threads.before_torch(environ={}) is False
