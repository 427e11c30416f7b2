"""Input files -> pages: PDF pages (pypdfium2), TIFF frames, animation frames, or one plain image.

Two steps, so a caller can plan cheaply and decode later on a worker thread:
  list_pages(path)  opens headers only: how many pages, which are selected, their sizes;
  load_page(page)   decodes or renders one page to an upright "RGB"/"L" PIL image.

PDFium is not thread-safe: every pypdfium2 call here runs under one lock, and documents are
opened and closed inside each call, so listing on one thread while rendering on another is safe.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, UnidentifiedImageError

from fuyu.preprocess.errors import ImageError
from fuyu.preprocess.image import (BROKEN, IMAGE_EXTENSIONS, MAX_H, MAX_W, broken, check_pixels, flatten,
                                   load_image, upright)

PDF_EXTENSIONS = frozenset({".pdf"})
INPUT_EXTENSIONS = IMAGE_EXTENSIONS | PDF_EXTENSIONS  # what a folder contributes
ANIMATED_FORMATS = frozenset({"GIF", "WEBP", "PNG", "AVIF"})  # frames only with all_frames

_PDFIUM = threading.Lock()  # guards every pypdfium2 call (PDFium keeps global state)
_ID = re.compile(r"(.*)#page=([1-9][0-9]*)", re.DOTALL)


@dataclass(frozen=True)
class Page:
    """One page of an input file, not yet decoded. `page` is 1-based, None for a plain image."""
    path: str
    page: int | None = None
    pages: int | None = None  # the document's page (or frame) count; None for a plain image
    size: tuple[int, int] | None = None  # (width, height) load_page will return; None if unknown
    kind: Literal["image", "frame", "pdf"] = "image"  # "image": the file's first frame
    dpi: float | None = None  # pdf: None fits the page within 1080×1920
    error: str | None = None  # set when the file or page cannot be read; load_page raises it

    @property
    def id(self) -> str:
        """`path#page=N` for a page of a document, the path for a plain image; also its name in messages."""
        return page_id(self.path, self.page)


def page_id(path: str | Path, page: int | None) -> str:
    return str(path) if page is None else f"{path}#page={page}"


def parse_page_id(id: str) -> tuple[str, int | None]:
    """Inverse of page_id. A plain path that itself ends in `#page=N` cannot be told apart: key
    stored records on their `path` and `page` fields, not on the id."""
    m = _ID.fullmatch(id)
    return (m[1], int(m[2])) if m else (id, None)


# --- page selection (--pages) -----------------------------------------------------------------

@dataclass(frozen=True)
class PageSelection:
    """Parsed `1-3,7,10-`: 1-based inclusive ranges; `last` None means "to the end"."""
    ranges: tuple[tuple[int, int | None], ...]

    def pick(self, count: int) -> tuple[list[int], list[tuple[int, str]]]:
        """(selected pages in document order, (first page, problem) for each item that selects none
        of `count` pages).
        A range running past the end stops at the last page, as pdftoppm -f/-l does."""
        chosen: set[int] = set()
        problems = []
        for first, last in self.ranges:
            if first > count:
                asked = f"page {first}" if first == last else f"pages {first}-{last or 'end'}"
                has = f"{count} page{'s' * (count != 1)}"
                problems.append((first, f"{asked} requested, the document has {has}"))
            else:
                chosen.update(range(first, min(count, last or count) + 1))
        return sorted(chosen), problems


def parse_pages(spec: str) -> PageSelection:
    """`1-3,7,10-` -> PageSelection; ValueError with a one-line reason for anything else."""
    ranges = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:(-)\s*(\d*)\s*)?", item)
        if not m:
            raise ValueError(f"bad page selection {spec!r}: {item.strip()!r} is not N, A-B or A- "
                             "(example: 1-3,7,10-)")
        first = int(m[1])
        last = None if m[2] and not m[3] else int(m[3] or first)
        if first < 1:
            raise ValueError(f"bad page selection {spec!r}: pages count from 1")
        if last is not None and last < first:
            raise ValueError(f"bad page selection {spec!r}: {first}-{last} runs backwards")
        ranges.append((first, last))
    return PageSelection(tuple(ranges))


# --- listing (cheap: headers only) -------------------------------------------------------------

def list_pages(path: str | Path, *, select: PageSelection | None = None, all_frames: bool = False,
               dpi: float | None = None) -> list[Page]:
    """The pages of one file, without decoding them; never raises for a bad file (the returned Page
    carries the error instead, or is left for load_page to report as it reports any image).

    PDFs always give one Page per selected page, TIFFs one per frame when they have several, and
    GIF/WebP/APNG animations one per frame only with `all_frames`; anything else is one plain Page.
    `select` applies to multi-page files only; a selection item beyond the end gives one error Page.
    """
    if dpi is not None and not dpi > 0:
        raise ValueError(f"dpi must be positive, got {dpi}")
    path = str(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open below
            return [Page(path)]
        is_pdf = _sniff_pdf(path)
    except OSError:
        return [Page(path)]  # missing or unreadable: load_page says so
    if is_pdf:
        return _list_pdf(path, select, dpi)
    return _list_frames(path, select, all_frames)


def _sniff_pdf(path: str) -> bool:
    """By content, not name: a PDF may carry junk before its header (the spec allows 1024 bytes)."""
    with open(path, "rb") as f:
        return b"%PDF-" in f.read(1024)


def _list_pdf(path: str, select: PageSelection | None, dpi: float | None) -> list[Page]:
    import pypdfium2 as pdfium  # imported when a PDF is met: 60 ms that image-only runs never pay

    with _PDFIUM:
        try:
            pdf = _open_pdf(path)
        except ImageError as e:
            return [Page(path, kind="pdf", dpi=dpi, error=str(e))]
        try:
            count = len(pdf)
            numbers, problems = select.pick(count) if select else (list(range(1, count + 1)), [])
            sizes = {n: pdf.get_page_size(n - 1) for n in numbers}
        except pdfium.PdfiumError as e:  # a page dictionary it cannot read
            return [Page(path, kind="pdf", dpi=dpi, error=f"{path}: {_pdf_reason(e)}")]
        finally:
            pdf.close()
    pages = [Page(path, n, count, render_size(*sizes[n], dpi), "pdf", dpi) for n in numbers]
    return pages + _problem_pages(path, count, problems, "pdf")


def _list_frames(path: str, select: PageSelection | None, all_frames: bool) -> list[Page]:
    try:
        with Image.open(path) as im:
            count = getattr(im, "n_frames", 1)
            paged = count > 1 and (im.format == "TIFF" or (all_frames and im.format in ANIMATED_FORMATS))
            if not paged:
                return [Page(path, size=_upright_size(im))]
            numbers, problems = select.pick(count) if select else (list(range(1, count + 1)), [])
            sizes = {}
            for n in numbers:
                im.seek(n - 1)
                sizes[n] = _upright_size(im)
    except (UnidentifiedImageError, Image.DecompressionBombError, *BROKEN):
        return [Page(path)]  # load_page gives the same one-line ImageError load_image always has
    pages = [Page(path, n, count, sizes[n], "frame") for n in numbers]
    return pages + _problem_pages(path, count, problems, "frame")


def _problem_pages(path: str, count: int, problems: list[tuple[int, str]], kind: str) -> list[Page]:
    """One error Page per selection item that selects nothing; it carries the item's first page."""
    return [Page(path, first, count, kind=kind, error=f"{page_id(path, first)}: {problem}")
            for first, problem in problems]


