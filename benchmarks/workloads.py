"""Workloads: random models of named sizes, test images, timing helpers, our generate end to end.

Times are wall-clock medians (with min/max) over repeats after one warm-up, synchronised on GPU.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fuyu.model import Fuyu, FuyuConfig, generate, load_pretrained
from fuyu.model.weights import build
from fuyu.preprocess import FuyuProcessor
from fuyu.preprocess.tokenizer import Tokenizer

SIZES = {  # --random: named shapes; "mid" is the reference workload (0.74 GB per token)
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    "mid": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16),
    "8b": {},
}
# A caption run over what people feed it: screenshots, documents and photos of different shapes.
MIXED = [(1920, 1080), (1280, 800), (850, 1100), (640, 480), (1024, 768), (1600, 900), (800, 1000),
         (640, 480)]


@dataclass
class Stat:
    min: float
    median: float
    max: float

    @classmethod
    def of(cls, xs: list[float]) -> Stat:
        return cls(min(xs), statistics.median(xs), max(xs))


def timed(fn, repeats: int, device: torch.device) -> Stat:
    """Seconds per call of fn(): one warm-up, then `repeats` synchronised runs."""
    fn()
    out = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return Stat.of(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_tokenizer() -> Tokenizer:
    """A byte-level Fuyu-shaped vocabulary, for --random runs that have no tokenizer files."""
    pieces = ["<unk>", "<s>", "</s>", "|ENDOFTEXT|", "|SPEAKER|", "|NEWLINE|", "▁"]
    pieces += [f"<0x{b:02X}>" for b in range(256)] + [str(n) for n in range(1000)]
    byte0 = pieces.index("<0x00>")
    return Tokenizer(lambda text: [6] + [byte0 + b for b in text.encode()], pieces, "synthetic")


def random_model(size: str, device: torch.device, dtype: torch.dtype, vocab: int,
                 quantization: str | None = None) -> Fuyu:
    """A Fuyu of a named size with random weights, made and quantized a tensor at a time as
    load_pretrained reads a checkpoint (the 8B needs memory for its weights alone)."""
    from fuyu.testing.checkpoint import random_tensors

    cfg = FuyuConfig(**SIZES[size], vocab_size=vocab, eos_token_id=3, image_token_id=4)
    return build(cfg, random_tensors(cfg), device, dtype, quantization=quantization, where=f"random {size}")


def load(model_dir: Path | None, size: str, device: torch.device, dtype: torch.dtype,
         quantization: str | None = None, config=None):
    """(model, processor): a checkpoint through load_pretrained, as the caption command loads it
    (config: its config.json, when read already), or random weights of a named size."""
    if model_dir is not None:
        return (load_pretrained(model_dir, device, dtype, quantization=quantization, config=config),
                FuyuProcessor.from_pretrained(model_dir))
    tok = synthetic_tokenizer()
    vocab = 262144 if size != "tiny" else 2048
    return random_model(size, device, dtype, vocab, quantization), FuyuProcessor(tok)


def test_image(width: int, height: int, seed: int = 0):
    """A screenshot-like picture: flat panels, text-like stripes and some noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 245, np.uint8)
    for _ in range(40):
        x, y = rng.integers(0, width), rng.integers(0, height)
        img[y:y + rng.integers(8, 120), x:x + rng.integers(20, 400)] = rng.integers(0, 255, 3)
    img[::7] = (img[::7] * 0.6).astype(np.uint8)
    return Image.fromarray(img)


def rounds(fns: dict, repeats: int, device: torch.device, warmup: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each fn, called in turn: one warm-up round (unless warmup=False: a
    real-size prefill is minutes), then `repeats` timed rounds."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats + warmup):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if r or not warmup:
                out[name].append(time.perf_counter() - start)
    return out


@torch.inference_mode()
def prefill(model: Fuyu, batch) -> torch.Tensor:
    """Hidden states of a prompt written into a fresh KV cache: generate's first step without the
    LM head (a one-row GEMV, not part of the prefill's GEMMs)."""
    from fuyu.model import KVCache
    from fuyu.model.generate import batch_tensors, forward

    ids, mask, patches = batch_tensors(batch, model.embed_tokens.weight.device)
    cache = KVCache.for_model(model, *ids.shape)
    return forward(model, ids, cache.append(mask), cache, patches)


def peak_memory(device: torch.device) -> dict:
    import resource

    # ru_maxrss is in KiB on Linux
    out = {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)}
    if device.type == "cuda":
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def caption_files(folder: Path, sizes=MIXED) -> list[Path]:
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = folder / f"img{i}_{w}x{h}.png"
        test_image(w, h, seed=i).save(path)
        paths.append(path)
    return paths


def group_by_size(images: list) -> list[list]:
    """Paths or PIL images grouped by pixel size, as the caption command batches them."""
    from PIL import Image

    groups: dict = {}
    for item in images:
        if isinstance(item, Path):
            with Image.open(item) as im:
                size = im.size
        else:
            size = item.size
        groups.setdefault(size, []).append(item)
    return list(groups.values())


def run_ours(model, proc, images, prompt: str, new_tokens: int, **kw):
    """Preprocess and generate, end to end."""
    return generate_on(model, proc(images=images, prompts=[prompt] * len(images)), new_tokens, **kw)


def generate_on(model, batch, new_tokens: int, **kw):
    return generate(model, batch, new_tokens, **kw)


def tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="fuyu-bench-"))
