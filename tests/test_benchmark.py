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


@pytest.mark.parametrize("quantize", [[], ["--quantize", "int8"]])
def test_the_real_size_benchmark_reports_load_prefills_decode_and_the_cache(monkeypatch, quantize):
    """What `fuyu benchmark --random 8b` reports, on the tiny model made to take the real-size path."""
    from fuyu.benchmarks import suite
    from tests.helpers import fuyu

    monkeypatch.setattr(suite, "REAL_SIZE_BYTES", 0)
    r = fuyu("benchmark", "--random", "tiny", "--repeats", "1", "--new-tokens", "2", "--device", "cpu",
             "--dtype", "bfloat16", *quantize)
    assert r.code == 0, r.err
    res = json.loads(r.out.strip().splitlines()[-1])
    assert res["real_size"] and res["load_s"] > 0 and 0 < res["load_peak_rss_gb"] <= res["peak_rss_gb"]
    assert res.get("quantize") == (quantize[1] if quantize else None)
    pre = res["prefill_images"]
    assert pre["640x480"]["tokens"] < pre["1280x720"]["tokens"] and pre["1280x720"]["gemm_tflops"] > 0
    assert set(res["decode"]) == {"1"} and res["decode"]["1"]["prompt_tokens"] == pre["640x480"]["tokens"]
    assert res["kv_cache_bytes_per_token"] == 2 * 2 * 64 * 2  # 2 layers × keys and values × hidden 64 × bf16
    assert "caption_images_per_s" not in res and "KV cache per token" in r.err


def test_decode_bytes_count_quantized_weights_too():
    import torch

    from fuyu.benchmarks import arithmetic, workloads

    dev = torch.device("cpu")
    bf16 = workloads.random_model("tiny", dev, torch.bfloat16, 2048)
    int8 = workloads.random_model("tiny", dev, torch.bfloat16, 2048, "int8")
    head = 2048 * 64 * 2  # the 16-bit LM head both read
    layers16, layers8 = arithmetic.decode_bytes(bf16) - head, arithmetic.decode_bytes(int8) - head
    assert 0.5 < layers8 / layers16 < 0.6  # int8 weights + scales, 16-bit biases and LayerNorms


def test_kernel_bound_reports_each_formats_cache_and_memory_rates_and_their_serial_sum(native_lib):
    """benchmarks/kernel_bound: per format, the rate from cache, the rate over the real shapes beside
    the stream's, and the rate the two give one after the other (the bound it tells apart)."""
    from fuyu.benchmarks import kernel_bound

    assert kernel_bound.serial(60.0, 120.0) == pytest.approx(40.0)
    out = kernel_bound.main(["--shapes", "tiny", "--formats", "bf16,int8,int4", "--rounds", "2"])
    assert set(out["formats"]) == {"bf16", "int8", "int4"} and out["threads"] >= 1
    N, K = 64, 256  # tiny's weight; int4: groups of 128 with a float16 (scale, min) pair each
    want = {"bf16": 2 * N * K, "int8": N * K + 4 * N, "int4": N * K // 2 + N * (K // 128) * 4}
    for fmt, r in out["formats"].items():
        assert r["bytes"] == want[fmt], fmt
        assert 0.2 <= r["cache_weight_mb"] <= 0.25 and r["stream_gbs"] > 0  # whole tiles within 256 KB
        assert len(r["rounds"]) == 2 and all(s > 0 for s, _ in r["rounds"])
        if r["cache_gbs"] is not None:  # None where a call on it took no longer than on a tiny one
            assert r["serial_gbs"] <= min(r["stream_gbs"], r["cache_gbs"]) + 0.1
