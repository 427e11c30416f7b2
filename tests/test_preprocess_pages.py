"""Documents as inputs: PDF pages (pypdfium2), TIFF frames, animation frames, page selection,
broken and encrypted documents, and rendering from several threads. Every file is made in the test."""

from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image, features

from fuyu.preprocess import FuyuProcessor, ImageError, Page, list_pages, load_page, parse_pages
from fuyu.preprocess.image import HEIF, fit_size, load_image
from fuyu.preprocess.pages import INPUT_EXTENSIONS, page_id, parse_page_id, render_size

from tests.documents import LEFT_RED, document_page, encrypted_pdf, pdf_bytes

PROMPT = "Generate a coco-style caption.\n"


@pytest.fixture(scope="module")
def three_pages(tmp_path_factory):
    path = tmp_path_factory.mktemp("pdf") / "report.pdf"
    pages = [document_page(i) for i in range(3)]
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=72)  # Letter, 612×792 pt
    return path


# --- PDFs ------------------------------------------------------------------------------------

def test_a_three_page_pdf_is_three_pages_fitted_to_1080_high(three_pages):
    pages = list_pages(three_pages)
    assert [(p.page, p.pages, p.kind) for p in pages] == [(1, 3, "pdf"), (2, 3, "pdf"), (3, 3, "pdf")]
    assert [p.id for p in pages] == [f"{three_pages}#page={n}" for n in (1, 2, 3)]
    assert all(p.size == (835, 1080) for p in pages)  # 612×792 pt at 1080/792: 834.5 -> 835 wide


