"""From an input path to what the model sees: which items a file holds (one image, or the pages
of a document), their sizes for batching, and each item's pixels.

Only regular files are ever opened: a FIFO, socket or device named as an input becomes an error
record instead of a wait. URIs (s3://, gs://, hdfs://, file://) are read through pyarrow.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass, field
from typing import Optional

from fuyu.records import Item, is_uri


@dataclass(frozen=True)
class Options:
    pages: Optional[str] = None  # "1-3,7": only these pages of documents
    dpi: Optional[float] = None  # PDF rendering resolution; None: the size the model uses
    all_frames: bool = False  # every frame of animated GIF/WebP


_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}


def special_kind(path: str) -> str | None:
    """None for a regular file (or a URI); else what it is, for messages. Never opens the path."""
    if is_uri(path):
        return None
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing (a dangling link?)" if os.path.islink(path) else "missing"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return None if stat.S_ISREG(mode) else _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def expand(path: str, opts: Options) -> list[Item]:
    """The items one input file holds: one for an image, one per selected page of a PDF or
    multi-page TIFF (or animation, with all_frames). Listing reads headers only. Raises ImageError
    (one line naming the file) for a file that cannot be listed; a page that cannot be read comes
    back as an item whose source carries the error (open_image raises it)."""
    from fuyu.preprocess import ImageError
    from fuyu.preprocess import pages

    kind = special_kind(path)
    if kind is not None:
        raise ImageError(f"{path}: {kind}, not a regular file; fuyu only reads regular files")
    if is_uri(path):
        return [Item(path)]
    select = pages.parse_pages(opts.pages) if opts.pages else None
    listed = pages.list_pages(path, select=select, all_frames=opts.all_frames, dpi=opts.dpi)
    if len(listed) == 1 and listed[0].page is None and listed[0].error:
        raise ImageError(listed[0].error)
    return [Item(p.path, p.page, p.pages, p) for p in listed]


def header_size(item: Item, opts: Options) -> tuple[int, int] | None:
    """(width, height) for grouping same-size images, as listing found it; None when unknown."""
    return getattr(item.source, "size", None)


@dataclass(frozen=True)
class Blob:
    """An image already in memory (e.g. a Ray Data row's bytes): Item(name, source=Blob.of(data))."""

    data: bytes = field(repr=False)
    size: tuple[int, int] | None = None  # (width, height) upright, for grouping by size

    @classmethod
    def of(cls, data: bytes) -> Blob:
        """With its size read from the header (nothing decoded yet)."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                (w, h), turned = im.size, im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF: axes swapped
        except Exception:  # decode() will say what is wrong with it
            return cls(data)
        return cls(data, (h, w) if turned else (w, h))


def open_image(item: Item, opts: Options):
    """What FuyuProcessor.prepare_one takes for this item: a path, or a PIL image (a page, a
    frame, in-memory bytes or a URI's bytes). Meant for the preprocessing thread."""
    if isinstance(item.source, Blob):
        return decode(item.source.data, item.path)
    if item.source is None and item.page is not None:  # a page known only by its number (a record)
        from fuyu.preprocess import pages

        select = pages.parse_pages(str(item.page))
        item = Item(item.path, item.page, item.pages,
                    pages.list_pages(item.path, select=select, all_frames=opts.all_frames, dpi=opts.dpi)[0])
    if item.source is not None:
        from fuyu.preprocess import pages

        return pages.load_page(item.source)
    if is_uri(item.path):
        return decode(read_bytes(item.path), item.path)
    return item.path


def decode(data: bytes, name: str):
    """Encoded image bytes -> a decoded PIL image; a one-line ImageError naming `name` if they
    are not an image Pillow reads."""
    from PIL import Image, UnidentifiedImageError

    from fuyu.preprocess.image import BROKEN, ImageError, broken

    try:
        im = Image.open(io.BytesIO(data))
        im.load()  # decode here, where the name is known
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image format Pillow can read") from None
    except BROKEN as e:
        raise broken(name, e) from None
    return im


def read_bytes(uri: str) -> bytes:
    """A URI's content through pyarrow's file systems (s3://, gs://, hdfs://, file://)."""
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(path) as f:
        return f.read()
