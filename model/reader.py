"""Reading safetensors shards one tensor at a time, into fresh memory, never twice.

A safetensors file is 8 bytes of header length, a JSON header ({key: {dtype, shape,
data_offsets}}) and the tensors' bytes. Each tensor here is read with pread straight into the
tensor it becomes (torch's CPU allocations are 64-byte aligned, which the CPU kernels stream
fastest), converting dtype (float16 → bfloat16, say) a block at a time: host memory holds the
loaded weights plus one block, never a second copy of a weight, and nothing is memory-mapped, so
the process's resident size is what it owns. (A memory-mapped tensor counts in the RSS until its
whole shard is closed, and had to be copied to 64-byte alignment anyway.)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fuyu.model.errors import CheckpointError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER = 100 << 20  # safetensors' own limit
BLOCK_BYTES = 64 << 20  # staging block for a converting read (stored dtype ≠ wanted dtype)
MAX_READ = 1 << 30  # bytes per pread call (Linux returns at most ~2 GiB per call)


def read_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__, offset of the data section) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= MAX_HEADER:
                raise ValueError("header length out of range")
            header = json.loads(f.read(size))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e}); the file is truncated or "
                              "corrupt, re-download or re-convert it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is no JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + size


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are, and how to read them."""

    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def read(self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """A new tensor of the stored values, floating ones cast to `dtype`, on `device`: on the
        CPU read straight into it; converting or elsewhere through one staging block at a time."""
        want = dtype if dtype is not None and self.dtype.is_floating_point else self.dtype
        device = torch.device(device)
        out = torch.empty(self.shape, dtype=want, device=device)
        if self.numel == 0:
            return out
        with open(self.file, "rb", buffering=0) as f:
            if want == self.dtype and device.type == "cpu":
                _pread_into(f.fileno(), out, self.offset, self.file)
                return out
            flat = out.view(-1)
            step = max(1, BLOCK_BYTES // self.dtype.itemsize)
            block = torch.empty(min(step, self.numel), dtype=self.dtype)
            for i in range(0, self.numel, step):
                part = block[:min(step, self.numel - i)]
                _pread_into(f.fileno(), part, self.offset + i * self.dtype.itemsize, self.file)
                flat[i:i + part.numel()].copy_(part)
        return out


    def read_rows(self, start: int, stop: int, dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu") -> torch.Tensor:
        """Rows start:stop (of the first dimension) alone, as `read` reads the whole tensor."""
        row = self.nbytes // self.shape[0]
        part = StoredTensor(self.key, self.file, self.dtype, (stop - start, *self.shape[1:]), self.offset + start * row)
        return part.read(dtype, device)


def _pread_into(fd: int, t: torch.Tensor, offset: int, path: Path) -> None:
    view = memoryview(t.view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + MAX_READ]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: ends before its tensors do; the file is truncated or corrupt, "
                                  "re-download or re-convert it")
        done += n


def tensors(path: Path) -> list[StoredTensor]:
    """The tensors of one safetensors file, in the order their bytes are stored, checked against
    the file's size (a truncated download fails here, before anything is read)."""
    header, data = read_header(path)
    size = path.stat().st_size
    out = []
    for key, info in header.items():
        try:
            dtype, shape = DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key!r} has an unreadable header entry "
                                  f"({str(info)[:80]}); re-download or re-convert the file") from None
        t = StoredTensor(key, path, dtype, shape, data + begin)
        if end - begin != t.nbytes:
            raise CheckpointError(f"{path}: tensor {key!r} has {end - begin} bytes for shape "
                                  f"{list(shape)} of {info['dtype']}; the file is corrupt")
        if data + end > size:
            raise CheckpointError(f"{path}: ends before its tensors do ({size} bytes, tensor {key!r} "
                                  f"ends at {data + end}); the file is truncated or corrupt, re-download or "
                                  "re-convert it")
        out.append(t)
    return sorted(out, key=lambda t: t.offset)