def test_pdf_pages_render_at_their_listed_size_which_the_processor_does_not_resize(three_pages):
    for page in list_pages(three_pages):
        im = load_page(page)
        assert im.mode == "RGB" and im.size == page.size
        assert fit_size(im.height, im.width) == (im.height, im.width)
        assert np.array_equal(np.asarray(im), np.asarray(load_page(page)))  # deterministic
    first, third = (np.asarray(load_page(p)) for p in list_pages(three_pages, select=parse_pages("1,3")))
    assert not np.array_equal(first, third)
    red_bar = first[65 * 1080 // 792, 417].astype(int)  # the middle of page 1's title bar
    assert tuple(red_bar) == pytest.approx((200, 30, 30), abs=8)


def test_a_rendered_page_prepares_exactly_like_the_same_pixels_saved_as_png(proc, three_pages, tmp_path):
    for page in list_pages(three_pages):
        png = tmp_path / f"page{page.page}.png"
        load_page(page).save(png)
        got, want = proc.prepare_one(page, PROMPT), proc.prepare_one(png, PROMPT)
        assert got.ids == want.ids and torch.equal(got.patches, want.patches)
        assert (got.size, got.scale, got.name) == (want.size, 1.0, page.id)


@pytest.mark.parametrize("points", [(612, 792), (595.28, 841.89), (792, 612), (1190.55, 841.89), (226, 2000),
                                    (3, 5000), (5000, 3), (100, 56.25), (14400, 14400), (1, 1)])
def test_every_page_shape_fits_within_1080_by_1920_and_touches_one_side(points):
    w, h = render_size(*points)
    assert fit_size(h, w) == (h, w)
    assert h == 1080 or w == 1920
    assert abs(w / h - points[0] / points[1]) <= max(1 / h, 1 / w) * (w / h) + 1e-9 or min(w, h) == 1


def test_dpi_renders_at_points_times_dpi_over_72(three_pages):
    page, = list_pages(three_pages, select=parse_pages("2"), dpi=50)
    assert page.size == (425, 550) == load_page(page).size  # 8.5×11 in at 50 dpi
    page, = list_pages(three_pages, select=parse_pages("2"), dpi=300)
    assert page.size == (2550, 3300)  # beyond 1080×1920: the processor downscales it as any image


def test_crop_box_and_rotation_are_applied_as_viewers_show_the_page(tmp_path):
    path = tmp_path / "turned.pdf"
    boxes = ["", "/Rotate 90", "/CropBox [0 0 100 100]", "/CropBox [50 0 150 100] /Rotate 270"]
    path.write_bytes(pdf_bytes([(extra, LEFT_RED) for extra in boxes]))
    pages = list_pages(path)
    assert [p.size for p in pages] == [(1920, 960), (540, 1080), (1080, 1080), (1080, 1080)]
    red, white = (255, 0, 0), (255, 255, 255)
    plain, turned, cropped, both = (load_page(p) for p in pages)
    assert (plain.getpixel((5, 5)), plain.getpixel((1915, 5))) == (red, white)
    assert (turned.getpixel((5, 5)), turned.getpixel((5, 1075))) == (red, white)  # red half on top
    assert (cropped.getpixel((5, 5)), cropped.getpixel((1075, 1075))) == (red, red)  # all red
    assert (both.getpixel((5, 1075)), both.getpixel((5, 5))) == (red, white)  # the crop's red half, turned


def test_transparent_pdf_content_is_on_white_paper(tmp_path):
    path = tmp_path / "empty-page.pdf"
    path.write_bytes(pdf_bytes([("", b"")]))
    im = load_page(list_pages(path)[0])
    assert im.getextrema() == ((255, 255),) * 3


def test_form_field_values_without_an_appearance_are_drawn_as_viewers_do(tmp_path):
    field = (b"<< /Type /Annot /Subtype /Widget /FT /Tx /T (total) /V (8888) /Rect [20 20 180 80] "
             b"/DA (/Helv 40 Tf 0 g) /F 4 /P 3 0 R >>")
    form = b"/AcroForm << /Fields [5 0 R] /NeedAppearances true /DA (/Helv 0 Tf 0 g) " \
           b"/DR << /Font << /Helv << /Type /Font /Subtype /Type1 /BaseFont /Helvetica >> >> >> >>"
    path = tmp_path / "form.pdf"
    path.write_bytes(pdf_bytes([("/Annots [5 0 R]", b"")], catalog=form, more=(field,)))
    ink = 255 - np.asarray(load_page(list_pages(path)[0]).convert("L"))
    assert ink[200:880, 180:1720].sum() > 100 * 255  # the digits, inside the field's rectangle
    assert ink[:150].sum() == 0 and ink[950:].sum() == 0  # nothing outside it


def test_a_pdf_is_recognised_by_its_content_not_its_name(tmp_path):
    path = tmp_path / "scan.dat"
    path.write_bytes(b"junk before the header\n" + pdf_bytes([("", LEFT_RED)]))
    assert [p.kind for p in list_pages(path)] == ["pdf"]


# --- page selection --------------------------------------------------------------------------

@pytest.mark.parametrize("spec,ranges", [
    ("7", ((7, 7),)), ("1-3,7", ((1, 3), (7, 7))), (" 2 - 4 , 9- ", ((2, 4), (9, None))), ("3-3", ((3, 3),)),
])
def test_page_selections_parse(spec, ranges):
    assert parse_pages(spec).ranges == ranges


@pytest.mark.parametrize("spec,reason", [
    ("", "is not N, A-B or A-"), ("1,,2", "is not N, A-B or A-"), ("a", "is not N, A-B or A-"),
    ("-3", "is not N, A-B or A-"), ("1-2-3", "is not N, A-B or A-"), ("1.5", "is not N, A-B or A-"),
    ("0", "pages count from 1"), ("0-2", "pages count from 1"), ("5-2", "5-2 runs backwards"),
])
def test_bad_page_selections_are_one_line_value_errors(spec, reason):
    with pytest.raises(ValueError, match=reason) as info:
        parse_pages(spec)
    assert "\n" not in str(info.value) and repr(spec) in str(info.value)


def test_selection_picks_in_document_order_and_ranges_stop_at_the_last_page(three_pages):
    assert [p.page for p in list_pages(three_pages, select=parse_pages("3,1-2,2"))] == [1, 2, 3]
    assert [p.page for p in list_pages(three_pages, select=parse_pages("2-10"))] == [2, 3]
    assert [p.page for p in list_pages(three_pages, select=parse_pages("2-"))] == [2, 3]


def test_selection_items_beyond_the_end_are_one_error_page_each(three_pages):
    pages = list_pages(three_pages, select=parse_pages("1-2,7,5-9"))
    assert [(p.page, p.error is None) for p in pages] == [(1, True), (2, True), (7, False), (5, False)]
    with pytest.raises(ImageError, match=r"report\.pdf#page=7: page 7 requested, the document has 3 pages$"):
        load_page(pages[2])
    with pytest.raises(ImageError, match=r"report\.pdf#page=5: pages 5-9 requested, the document has 3 pages"):
        load_page(pages[3])


def test_selection_leaves_plain_images_whole(tmp_path):
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    path = tmp_path / "a.png"
    assert list_pages(path, select=parse_pages("2-3")) == [Page(str(path), size=(20, 10))]


def test_page_ids_name_the_page_and_parse_back(three_pages):
    assert page_id("a/b.pdf", 3) == "a/b.pdf#page=3" and page_id("a/b.png", None) == "a/b.png"
    assert parse_page_id("a/b.pdf#page=3") == ("a/b.pdf", 3)
    assert parse_page_id("a/b.png") == ("a/b.png", None)
    assert parse_page_id("x#page=0") == ("x#page=0", None)
    for p in list_pages(three_pages):
        assert parse_page_id(p.id) == (p.path, p.page)


# --- broken documents ------------------------------------------------------------------------

def broken_pdfs(tmp_path, three_pages) -> dict[str, str]:
    """name -> the message expected, for PDFs that cannot be read at all."""
    (tmp_path / "locked.pdf").write_bytes(encrypted_pdf(b"secret"))
    whole = three_pages.read_bytes()
    (tmp_path / "cut.pdf").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "empty.pdf").write_bytes(pdf_bytes([]))
    (tmp_path / "header-only.pdf").write_bytes(b"%PDF-1.7\n")
    return {"locked.pdf": r"the PDF is password-protected; remove the password first \(e\.g\. qpdf",
            "cut.pdf": "corrupt or truncated PDF", "empty.pdf": "the PDF has no pages",
            "header-only.pdf": "corrupt or truncated PDF"}