def _upright_size(im: Image.Image) -> tuple[int, int]:
    w, h = im.size
    try:
        turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # the orientations that swap the axes
    except BROKEN:
        turned = False
    return (h, w) if turned else (w, h)


# --- loading (decodes; meant for worker threads) -----------------------------------------------

def load_page(page: Page) -> Image.Image:
    """Page -> upright "RGB" or "L" image (PDF pages: "RGB" on white, at page.size). One-line
    ImageError naming `path#page=N` when it cannot be read."""
    if page.error:
        raise ImageError(page.error)
    if page.kind == "pdf":
        return _render_pdf(page)
    if page.kind == "frame":
        return _load_frame(page)
    return load_image(page.path)


def render_size(width_pt: float, height_pt: float, dpi: float | None = None) -> tuple[int, int]:
    """(width, height) in pixels for a page of that many points: fitted within 1920×1080 at the
    page's aspect ratio (so Fuyu's processor leaves it as is), or points × dpi/72 when dpi is given."""
    s = dpi / 72 if dpi else min(MAX_W / width_pt, MAX_H / height_pt)
    w, h = max(1, round(width_pt * s)), max(1, round(height_pt * s))
    return (min(w, MAX_W), min(h, MAX_H)) if not dpi else (w, h)


def _render_pdf(page: Page) -> Image.Image:
    import pypdfium2 as pdfium
    import pypdfium2.raw as raw

    name = page.id
    with _PDFIUM:
        pdf = _open_pdf(page.path)
        doc_page = bitmap = None
        try:
            number = page.page or 1
            if number > len(pdf):
                raise ImageError(f"{name}: page {number} requested, the document has {len(pdf)}")
            doc_page = pdf[number - 1]
            w, h = render_size(*doc_page.get_size(), page.dpi)
            check_pixels(name, w, h, "lower --dpi")
            bitmap = _bitmap(w, h)
            # The page's crop box and /Rotate are applied by PDFium, as viewers show the page; the
            # page is stretched onto exactly w×h (under a pixel off its aspect ratio).
            args = (bitmap, doc_page, 0, 0, w, h, 0, raw.FPDF_ANNOT)
            raw.FPDF_RenderPageBitmap(*args)
            if pdf.formenv:  # filled-in form fields that have no appearance stream of their own
                raw.FPDF_FFLDraw(pdf.formenv, *args)
            return bitmap.to_pil()  # "RGB", a copy (Pillow converts the BGR buffer): outlives the bitmap
        except pdfium.PdfiumError as e:  # a page it cannot load
            raise ImageError(f"{name}: {_pdf_reason(e)}") from None
        finally:
            for obj in (bitmap, doc_page, pdf):  # close now, under the lock, not in a finalizer later
                if obj is not None:
                    obj.close()


