"""Is a batch-1 decode kernel held back by the memory, or by its own arithmetic, on this CPU?

    python -m fuyu.benchmarks.kernel_bound [--formats bf16,int8,int4] [--shapes 8b|mid-head] [--rounds 6]

For each weight format, through the kernels a load uses (`native.linear`; int8 and int4 laid out by
`kernels.NativeQuantLinear`, int4 on its normal levels in groups of 128), one input row:

  cache   the rate its products read a weight that stays in the CPU's caches (a quarter of the
          last-level cache, 4-8 MB), the best of 30 calls less the cost of a call on a tiny
          weight: what its arithmetic alone allows;
  memory  the rate over the real shapes (`8b`: Fuyu-8B's four layer GEMVs, 402 MB in bf16;
          `mid-head`: the mid checkpoint's 262,144 x 1,024 LM head), read once a round, each round
          right after a streaming read of as many bytes (`arithmetic.stream_read`);
  share   memory / the stream's rate, round by round (medians over the rounds);
  serial  what the stream and the cache rates give if reading and arithmetic did not overlap at
          all: 1 / (1 / stream + 1 / cache), round by round.

A kernel whose memory rate sits at `serial`, not at the stream's, is not hiding its arithmetic
behind the reads: fewer instructions per weight byte is what would move it. On a 2-core AMD EPYC
Zen 4 int8 read at or below its serial figure beside a 54-60 GB/s stream (one run), well above it
beside 36 (benchmarks/RESULTS.md, 2026-12-08). The rates swing with the machine's: run it more
than once. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from fuyu import threads

threads.before_torch()  # as the CLI: threads, huge pages for torch's buffers (a no-op once torch is in)

import torch  # noqa: E402

LAYER_8B = [(12288, 4096), (4096, 4096), (16384, 4096), (4096, 16384)]  # QKV, dense, up, down
MID_HEAD = [(262144, 1024)]
CACHE_BYTES = (4 << 20, 8 << 20)  # the cache-resident weight: a quarter of the last-level cache, within these


def serial(stream: float, cache: float) -> float:
    """The rate of reading and computing one after the other, never at once."""
    return 1 / (1 / stream + 1 / cache)


def last_level_cache() -> int:
    """Bytes of the largest cache the CPU reports (sysfs), 0 where it says nothing."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=0)


def weight(fmt: str, N: int, K: int, g: torch.Generator):
    """(what native.linear takes, bytes the kernel reads) for an N x K weight in `fmt`."""
    from fuyu.model.kernels import NativeQuantLinear
    from fuyu.model.quantize import quantize_int4, quantize_int8

    w = torch.randn(N, K, generator=g) * 0.02
    if fmt == "bf16":
        w = w.bfloat16()
        return w, w.nbytes
    if fmt == "int8":
        q, s = quantize_int8(w)
        m = NativeQuantLinear.from_pieces("int8", {"weight": q, "scales": s}, None, torch.bfloat16)
    else:
        q, sz = quantize_int4(w, 128, "normal")
        m = NativeQuantLinear.from_pieces("int4", {"weight": q, "scales_and_zeros": sz}, None,
                                          torch.bfloat16, 128, "normal")
    return m.spec(), m.weight.nbytes + m.scales.nbytes


def measure(fmt: str, shapes: list[tuple[int, int]], cache_bytes: int, rounds: int, seed: int = 0) -> dict:
    from fuyu.benchmarks import arithmetic
    from fuyu.model import native

    g = torch.Generator().manual_seed(seed)
    big = []  # (weight, its bytes, an input row) for each real shape
    for N, K in shapes:
        w, nbytes = weight(fmt, N, K, g)
        big.append((w, nbytes, torch.randn(1, K, generator=g).bfloat16()))
    nbytes = sum(b for _, b, _ in big)
    # the cache-resident weight: rows of 4,096 inputs as the 8B's, as many as fill cache_bytes; a
    # 4 x 256 one for the cost of a call itself
    K = 4096
    per_row = weight(fmt, 4, K, g)[1] / 4
    small, small_bytes = weight(fmt, max(4, int(cache_bytes / per_row) // 4 * 4), K, g)
    tiny, _ = weight(fmt, 4, 256, g)
    x, xt = torch.randn(1, K, generator=g).bfloat16(), torch.randn(1, 256, generator=g).bfloat16()

    def best(fn, n):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    for w, _, v in big:  # first touch and the OpenMP threads up
        native.linear(v, w)
    overhead = best(lambda: native.linear(xt, tiny), 200)
    took = best(lambda: native.linear(x, small), 30) - overhead
    cache = small_bytes / took if took > 0 else None  # None: the weight too small to time
    read, read_bytes = arithmetic.stream_read(torch.device("cpu"), nbytes)
    streams, rates = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        read()
        streams.append(read_bytes / (time.perf_counter() - t))
        t = time.perf_counter()
        for w, _, v in big:
            native.linear(v, w)
        rates.append(nbytes / (time.perf_counter() - t))
    med = statistics.median
    return {"cache_gbs": None if cache is None else round(cache / 1e9, 1),
            "cache_weight_mb": round(small_bytes / 2 ** 20, 2),
            "memory_gbs": round(med(rates) / 1e9, 1), "stream_gbs": round(med(streams) / 1e9, 1),
            "share": round(med(r / s for s, r in zip(streams, rates)), 3),
            "serial_gbs": None if cache is None else round(med(serial(s, cache) for s in streams) / 1e9, 1),
            "bytes": nbytes, "rounds": [[round(s / 1e9, 1), round(r / 1e9, 1)] for s, r in zip(streams, rates)]}


def main(argv=None) -> dict:
    from fuyu.benchmarks.constrain_bench import cpu
    from fuyu.model import native

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", default="bf16,int8,int4")
    p.add_argument("--shapes", choices=["8b", "mid-head", "tiny"], default="8b",
                   help="tiny: a 64 x 256 weight and a 256 KB cache set, for a quick check")
    p.add_argument("--rounds", type=int, default=6)
    a = p.parse_args(argv)
    if native.library() is None:
        raise SystemExit("kernel_bound: the C kernels are not built here (see docs/speed.md)")
    shapes = {"8b": LAYER_8B, "mid-head": MID_HEAD, "tiny": [(64, 256)]}[a.shapes]
    llc = last_level_cache()
    cache_bytes = 256 << 10 if a.shapes == "tiny" else min(max(llc // 4, CACHE_BYTES[0]), CACHE_BYTES[1])
    out = {"cpu": cpu(), "threads": torch.get_num_threads(), "last_level_cache_mb": round(llc / 2 ** 20, 1),
           "shapes": a.shapes, "formats": {}}
    for fmt in a.formats.split(","):
        if a.shapes == "mid-head" and fmt != "bf16":
            print(f"{fmt}: skipped, the mid head is timed in bf16 only", file=sys.stderr)
            continue
        r = out["formats"][fmt] = measure(fmt, shapes, cache_bytes, a.rounds)
        print(f"{fmt:5}  cache {r['cache_gbs']} GB/s ({r['cache_weight_mb']} MB)  memory {r['memory_gbs']}"
              f"  stream {r['stream_gbs']}  share {r['share']:.0%}  serial {r['serial_gbs']} GB/s", flush=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