def test_encrypted_truncated_and_empty_pdfs_are_one_line_image_errors_naming_the_file(tmp_path, three_pages):
    for name, message in broken_pdfs(tmp_path, three_pages).items():
        pages = list_pages(tmp_path / name)
        assert len(pages) == 1 and (pages[0].page, pages[0].kind) == (None, "pdf")
        assert pages[0].id == str(tmp_path / name)
        with pytest.raises(ImageError, match=f"^{tmp_path / name}: {message}") as info:
            load_page(pages[0])
        assert "\n" not in str(info.value)
        # A Page made by hand (no listing) fails the same way when rendering opens the file.
        with pytest.raises(ImageError, match=message):
            load_page(Page(str(tmp_path / name), 1, 1, kind="pdf"))


def test_the_encrypted_fixture_is_really_encrypted(tmp_path):
    import pypdfium2 as pdfium

    (tmp_path / "locked.pdf").write_bytes(encrypted_pdf(b"secret"))
    pdf = pdfium.PdfDocument(tmp_path / "locked.pdf", password="secret")
    try:
        page = pdf[0]
        im = page.render(scale=1).to_pil()
        assert im.getpixel((5, 5)) == (255, 0, 0) and im.getpixel((195, 5)) == (255, 255, 255)
        page.close()
    finally:
        pdf.close()


