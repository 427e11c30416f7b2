"""`fuyu benchmark` runs its whole workload and ends with one JSON line on stdout."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_benchmark_on_a_random_tiny_model_prints_one_json_line():
    proc = subprocess.run([sys.executable, "-m", "fuyu", "benchmark", "--random", "tiny", "--repeats", "1",
                           "--batch-sizes", "1,2", "--new-tokens", "2", "--device", "cpu", "--dtype", "float32"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert set(res["decode"]) == {"1", "2"}
    assert res["prefill"]["tokens"] > 300 and res["caption_images_per_s"] > 0
    assert "decode batch 2" in proc.stderr  # the table goes to stderr


def test_benchmark_refuses_compare_without_a_checkpoint():
    proc = subprocess.run([sys.executable, "-m", "fuyu", "benchmark", "--random", "tiny", "--compare", "reference"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--compare reference needs --model DIR" in proc.stderr


@pytest.mark.slow
@pytest.mark.parity
def test_benchmark_compare_reference_times_both_on_a_checkpoint(tmp_path):
    from fuyu.testing.checkpoint import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "tiny")
    proc = subprocess.run([sys.executable, "-m", "fuyu", "benchmark", "--model", str(ckpt), "--compare", "reference",
                           "--repeats", "1", "--batch-sizes", "1", "--new-tokens", "2", "--device", "cpu",
                           "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ref = json.loads(proc.stdout.strip().splitlines()[-1])["reference"]
    assert ref["version"] == "4.57.6"
    for case in ("batch1_32tok", "batch8_mixed_20tok"):
        assert ref[case]["ours_s"] > 0 and ref[case]["reference_s"] > 0
        equal, total = map(int, ref[case]["same_tokens"].split("/"))
        assert total > 0 and equal == total  # float32 on the tiny checkpoint: the greedy ids agree
