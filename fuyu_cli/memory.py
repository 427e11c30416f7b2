"""Will the model fit in memory? Weight bytes from safetensors headers against MemAvailable.

Only file headers are read (a few KB per shard, no tensors), so the check costs nothing next to
loading; it runs once torch and the model package are imported anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

# safetensors dtype → bytes per element; floating types are the ones loading casts to --dtype.
STORED_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
                "BOOL": 1}
FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}
MAX_HEADER = 100 << 20  # safetensors' own limit


def read_header(path: Path) -> dict:
    """A safetensors file's JSON header: {name: {"dtype", "shape", "data_offsets"}, ...}."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file")
        return json.loads(f.read(size))


def weight_bytes(ckpt: Path, dtype: str) -> int:
    """Bytes the checkpoint's tensors take once loaded in `dtype`: floating tensors scaled from
    their stored size, others (pre-quantized int8 weights) as stored."""
    from fuyu.model.weights import shard_files  # the loader's own list (torch is loaded by then)

    total = 0
    for shard in shard_files(ckpt):
        for name, info in read_header(shard).items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            stored = info["dtype"]
            if stored in FLOATS:
                total += (end - begin) * DTYPE_SIZES[dtype] // STORED_SIZES[stored]
            else:
                total += end - begin
    return total


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable in bytes, or None where the kernel does not say (not Linux, no /proc)."""
    try:
        for line in meminfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "MemAvailable":
                amount, _, unit = value.strip().partition(" ")
                return int(amount) * (1024 if unit.strip().lower() == "kb" else 1)
    except (OSError, ValueError):
        pass
    return None


def fit_warning(name: str, needed: int, available: int | None, dtype: str) -> str | None:
    """The one-line suggestion when `needed` bytes of weights exceed `available`, else None."""
    if available is None or needed <= available:
        return None
    return (f"{name} needs ~{needed / 1e9:.1f} GB in {dtype} but only {available / 1e9:.1f} GB of "
            "memory is available; try --quantize int8 (or int4) to fit")


def checkpoint_fit_warning(ckpt: Path, name: str, dtype: str, available: int | None) -> str | None:
    """fit_warning for a checkpoint folder; None when its headers cannot be read (the loader then
    reports the real problem with the checkpoint)."""
    if available is None or dtype not in DTYPE_SIZES:
        return None
    try:
        needed = weight_bytes(ckpt, dtype)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return fit_warning(name, needed, available, dtype)