def test_a_pdf_with_only_an_owner_password_renders_like_any_other(tmp_path):
    (tmp_path / "restricted.pdf").write_bytes(encrypted_pdf(b""))
    im = load_page(list_pages(tmp_path / "restricted.pdf")[0])
    assert im.getpixel((5, 5)) == (255, 0, 0) and im.getpixel((1915, 5)) == (255, 255, 255)


def test_a_fifo_is_an_error_at_once_not_a_wait(tmp_path):
    fifo = tmp_path / "pipe.pdf"
    os.mkfifo(fifo)
    outcome = []

    def attempt():
        pages = list_pages(fifo)
        try:
            load_page(pages[0])
        except ImageError as e:
            outcome.append(str(e))

    worker = threading.Thread(target=attempt, daemon=True)  # daemon: a hang must not hang pytest
    worker.start()
    worker.join(timeout=10)
    assert outcome == [f"{fifo}: not a regular file (a FIFO, socket or device); pass image files"]


# --- frames ----------------------------------------------------------------------------------

def frames(sizes, seed=0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_a_multi_page_tiff_gives_every_frame(tmp_path):
    ims = frames([(50, 40), (30, 60), (45, 45)])
    ims[0].save(tmp_path / "scan.tif", save_all=True, append_images=ims[1:], compression="tiff_deflate")
    pages = list_pages(tmp_path / "scan.tif")
    assert [(p.page, p.pages, p.kind, p.size) for p in pages] == [
        (1, 3, "frame", (50, 40)), (2, 3, "frame", (30, 60)), (3, 3, "frame", (45, 45))]
    for page, im in zip(pages, ims):
        assert np.array_equal(np.asarray(load_page(page)), np.asarray(im))
    assert [p.page for p in list_pages(tmp_path / "scan.tif", select=parse_pages("2-"))] == [2, 3]


def test_a_single_frame_tiff_is_a_plain_image(tmp_path):
    frames([(20, 10)])[0].save(tmp_path / "one.tif")
    assert list_pages(tmp_path / "one.tif") == [Page(str(tmp_path / "one.tif"), size=(20, 10))]


def test_a_corrupt_tiff_frame_is_an_image_error_naming_the_page(tmp_path):
    ims = frames([(50, 40)] * 3)
    ims[0].save(tmp_path / "scan.tif", save_all=True, append_images=ims[1:], compression="tiff_deflate")
    with Image.open(tmp_path / "scan.tif") as im:
        im.seek(1)
        start, length = im.tag_v2[273][0], im.tag_v2[279][0]  # frame 2's strip offset and byte count
    data = bytearray((tmp_path / "scan.tif").read_bytes())
    data[start:start + length] = b"\x12" * length
    (tmp_path / "scan.tif").write_bytes(data)
    first, second, third = list_pages(tmp_path / "scan.tif")
    assert np.array_equal(np.asarray(load_page(first)), np.asarray(ims[0]))
    with pytest.raises(ImageError, match=rf"^{tmp_path}/scan\.tif#page=2: corrupt or truncated image data"):
        load_page(second)
    assert np.array_equal(np.asarray(load_page(third)), np.asarray(ims[2]))


@pytest.mark.parametrize("ext", ["gif", "webp", "png"])
def test_an_animation_is_its_first_frame_unless_all_frames(tmp_path, ext):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    ims = [Image.new("RGB", (30, 20), c) for c in colours]
    path = tmp_path / f"anim.{ext}"
    lossless = {"lossless": True} if ext == "webp" else {}
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=100, **lossless)
    plain, = list_pages(path)
    assert (plain.page, plain.kind, plain.size) == (None, "image", (30, 20))
    assert load_page(plain).getpixel((3, 3)) == colours[0]
    pages = list_pages(path, all_frames=True)
    assert [(p.page, p.pages, p.kind) for p in pages] == [(1, 3, "frame"), (2, 3, "frame"), (3, 3, "frame")]
    assert [load_page(p).convert("RGB").getpixel((3, 3)) for p in pages] == colours


