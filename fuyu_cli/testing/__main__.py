"""`python -m fuyu.testing DIR`: write a random checkpoint in the real on-disk layout (config.json,
safetensors, tokenizer files), to try every command without the real weights. Its answers are
noise; its shapes, files and speed characteristics are real."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SIZES = {  # hidden, heads, layers, vocabulary (None: the tiny tokenizer's own)
    "tiny": dict(hidden=64, heads=4, layers=2, vocab_size=None),
    "mid": dict(hidden=1024, heads=16, layers=8, vocab_size=262144),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuyu.testing", description=__doc__)
    parser.add_argument("folder", type=Path, help="where to write the checkpoint (must not exist)")
    parser.add_argument("--size", choices=SIZES, default="tiny",
                        help="tiny: 2 layers, hidden 64 (~1 MB); mid: 8 layers, hidden 1024, the "
                             "real 262,144 vocabulary (~1.2 GB, bfloat16), the benchmarks' model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.folder.exists() and any(args.folder.iterdir()):
        print(f"error: {args.folder}: already exists — choose a new folder", file=sys.stderr)
        return 2
    import torch

    from fuyu.testing.checkpoint import make_checkpoint

    size = SIZES[args.size]
    dtype = torch.bfloat16 if args.size == "mid" else torch.float32
    make_checkpoint(args.folder, hidden=size["hidden"], heads=size["heads"], layers=size["layers"],
                    vocab_size=size["vocab_size"], dtype=dtype, seed=args.seed,
                    shards=2 if args.size == "mid" else 1)
    print(f"wrote a random {args.size} checkpoint to {args.folder} (its answers are noise)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
