"""Threads follow the CPUs a process may use; OpenMP waits passively when other work shares our CPUs
(set before torch loads)."""

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


@pytest.mark.parametrize("busy, policy", [(True, "PASSIVE"), (False, "unset")])
def test_before_torch_sets_openmp_defaults_the_user_has_not_set(busy, policy):
    code = ("import os, sys; from fuyu import threads; assert 'torch' not in sys.modules; "
            f"assert threads.before_torch(busy={busy}); import torch; "
            "print(os.environ.get('OMP_WAIT_POLICY', 'unset'), os.environ['OMP_NUM_THREADS'], torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "FUYU_"))}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    got, n, torch_threads = out.stdout.split()
    assert got == policy and int(n) == threads.available_cpus() == int(torch_threads)
    for mine in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "1000"}):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **mine},
                             capture_output=True, text=True, check=True)
        assert out.stdout.split()[0] == mine.get("OMP_WAIT_POLICY", "unset")  # the user's own setting wins


def test_other_work_on_our_cpus_is_seen_in_the_running_task_count(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)  # 2 CPUs outside our share
    loadavg = tmp_path / "loadavg"
    for running, busy in ((1, False), (3, False), (4, True), (9, True)):  # this process is one of them
        loadavg.write_text(f"0.50 0.40 0.30 {running}/300 12345\n")
        assert threads.busy_elsewhere(interval=0, loadavg=loadavg) is busy
    assert threads.busy_elsewhere(loadavg=tmp_path / "absent") is False


def test_configure_sets_torch_threads_and_before_torch_is_too_late_once_torch_is_loaded():
    import torch

    before = torch.get_num_threads()
    try:
        assert threads.configure(1) == 1 and torch.get_num_threads() == 1
        assert threads.configure() == threads.available_cpus()
    finally:
        torch.set_num_threads(before)
    assert threads.before_torch(environ={}) is False
