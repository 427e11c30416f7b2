"""`python -m fuyu.testing DIR`: write a random checkpoint in the real on-disk layout (config.json,
safetensors, tokenizer files), to try every command without the real weights. Its answers are
noise; its shapes, files and speed characteristics are real."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SIZES = {  # the checkpoint's shape and how it is stored (vocabulary None: the tiny tokenizer's own)
    "tiny": dict(hidden=64, heads=4, layers=2, vocab_size=None, dtype="float32", shards=1),
    "mid": dict(hidden=1024, heads=16, layers=8, vocab_size=262144, dtype="bfloat16", shards=2),
    # Fuyu-8B's exact shapes, stored as the hub stores it: float16 in the hub's key layout, two
    # shards of ~10 GB with the hub's file names, written a block at a time (never one shard held)
    "8b": dict(hidden=4096, heads=64, layers=36, intermediate=16384, vocab_size=262144,
               dtype="float16", max_shard_bytes=10 * 10**9),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuyu.testing", description=__doc__)
    parser.add_argument("folder", type=Path, help="where to write the checkpoint (must not exist)")
    parser.add_argument("--size", choices=SIZES, default="tiny",
                        help="tiny: 2 layers, hidden 64 (~1 MB); mid: 8 layers, hidden 1024, the "
                             "real 262,144 vocabulary (~1.2 GB, bfloat16), the quick check; 8b: "
                             "Fuyu-8B's shapes as the hub stores them (18.8 GB float16 in two shards, "
                             "~2-4 minutes), the workload speed and memory claims are made on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.folder.exists() and any(args.folder.iterdir()):
        print(f"error: {args.folder}: already exists — choose a new folder", file=sys.stderr)
        return 2
    import torch

    from fuyu.testing.checkpoint import make_checkpoint

    size = dict(SIZES[args.size])
    make_checkpoint(args.folder, **{**size, "dtype": getattr(torch, size["dtype"])}, seed=args.seed)
    print(f"wrote a random {args.size} checkpoint to {args.folder} (its answers are noise)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
