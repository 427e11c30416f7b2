"""Images in, upright uint8 RGB pixels out, resized exactly as the reference does.

Real-world files are made safe here: EXIF orientation, every PIL mode, transparency on white,
and one-line ImageErrors for files that cannot be read.
"""

from __future__ import annotations

import functools
import os
import stat
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np
from PIL import Image, UnidentifiedImageError, features

from fuyu.preprocess.errors import ImageError, ImageWarning

try:  # HEIC/HEIF (phone photos) only with the optional extra: pip install "fuyu[heif]"
    from pillow_heif import register_heif_opener
except ImportError:
    HEIF = False
else:
    register_heif_opener()  # Image.open reads .heic/.heif from here on
    HEIF = True

ImageInput = Union[str, Path, Image.Image, np.ndarray]
MAX_H, MAX_W = 1080, 1920

_ORIENTATION = {  # EXIF tag 0x0112 -> the transpose that makes the image upright (as ImageOps does)
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}
BROKEN = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)

# Image files a folder contributes: what this Pillow can read (AVIF natively since Pillow 11.3).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
                             | ({".avif"} if features.check("avif") else set())
                             | ({".heic", ".heif"} if HEIF else set()))


def describe(src: ImageInput) -> str:
    """A name for messages: the path, the PIL image's filename, or the kind of object."""
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, Image.Image):
        return getattr(src, "filename", "") or f"<PIL {src.mode} image>"
    return f"<array {getattr(src, 'shape', '?')}>"


def load_image(src: ImageInput) -> Image.Image:
    """Path, PIL image or HWC uint8 array -> an upright image in mode "RGB" or "L" (grey)."""
    name = describe(src)
    if isinstance(src, np.ndarray):
        return flatten(_from_array(src, name), name)
    if isinstance(src, Image.Image):
        try:
            src.load()  # a lazily opened file may still fail to decode
        except BROKEN as e:
            raise broken(name, e) from None
        return flatten(upright(src), name)
    if not isinstance(src, (str, Path)):
        raise ImageError(f"{name}: expected a path, a PIL image or a uint8 HxWxC array, "
                         f"got {type(src).__name__}")
    path = Path(src)
    try:
        st = path.stat()
    except OSError as e:
        raise ImageError(f"{path}: cannot open ({e.strerror or e}); check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{path}: is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):  # opening a FIFO would wait forever for a writer
        raise ImageError(f"{path}: not a regular file (a FIFO, socket or device); pass image files")
    if st.st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes); re-export or re-download it")
    try:
        with Image.open(path) as im:  # the first frame of animated files
            check_pixels(name, *im.size)
            im.load()  # decode now, so truncated or corrupt data fails inside this try
            return flatten(upright(im), name)
    except ImageError:
        raise  # check_pixels' refusal; a ValueError, so it must pass before BROKEN
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({e}); downscale it, "
                         "or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image format Pillow can read "
                         "(wrong extension, or not an image at all?)") from None
    except BROKEN as e:
        raise broken(name, e) from None


