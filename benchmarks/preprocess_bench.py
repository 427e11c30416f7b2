"""Preprocessing time, ours vs the reference (transformers 4.57.6 FuyuProcessor), same inputs, one run.

    python -m fuyu.benchmarks.preprocess_bench [--checkpoint DIR] [--repeats 7]

Images are synthetic and in memory (decoding a file costs the same on both sides): a 1920×1080
screenshot, a 4000×3000 photo and a 640×480 image. Prints median milliseconds over the repeats
after one warm-up call, and the speed-up; the last line is the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fuyu.preprocess import FuyuProcessor

PROMPT = "Generate a coco-style caption.\n"


def screenshot(h: int, w: int, rng: np.random.Generator) -> Image.Image:
    """Flat panels with text-like speckle: the typical UI input."""
    a = np.full((h, w, 3), 245, np.uint8)
    for _ in range(40):
        y, x = rng.integers(0, h - 40), rng.integers(0, w - 100)
        a[y:y + rng.integers(20, 300), x:x + rng.integers(50, 600)] = rng.integers(0, 256, 3)
    text = rng.random((h, w)) < 0.05
    a[text] = 20
    return Image.fromarray(a)


def photo(h: int, w: int, rng: np.random.Generator) -> Image.Image:
    """Smooth gradients plus sensor noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 200, yy / h * 200, (xx + yy) / (h + w) * 255], axis=-1)
    noise = rng.normal(0, 12, (h, w, 1)).astype(np.float32)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="a directory with the tokenizer (default: the tiny test one)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    ckpt = args.checkpoint
    if ckpt is None:
        from fuyu.testing.tokenizer import write_tokenizer

        ckpt = Path(tempfile.mkdtemp(prefix="fuyu-bench-"))
        write_tokenizer(ckpt)
    ours = FuyuProcessor.from_pretrained(ckpt)

    from transformers import AutoTokenizer, FuyuImageProcessor
    from transformers import FuyuProcessor as ReferenceProcessor
    from transformers.utils import logging

    logging.set_verbosity_error()
    reference = ReferenceProcessor(image_processor=FuyuImageProcessor(), tokenizer=AutoTokenizer.from_pretrained(ckpt))

    rng = np.random.default_rng(0)
    cases = {"screenshot 1920x1080": screenshot(1080, 1920, rng), "photo 4000x3000": photo(3000, 4000, rng),
             "image 640x480": photo(480, 640, rng)}
    results = {}
    print(f"{'input':<22}{'ours ms':>10}{'reference ms':>15}{'speed-up':>10}")
    for name, im in cases.items():
        ours_ms = median_ms(lambda: ours(images=[im], prompts=[PROMPT]), args.repeats)
        ref_ms = median_ms(lambda: reference(images=im, text=PROMPT), args.repeats)
        results[name] = {"ours_ms": round(ours_ms, 2), "reference_ms": round(ref_ms, 2),
                         "speedup": round(ref_ms / ours_ms, 2)}
        print(f"{name:<22}{ours_ms:>10.1f}{ref_ms:>15.1f}{ref_ms / ours_ms:>9.1f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
