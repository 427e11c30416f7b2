"""What does Ray cost once it runs? `--ray local --workers 1` against the plain --output-dir run.

    python benchmarks/ray_bench.py [--images 64] [--shard-size 16] [--rounds 3] [--max-new-tokens 64]

Both caption the same images (copies of examples/assets, three sizes) with a tiny random
checkpoint into fresh folders, in alternating rounds. Each run's summary line states its working
time, start-up aside: the plain run from after the model loaded to the end, the Ray run from its
first part starting to its last part finishing (inside the worker), so cluster start, worker start
and model load are left out of both, and Ray's per-part scheduling and the cluster's own processes
stay in. Both use every CPU here (the one worker's share is all of them). The last line is JSON:
medians and the ratio, which the issue wants at most 1.15.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "examples" / "assets"
WORK = re.compile(r" records(?:, \d+ failed)? in ([0-9.]+) s ")
STARTUP = re.compile(r"(?:model loaded in|start-up \(cluster, workers, model loads\)) ([0-9.]+) s")


def run(args: list[str]) -> tuple[float, float]:
    """(working seconds, start-up seconds) from the summary line of `fuyu ARGS`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUYU_")}
    p = subprocess.run([sys.executable, "-m", "fuyu", *args], env=env, capture_output=True, text=True)
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    work, startup = WORK.search(last), STARTUP.search(last)
    if p.returncode or not work:
        raise RuntimeError(f"fuyu exited {p.returncode}: {p.stderr[-2000:]}")
    return float(work.group(1)), float(startup.group(1)) if startup else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    from fuyu.testing import make_checkpoint
    from fuyu.testing.tokenizer import vocab_size

    times: dict[str, list[tuple[float, float]]] = {"plain": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="fuyu-raybench-") as tmp:
        root = Path(tmp)
        model = make_checkpoint(root / "tiny", vocab_size=vocab_size())
        images = root / "images"
        images.mkdir()
        assets = sorted(ASSETS.glob("*.png"))
        for i in range(args.images):
            shutil.copy(assets[i % len(assets)], images / f"img{i:03d}.png")
        common = ["caption", str(images), "--model", str(model), "--shard-size", str(args.shard_size),
                  "--max-new-tokens", str(args.max_new_tokens)]
        for r in range(args.rounds):
            for name, extra in (("plain", []), ("ray", ["--ray", "local", "--workers", "1"])):
                out = root / f"{name}-{r}"
                times[name].append(run([*common, "--output-dir", str(out), *extra]))
                print(f"round {r + 1}: {name:>5}: {times[name][-1][0]:.1f} s working, "
                      f"{times[name][-1][1]:.1f} s start-up", file=sys.stderr)
    plain = statistics.median(t for t, _ in times["plain"])
    ray = statistics.median(t for t, _ in times["ray"])
    print(json.dumps({"images": args.images, "shard_size": args.shard_size,
                      "plain_s": [t for t, _ in times["plain"]], "ray_s": [t for t, _ in times["ray"]],
                      "plain_startup_s": [s for _, s in times["plain"]], "ray_startup_s": [s for _, s in times["ray"]],
                      "plain_median_s": plain, "ray_median_s": ray, "ratio": round(ray / plain, 3)}))


if __name__ == "__main__":
    main()
