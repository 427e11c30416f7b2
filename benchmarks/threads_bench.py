"""Two fuyu processes on the same cores: does OpenMP's wait policy decide how much they slow each other?

    python -m fuyu.benchmarks.threads_bench [--model DIR] [--steps 16] [--rounds 3]

Each worker loads a checkpoint (default: a mid-size random one, made once), prefills one 640×480
image and times `steps` decode steps at batch 1. For each OpenMP setting it runs one worker
alone, then two at once, in alternating rounds; medians of the per-step time. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "default (spin)": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    # libgomp: spin this many times, then sleep (its default is 300,000; PASSIVE is 0)
    **{f"GOMP_SPINCOUNT={n}": {"GOMP_SPINCOUNT": str(n)} for n in (2000, 20000, 100000)},
}


def worker(model: str, steps: int) -> None:
    import torch

    from fuyu.model import decode_step, load_pretrained, prefill
    from fuyu.preprocess import FuyuProcessor
    from fuyu.benchmarks.workloads import test_image

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    m = load_pretrained(model, dtype=torch.bfloat16)
    proc = FuyuProcessor.from_pretrained(model)
    batch = proc(images=[test_image(640, 480)], prompts=["Generate a coco-style caption.\n"])
    with torch.inference_mode():
        cache, last = prefill(m, batch, steps + 2)
        ids = decode_step(m, cache, last.argmax(-1)).argmax(-1)  # warm-up step
        start = time.perf_counter()
        for _ in range(steps):
            ids = decode_step(m, cache, ids).argmax(-1)
    print(json.dumps({"step_ms": (time.perf_counter() - start) / steps * 1e3}))


def run(model: str, steps: int, env: dict, n: int) -> list[float]:
    full = {**os.environ, **env}
    cmd = [sys.executable, "-m", "fuyu.benchmarks.threads_bench", "--worker", "--model", model,
           "--steps", str(steps)]
    procs = [subprocess.Popen(cmd, env=full, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1])["step_ms"] for p in procs]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--alone-only", action="store_true", help="time single runs only")
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.model, args.steps)
    model = args.model
    if model is None:
        import torch

        from fuyu.testing import make_checkpoint

        model = str(Path(tempfile.gettempdir()) / "fuyu-threads-bench-mid")
        if not Path(model, "config.json").exists():
            make_checkpoint(model, hidden=1024, heads=16, layers=8, vocab_size=262144,
                            dtype=torch.bfloat16, shards=2)
    run(model, 2, {}, 1)  # kernel choices timed and cached before anything is measured
    results: dict = {name: {"alone": [], "two_at_once": []} for name in SETTINGS}
    for _ in range(args.rounds):
        for name, env in SETTINGS.items():
            results[name]["alone"] += run(model, args.steps, env, 1)
            if not args.alone_only:
                results[name]["two_at_once"] += run(model, args.steps, env, 2)
    summary = {name: {k: round(statistics.median(v), 1) for k, v in r.items() if v} for name, r in results.items()}
    for name, r in summary.items():
        two = f"   two at once {r['two_at_once']:7.1f} ms/step ({r['two_at_once'] / r['alone']:.1f}x)" if "two_at_once" in r else ""
        print(f"{name:26s} alone {r['alone']:7.1f} ms/step{two}")
    from fuyu.model.native.build import cpu_model

    print(json.dumps({"cpu": cpu_model(), "cpus": os.cpu_count(), "steps": args.steps, "ms_per_step": summary}))


if __name__ == "__main__":
    main()
