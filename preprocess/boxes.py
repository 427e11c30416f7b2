"""Box and point coordinates, both directions between image pixels and the model's number tokens.

The model speaks in half-resolution coordinates of the *resized* image, one "0"…"999" token each:
pixels -> tokens is ÷2, × scale, round half to even (as the reference); tokens -> pixels is ×2 ÷ scale.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

from fuyu.preprocess.errors import PromptError


class Box(NamedTuple):
    """A box in original-image pixels, user order (left, top, right, bottom)."""

    x0: int
    y0: int
    x1: int
    y1: int


def to_model_coords(values: Sequence[float], scale: float) -> list[int]:
    """Pixels -> model coordinates exactly as the reference: (v / 2) * scale in float64, then
    round half to even (Python's round on floats = np.round). Outside 0…999 is a PromptError."""
    out = []
    for v in values:
        if not math.isfinite(v):
            raise PromptError(f"coordinate {v} is not a finite number")
        n = round(v / 2 * scale)
        if not 0 <= n <= 999:
            raise PromptError(
                f"coordinate {v:g} becomes {n} after ÷2 × scale {scale:.6g}, outside the model's "
                "0…999; coordinates are pixels of the original image and must lie inside it")
        out.append(n)
    return out


def to_pixels(c: int, axis_scale: float, limit: int | None) -> int:
    """Model coordinate -> pixel along one axis (axis_scale = resized / original), clamped to [0, limit]."""
    v = round(c * 2 / axis_scale)
    return v if limit is None else min(max(v, 0), limit)


def find_spans(ids: Sequence[int], open_id: int, close_id: int, count: int,
               number_of: Callable[[int], int | None]) -> tuple[list[list[int]], list[str]]:
    """Every `open n1 … n_count close` run in ids -> its numbers; malformed runs (wrong length,
    non-number inside, unterminated) are reported by position and skipped. Always advances."""
    spans, problems = [], []
    i = 0
    while i < len(ids):
        if ids[i] != open_id:
            i += 1
            continue
        body = list(ids[i + 1:i + 1 + count])
        numbers = [number_of(t) for t in body]
        end = i + 1 + count
        if len(body) == count and None not in numbers and end < len(ids) and ids[end] == close_id:
            spans.append(numbers)
            i = end + 1
        else:
            what = "unterminated" if close_id not in ids[i + 1:] else "malformed"
            problems.append(f"{what} span at token {i}: expected {count} numbers then the close token")
            i += 1
    return spans, problems
