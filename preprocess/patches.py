"""uint8 pixels -> normalised 30×30 patches, and the image's placeholder token ids."""

from __future__ import annotations

import numpy as np
import torch

from fuyu.preprocess.image import cpu_count, fit_size, strips, worker_pool

PATCH = 30
PATCH_DIM = PATCH * PATCH * 3  # 2700
PAD_VALUE = 1  # the reference pads with 1.0 *in uint8 units* (before rescaling): -0.99215686 after


def grid(h: int, w: int) -> tuple[int, int]:
    """(rows, cols) of 30×30 patches covering an h×w image; the last row/column may be partial."""
    return -(-h // PATCH), -(-w // PATCH)


def image_tokens(width: int, height: int) -> int:
    """Tokens a width × height picture becomes: a |SPEAKER| per patch of its fit_size grid and a
    |NEWLINE| after each row of patches (1920×1080: 36 × 65 = 2,340)."""
    rows, cols = grid(*fit_size(height, width))
    return rows * (cols + 1)


def patchify(pixels: np.ndarray, normalise: bool = True) -> torch.Tensor:
    """uint8 (h, w, 3) -> float32 (rows*cols, 2700) in [-1, 1]; with normalise=False the uint8
    values in the same layout, for a GPU to normalise after a 4× smaller upload (model/fuyu.py).

    Patch k = i*cols + j (row-major); inside a patch the order is (dy, dx, channel), channel fastest.
    Only the 30-multiple region is padded and normalised, never a full 1080×1920 canvas.
    """
    h, w, _ = pixels.shape
    rows, cols = grid(h, w)
    if (rows * PATCH, cols * PATCH) != (h, w):
        canvas = np.full((rows * PATCH, cols * PATCH, 3), PAD_VALUE, dtype=np.uint8)
        canvas[:h, :w] = pixels
        pixels = canvas
    # (H, W, 3) -> (rows, 30, cols, 30, 3) -> (rows, cols, 30, 30, 3): a strided view, copied once
    view = pixels.reshape(rows, PATCH, cols, PATCH, 3).transpose(0, 2, 1, 3, 4)
    if not normalise:
        return torch.from_numpy(np.ascontiguousarray(view)).view(rows * cols, PATCH_DIM)
    x = np.empty(view.shape, dtype=np.float32)
    bands = [(0, rows)] if rows * cols < _PARALLEL_MIN_PATCHES else strips(rows, cpu_count())
    if len(bands) == 1:
        _normalise(x, view)
    else:  # numpy lets go of the GIL in these loops: patch rows split over the cores
        list(worker_pool().map(lambda band: _normalise(x[band[0]:band[1]], view[band[0]:band[1]]), bands))
    return torch.from_numpy(x).view(rows * cols, PATCH_DIM)


_PARALLEL_MIN_PATCHES = 512  # a 1920×1080 screenshot has 2304


def _normalise(out: np.ndarray, pixels: np.ndarray) -> None:
    """The reference's float64 v*(1/255) -> float32, then (x - 0.5) / 0.5, as v / 127.5 - 1 in
    float32, bit for bit for all 256 values (checked in tests): dividing by 0.5 and by 2 scale
    exactly, so (x - 0.5) / 0.5 = 2x - 1 rounds as one subtraction, and 2 * fl(v / 255) =
    fl(v / 127.5). Two passes over the output (the cast from the strided uint8 view fused into the
    first) where four took 40-70% longer on one core (1920×1080: 3.5 vs 4.6-6.0 ms)."""
    np.divide(pixels, np.float32(127.5), out=out, dtype=np.float32)
    np.subtract(out, np.float32(1), out=out)


def image_token_ids(rows: int, cols: int, speaker_id: int, newline_id: int) -> list[int]:
    """rows × (cols × |SPEAKER|, then |NEWLINE|): length rows*(cols+1); the last row ends with one too."""
    return ([speaker_id] * cols + [newline_id]) * rows