@contextmanager
def image_warnings_to(show: Callable[[str], None]) -> Iterator[None]:
    """For an application, around a whole run: every ImageWarning goes to show(message), one line
    each, and Pillow's DecompressionBombWarning (no file name, two lines; ours follows it) is
    dropped. Other warnings are untouched. Warning state is process-wide: enter this on the main
    thread before worker threads start, and leave it after they finish."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        warnings.filterwarnings("always", category=ImageWarning)
        previous = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, ImageWarning):
                show(str(message))
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning  # catch_warnings puts the previous one back
        yield


def broken(name: str, e: Exception) -> ImageError:
    return ImageError(f"{name}: corrupt or truncated image data ({e}); re-export or re-download it")


def check_pixels(name: str, w: int, h: int, fix: str = "downscale it") -> None:
    """Pillow's decompression-bomb rule, told in our words: an ImageError over twice
    Image.MAX_IMAGE_PIXELS, one ImageWarning naming the file over it (Pillow's own warning has
    no file name; an application can silence it and show ours)."""
    limit = Image.MAX_IMAGE_PIXELS
    if not limit or w * h <= limit:
        return
    if w * h > 2 * limit:
        raise ImageError(f"{name}: refused as a possible decompression bomb ({w}×{h} pixels, over twice "
                         f"PIL.Image.MAX_IMAGE_PIXELS); {fix}, or raise PIL.Image.MAX_IMAGE_PIXELS "
                         "if you trust the file")
    warnings.warn(ImageWarning(f"{name}: very large image ({w}×{h}, {w * h / 1e6:.0f} Mpx, over Pillow's "
                               f"{limit / 1e6:.0f} Mpx decompression-bomb limit); decoding it anyway"),
                  stacklevel=3)


def _from_array(a: np.ndarray, name: str) -> Image.Image:
    if a.dtype != np.uint8:
        raise ImageError(f"{name}: expected uint8 pixels, got {a.dtype}; convert with .astype(np.uint8)")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or 0 in a.shape:
        raise ImageError(f"{name}: expected an HxW, HxWx1, HxWx3 or HxWx4 array with H, W >= 1")
    return Image.fromarray(np.ascontiguousarray(a))


def upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; unreadable EXIF counts as upright rather than failing the image."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except BROKEN:
        orientation = 1
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return im.transpose(method) if method is not None else im


def flatten(im: Image.Image, name: str) -> Image.Image:
    """Any mode -> "RGB", or "L" for grey sources (resizing grey then replicating it is identical to
    resizing its RGB copy, and 3× cheaper). Transparency is composited on white."""
    mode = im.mode
    if mode in ("RGB", "L") and "transparency" not in im.info:
        return im
    try:
        if mode == "1":
            return im.convert("L")
        if mode.startswith("I"):  # 16-bit grey (I;16*, or I from 16-bit PNGs): scale to 8 bits
            a = np.asarray(im).astype(np.float64)
            return Image.fromarray(np.round(np.clip(a, 0, 65535) / 257).astype(np.uint8))
        if mode == "F":
            return im.convert("L")  # Pillow clips to 0…255
        if mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in im.info:
            rgba = (im.convert("LA") if mode == "La" else im).convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", im.size, "white"), rgba).convert("RGB")
        return im.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV...
    except ValueError:
        raise ImageError(f"{name}: colour mode {mode} is not supported; convert it to RGB first") from None


def fit_size(h: int, w: int) -> tuple[int, int]:
    """Downscale-only target size: int() of float64 products, as the reference (1079×1921 -> 1078×1920)."""
    if h <= MAX_H and w <= MAX_W:
        return h, w
    s = min(MAX_H / h, MAX_W / w)
    # max(1, ...): a 1×5000 strip would truncate to 0 rows, which the reference cannot handle either.
    return max(1, int(h * s)), max(1, int(w * s))


def resize_to_fit(im: Image.Image) -> np.ndarray:
    """"RGB"/"L" image -> uint8 (h', w', 3), downscaled with PIL bilinear on uint8 like the reference."""
    new_h, new_w = fit_size(im.height, im.width)
    if (new_h, new_w) != (im.height, im.width):
        im = bilinear(im, new_w, new_h)
    a = np.asarray(im)
    return np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a


_PARALLEL_MIN_PIXELS = 4_000_000  # below this, thread hand-offs cost more than they save
_BILINEAR = Image.Resampling.BILINEAR


def bilinear(im: Image.Image, new_w: int, new_h: int) -> Image.Image:
    """im.resize((new_w, new_h), BILINEAR), bit for bit, split over the CPU's cores for big images.

    Pillow resizes in two separable passes with a uint8 image in between: a horizontal pass
    (each row on its own) and a vertical pass (each column on its own). Running the first on
    row strips and the second on column strips is therefore exact, and Pillow lets go of the
    GIL inside each pass. Pillow ≥ 13 runs the vertical pass first when the height shrinks much
    more than the width; with our uniform downscale that only happens for images taller than
    wide, so those keep the single-threaded call (tests compare both ways on many sizes).
    """
    W, H = im.size
    workers = cpu_count()
    if workers < 2 or W * H < _PARALLEL_MIN_PIXELS or H > W or new_w == W or new_h == H:
        return im.resize((new_w, new_h), _BILINEAR)
    pool = worker_pool()
    mid = Image.new(im.mode, (new_w, H), None)  # None: not filled, every pixel is pasted over
    rows = strips(H, workers)
    for (top, _), part in zip(rows, pool.map(
            lambda r: im.crop((0, r[0], W, r[1])).resize((new_w, r[1] - r[0]), _BILINEAR), rows)):
        mid.paste(part, (0, top))
    out = Image.new(im.mode, (new_w, new_h), None)
    cols = strips(new_w, workers)
    for (left, _), part in zip(cols, pool.map(
            lambda c: mid.crop((c[0], 0, c[1], H)).resize((c[1] - c[0], new_h), _BILINEAR), cols)):
        out.paste(part, (left, 0))
    return out


def strips(n: int, parts: int) -> list[tuple[int, int]]:
    """[a, b) ranges splitting range(n) into at most `parts` near-equal non-empty pieces."""
    cuts = [n * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.cache
def worker_pool() -> ThreadPoolExecutor:
    """Threads for pixel work that releases the GIL (Pillow passes, numpy loops); never nested."""
    return ThreadPoolExecutor(max_workers=cpu_count(), thread_name_prefix="fuyu-pixels")
