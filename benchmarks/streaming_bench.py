"""Does fuyu stream? Time to the first record and peak memory as the number of inputs grows.

    python benchmarks/streaming_bench.py [--counts 200,20000] [--big 100000] [--rounds 2] [--after 15]

Makes a tiny random checkpoint and a folder of N hard links to four small PNGs (so 100,000 inputs
cost no disk), then runs `fuyu caption DIR --output OUT.jsonl --max-new-tokens 8` as a subprocess:
the time from launch to the first line in OUT (model load included, the same for every N), and
the process's peak RSS (VmHWM, sampled until `--after` seconds later, well into the work); then
the run is stopped. --counts run in alternating rounds; --big once. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_inputs(root: Path, n: int) -> Path:
    from PIL import Image

    seeds = root / "seeds"
    if not seeds.exists():
        seeds.mkdir()
        for i, size in enumerate([(64, 48), (48, 64), (90, 30), (60, 60)]):
            Image.new("RGB", size, (40 * i, 120, 200 - 30 * i)).save(seeds / f"s{i}.png")
    folder = root / f"in-{n}"
    if not folder.exists():
        folder.mkdir()
        srcs = sorted(seeds.iterdir())
        for i in range(n):
            os.link(srcs[i % len(srcs)], folder / f"img{i:06d}.png")
    return folder


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (0 once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_once(model: Path, folder: Path, work: Path, after: float) -> dict:
    out = work / f"out-{folder.name}-{time.monotonic_ns()}.jsonl"
    cmd = [sys.executable, "-m", "fuyu", "caption", str(folder), "--model", str(model), "--output", str(out),
           "--max-new-tokens", "8", "--quiet"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUYU_")}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rss, first = 0.0, None
    try:
        while first is None:
            rss = max(rss, peak_rss_mib(proc.pid))
            if proc.poll() is not None:
                raise RuntimeError(f"fuyu exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            if out.exists() and b"\n" in out.read_bytes()[:100_000]:
                first = time.perf_counter() - start
            else:
                time.sleep(0.01)
        while time.perf_counter() - start < first + after and proc.poll() is None:
            rss = max(rss, peak_rss_mib(proc.pid))
            time.sleep(0.05)
        done = sum(1 for _ in out.open("rb"))
    finally:
        proc.send_signal(signal.SIGTERM)  # our own child; it keeps what it wrote
        proc.wait()
    return {"first_record_s": round(first, 2), "peak_rss_mib": round(rss, 1), "records_by_then": done}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="200,20000")
    ap.add_argument("--big", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--after", type=float, default=15.0, help="seconds after the first record to read the peak RSS")
    args = ap.parse_args()

    from fuyu.testing import make_checkpoint
    from fuyu.testing.tokenizer import vocab_size

    counts = [int(c) for c in args.counts.split(",")]
    results: dict[int, list[dict]] = {n: [] for n in counts + ([args.big] if args.big else [])}
    with tempfile.TemporaryDirectory(prefix="fuyu-stream-") as tmp:
        root = Path(tmp)
        model = make_checkpoint(root / "tiny", vocab_size=vocab_size())
        t = time.perf_counter()
        folders = {n: make_inputs(root, n) for n in results}
        print(f"inputs made in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        for r in range(args.rounds):
            for n in counts:
                results[n].append(run_once(model, folders[n], root, args.after))
                print(f"round {r + 1}: {n:>7} inputs: {results[n][-1]}", file=sys.stderr)
        if args.big:
            results[args.big].append(run_once(model, folders[args.big], root, args.after))
            print(f"        {args.big:>7} inputs: {results[args.big][-1]}", file=sys.stderr)
    summary = {str(n): {"first_record_s": [x["first_record_s"] for x in runs],
                        "first_record_median_s": statistics.median(x["first_record_s"] for x in runs),
                        "peak_rss_mib": [x["peak_rss_mib"] for x in runs],
                        "records_by_then": [x["records_by_then"] for x in runs]}
               for n, runs in results.items()}
    print(json.dumps({"after_s": args.after, "inputs": summary}))


if __name__ == "__main__":
    main()