# --- threads ---------------------------------------------------------------------------------

def test_rendering_and_listing_from_several_threads_at_once_gives_the_serial_results(three_pages, tmp_path):
    (tmp_path / "locked.pdf").write_bytes(encrypted_pdf(b"secret"))
    pages = list_pages(three_pages, dpi=30)
    serial = [np.asarray(load_page(p)) for p in pages]
    failures, start = [], threading.Barrier(3)

    def render(order):
        start.wait()
        for _ in range(5):
            for i in order:
                if not np.array_equal(np.asarray(load_page(pages[i])), serial[i]):
                    failures.append(i)
                with pytest.raises(ImageError):
                    load_page(list_pages(tmp_path / "locked.pdf")[0])

    def count():
        start.wait()
        for _ in range(20):
            if len(list_pages(three_pages)) != 3:
                failures.append("count")

    threads = [threading.Thread(target=render, args=(o,)) for o in ([0, 1, 2], [2, 1, 0])]
    threads.append(threading.Thread(target=count))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and failures == []


def test_every_pdfium_call_is_made_under_the_lock(three_pages, tmp_path, monkeypatch):
    import pypdfium2.raw as raw

    from fuyu.preprocess import pages as module

    unlocked = []

    def guarded(name, fn):
        def call(*args):
            if not module._PDFIUM.locked():
                unlocked.append(name)
            return fn(*args)
        return call

    for name in dir(raw):
        if name.startswith(("FPDF", "FORM_")) and hasattr(getattr(raw, name), "argtypes"):  # C functions
            monkeypatch.setattr(raw, name, guarded(name, getattr(raw, name)))
    (tmp_path / "locked.pdf").write_bytes(encrypted_pdf(b"secret"))
    for path in (three_pages, tmp_path / "locked.pdf"):
        for page in list_pages(path, select=parse_pages("2")):
            try:
                load_page(page)
            except ImageError:
                pass
    gc.collect()  # a document or page left unclosed would be closed now, by a finalizer, unlocked
    assert unlocked == []


# --- which files a folder contributes --------------------------------------------------------

def test_folders_take_pdf_and_the_image_formats_this_pillow_reads():
    assert {".pdf", ".png", ".jpg", ".jpeg", ".webp", ".gif", ".tif", ".tiff", ".bmp"} <= INPUT_EXTENSIONS
    assert (".avif" in INPUT_EXTENSIONS) == features.check("avif")
    assert ({".heic", ".heif"} <= INPUT_EXTENSIONS) == HEIF  # only with the fuyu[heif] extra


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF support")
def test_avif_images_load(tmp_path):
    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "photo.avif", quality=100)
    page, = list_pages(tmp_path / "photo.avif")
    im = load_page(page)
    assert im.size == page.size == (40, 30)
    assert np.abs(np.asarray(im, dtype=int) - (10, 200, 10)).max() <= 8


def test_heic_images_load_with_pillow_heif(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    heic = pillow_heif.from_pillow(Image.new("RGB", (64, 48), (200, 20, 20)))
    heic.save(tmp_path / "photo.heic", quality=-1)  # -1: lossless
    im = load_image(tmp_path / "photo.heic")
    assert im.size == (64, 48) and np.abs(np.asarray(im, dtype=int) - (200, 20, 20)).max() <= 8


def test_a_processor_batch_mixes_pages_and_plain_images(proc: FuyuProcessor, three_pages, tmp_path):
    Image.new("RGB", (40, 30), "white").save(tmp_path / "a.png")
    page = list_pages(three_pages)[1]
    batch = proc(images=[page, tmp_path / "a.png"], prompts=[PROMPT, PROMPT])
    assert batch.names == [page.id, str(tmp_path / "a.png")]
    assert batch.image_sizes == [(1080, 835), (30, 40)]
