"""Faster kernels for hot spots, each equivalent to the plain PyTorch op it replaces.

On CPU, torch's bf16 GEMV (F.linear at batch 1) reads weights at roughly half the memory
bandwidth; an inductor-compiled multiply-and-reduce with float32 accumulation streams them at
close to the bandwidth limit. The LM head (262,144 × hidden) is most of the bytes a decode step
reads, so it is where this pays.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_MIN_HEAD_ELEMENTS = 1 << 25  # below ~32 M weights the plain op is already fast enough
# Each head shape compiles once. They share one code object, whose recompile limit (8) must never
# be reached: past it dynamo would run the multiply-reduce eagerly, materialising V×D floats.
_MAX_SHAPES = 4
_shapes: set = set()
_failed: list = []  # non-empty once compiling failed (no C compiler, inductor error)


def _gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (B, D) @ w (V, D)ᵀ with float32 accumulation, rounded to x's dtype as a bf16 GEMM does."""
    return (w.float() * x.float()[:, None, :]).sum(-1).to(x.dtype)


@functools.cache
def _compiled_gemv():
    return torch.compile(_gemv, dynamic=False)


def wants_fast_head(weight: torch.Tensor) -> bool:
    """Whether head_logits would take the compiled path for this weight (CPU, 16-bit, large)."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16)
            and weight.numel() >= _MIN_HEAD_ELEMENTS)


def head_logits(h: torch.Tensor, head: torch.nn.Module | torch.Tensor, fast: bool) -> torch.Tensor:
    """Logits (B, V) from hidden states h (B, D) through `head` (the LM head module, or a weight);
    `fast` picks the compiled GEMV at batch 1 (only for a plain Linear's 16-bit weight).

    Only one row: for several rows the generated reduction re-reads the weights (measured 2× slower
    than F.linear at 4 rows), while a GEMM reads them once for all rows.
    """
    if isinstance(head, torch.nn.Module) and not fast:
        return head(h)
    weight = head.weight if isinstance(head, torch.nn.Module) else head
    key = (tuple(weight.shape), weight.dtype, h.dtype)
    if fast and h.shape[0] == 1 and not _failed and (key in _shapes or len(_shapes) < _MAX_SHAPES):
        _shapes.add(key)
        try:
            return _compiled_gemv()(h.contiguous(), weight)
        except Exception as exc:  # the plain op below is always right
            _failed.append(exc)
    return F.linear(h, weight)