def _bitmap(w: int, h: int):
    import pypdfium2 as pdfium
    import pypdfium2.raw as raw

    bitmap = pdfium.PdfBitmap.new_native(w, h, raw.FPDFBitmap_BGR)
    bitmap.fill_rect((255, 255, 255, 255), 0, 0, w, h)  # white paper under transparent content
    return bitmap


def _open_pdf(path: str):
    """pypdfium2 document with forms initialised; ImageError saying what to do if it cannot open.
    Call with _PDFIUM held."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as raw

    if not os.path.isfile(path):  # missing, or not a regular file (opening a FIFO would wait)
        raise ImageError(f"{path}: cannot open as a PDF (missing, or not a regular file); check the path")
    # The raw call, not PdfDocument(path): pypdfium2 reads PDFium's last error even when the load
    # succeeded with zero pages, and that error is a stale one from an earlier failure.
    handle = raw.FPDF_LoadDocument(os.fsencode(path), None)
    if not handle:
        raise ImageError(f"{path}: {_pdf_reason(raw.FPDF_GetLastError())}")
    pdf = pdfium.PdfDocument(handle)  # owns the handle from here: pdf.close() closes it
    try:
        # Form fields whose values have no appearance stream are drawn only through a form
        # environment, which must exist before pages are loaded. XFA forms are left out: this
        # PDFium build cannot run them, and pypdfium2 would log two lines of advice on stderr.
        if pdf.get_formtype() == raw.FORMTYPE_ACRO_FORM:
            pdf.init_forms()
        count = len(pdf)
    except pdfium.PdfiumError as e:
        pdf.close()
        raise ImageError(f"{path}: {_pdf_reason(e)}") from None
    if count == 0:
        pdf.close()
        raise ImageError(f"{path}: the PDF has no pages; check that it is the document you meant")
    return pdf


def _pdf_reason(error: int | Exception) -> str:
    """What went wrong and what to do, from PDFium's error code (or a pypdfium2 exception)."""
    import pypdfium2.raw as raw

    if error == raw.FPDF_ERR_PASSWORD:
        return ("the PDF is password-protected; remove the password first "
                "(e.g. qpdf --password=PASSWORD --decrypt in.pdf out.pdf)")
    if error == raw.FPDF_ERR_SECURITY:
        return "the PDF uses an encryption scheme PDFium cannot open; decrypt it first (e.g. with qpdf)"
    if error == raw.FPDF_ERR_FILE:
        return "cannot open the file; check the path and its permissions"
    if isinstance(error, Exception):  # a page that cannot be loaded or sized
        return f"corrupt PDF ({str(error).rstrip('.')}); re-export or re-download it"
    return "corrupt or truncated PDF (PDFium cannot parse it); re-export or re-download it"


def _load_frame(page: Page) -> Image.Image:
    name = page.id
    if not os.path.isfile(page.path):  # gone since it was listed, or never a regular file
        return load_image(page.path)  # its one-line ImageError
    try:
        with Image.open(page.path) as im:
            try:
                im.seek(page.page - 1)
            except EOFError:
                raise ImageError(f"{name}: the file has fewer than {page.page} frames now; "
                                 "run again") from None
            check_pixels(name, *im.size)
            im.load()
            return flatten(upright(im), name)
    except ImageError:
        raise  # a ValueError, so it must pass before BROKEN
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refused as a possible decompression bomb ({e}); downscale it, "
                         "or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
    except (UnidentifiedImageError, *BROKEN) as e:
        raise broken(name, e) from None
