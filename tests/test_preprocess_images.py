"""Real-world image files: every PIL mode, EXIF orientation, extreme sizes and broken files.

Each case gives either a correct batch or one clear ImageError naming the file; none crashes.
All files are generated in tmp_path.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fuyu.preprocess import FuyuProcessor, ImageError, ImageWarning, PreprocessError
from fuyu.preprocess.image import MAX_H, MAX_W, fit_size, load_image
from fuyu.testing.tokenizer import write_tokenizer

PROMPT = "Generate a coco-style caption.\n"
WHITE, BLACK = 1.0, -1.0  # normalised values


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    return FuyuProcessor.from_pretrained(d)


def rgb_array(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def pixel(batch, y: int, x: int) -> torch.Tensor:
    """Normalised RGB of pixel (y, x) of the single (resized) image in `batch`, read out of the patches."""
    cols = -(-fit_size(*batch.image_sizes[0])[1] // 30)
    patch = batch.image_patches[(y // 30) * cols + x // 30].view(30, 30, 3)
    return patch[y % 30, x % 30]


def norm(v) -> torch.Tensor:
    return (torch.tensor(v, dtype=torch.float32) / 255 - 0.5) / 0.5


def same_as_rgb(proc, path, rgb: Image.Image):
    """The file gives exactly the batch of its RGB equivalent."""
    got, want = proc(images=[path], prompts=[PROMPT]), proc(images=[rgb], prompts=[PROMPT])
    assert torch.equal(got.input_ids, want.input_ids)
    assert torch.equal(got.image_patches, want.image_patches)
    assert got.image_sizes == want.image_sizes


def test_rgb_png_file_equals_the_in_memory_image(proc, tmp_path):
    im = Image.fromarray(rgb_array(45, 70))
    im.save(tmp_path / "a.png")
    same_as_rgb(proc, tmp_path / "a.png", im)
    same_as_rgb(proc, str(tmp_path / "a.png"), im)
    same_as_rgb(proc, np.asarray(im), im)


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "P"])
def test_opaque_modes_convert_like_pillow(proc, tmp_path, mode):
    im = Image.fromarray(rgb_array(50, 61)).convert(mode)
    path = tmp_path / ("a.tif" if mode == "CMYK" else "a.png")
    im.save(path)
    same_as_rgb(proc, path, Image.open(path).convert("RGB"))


def test_sixteen_bit_grey_is_scaled_to_eight_bits(proc, tmp_path):
    a = np.zeros((40, 40), np.uint16)
    a[:, 20:] = 65535
    a[:20, :20] = 257 * 100
    Image.fromarray(a).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    batch = proc(images=[tmp_path / "deep.png"], prompts=[PROMPT])
    assert torch.equal(pixel(batch, 30, 30), norm([255] * 3))
    assert torch.equal(pixel(batch, 30, 5), norm([0] * 3))
    assert torch.equal(pixel(batch, 5, 5), norm([100] * 3))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparency_is_composited_on_white(proc, tmp_path, mode):
    a = np.zeros((40, 40, 4), np.uint8)
    a[..., :3] = (200, 10, 10)
    a[:, :20, 3] = 255  # left half opaque, right half transparent
    a[:20, 20:, 3] = 128  # top-right half transparent
    im = Image.fromarray(a, "RGBA").convert(mode)
    src = im if mode == "PA" else tmp_path / "alpha.png"  # PNG cannot store PA
    if mode != "PA":
        im.save(src)
    batch = proc(images=[src], prompts=[PROMPT])
    opaque = np.asarray(im.convert("RGBA"))[5, 5, :3]
    assert torch.equal(pixel(batch, 5, 5), norm(opaque))
    assert torch.equal(pixel(batch, 30, 30), torch.full((3,), WHITE))
    half = pixel(batch, 5, 30)
    assert torch.all((half - (norm(opaque) + WHITE) / 2).abs() <= 2 / 255)


def test_palette_transparency_is_composited_on_white(proc, tmp_path):
    im = Image.new("P", (30, 30), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(0, (0, 0, 15, 30))
    im.info["transparency"] = 0
    im.save(tmp_path / "p.png", transparency=0)
    batch = proc(images=[tmp_path / "p.png"], prompts=[PROMPT])
    assert torch.equal(pixel(batch, 5, 5), torch.full((3,), WHITE))  # transparent index
    assert torch.equal(pixel(batch, 5, 20), norm([255, 0, 0]))


@pytest.mark.parametrize("orientation,transpose", [
    (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90),
    (2, Image.Transpose.FLIP_LEFT_RIGHT),
])
def test_exif_orientation_is_applied(proc, tmp_path, orientation, transpose):
    im = Image.fromarray(rgb_array(40, 90))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(tmp_path / "photo.png", exif=exif)
    batch = proc(images=[tmp_path / "photo.png"], prompts=[PROMPT])
    upright = im.transpose(transpose)
    assert batch.image_sizes == [(upright.height, upright.width)]
    same_as_rgb(proc, tmp_path / "photo.png", upright)
    same_as_rgb(proc, Image.open(tmp_path / "photo.png"), upright)  # PIL input too


def test_animated_gif_uses_the_first_frame(proc, tmp_path):
    frames = [Image.new("RGB", (30, 30), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    batch = proc(images=[tmp_path / "anim.gif"], prompts=[PROMPT])
    assert torch.equal(pixel(batch, 10, 10), norm([255, 0, 0]))


def test_one_pixel_image_is_one_padded_patch(proc, tmp_path):
    Image.new("RGB", (1, 1), (255, 255, 255)).save(tmp_path / "dot.png")
    batch = proc(images=[tmp_path / "dot.png"], prompts=[PROMPT])
    assert batch.image_patches.shape == (1, 2700)
    assert torch.equal(pixel(batch, 0, 0), torch.full((3,), WHITE))
    pad = batch.image_patches[0].view(30, 30, 3)[1:, 1:]
    torch.testing.assert_close(pad, torch.full_like(pad, -0.99215686), atol=1e-7, rtol=0)


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    im = Image.new("1", (20000, 20000), 1)  # 400 Mpx, a few kB on disk
    im.paste(0, (0, 0, 10000, 20000))
    im.save(path)
    return path


def test_20000_square_image_is_refused_with_pillows_limit(proc, huge_png):
    with pytest.raises(ImageError, match=r"huge\.png.*decompression bomb.*MAX_IMAGE_PIXELS"):
        proc(images=[huge_png], prompts=[PROMPT])


def test_20000_square_image_works_once_the_limit_is_raised(proc, huge_png, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    batch = proc(images=[huge_png], prompts=[PROMPT])
    assert batch.image_sizes == [(20000, 20000)] and batch.scale_factors == [0.05400000140070915]
    assert batch.image_patches.shape == (36 * 36, 2700)
    assert torch.equal(pixel(batch, 500, 100), torch.full((3,), BLACK))
    assert torch.equal(pixel(batch, 500, 19000), torch.full((3,), WHITE))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_decompression_bomb_is_refused(proc, tmp_path):
    # A 100 000 × 100 000 PNG header over a few bytes of data: 30 GB if decoded.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
    (tmp_path / "bomb.png").write_bytes(data + png_chunk(b"IEND", b""))
    with pytest.raises(ImageError, match=r"bomb\.png.*decompression bomb"):
        proc(images=[tmp_path / "bomb.png"], prompts=[PROMPT])


@pytest.mark.parametrize("name,content,message", [
    ("empty.png", b"", r"empty\.png: empty file \(0 bytes\)"),
    ("notes.png", b"this is a text file, not a picture\n", r"notes\.png: not an image format"),
    ("garbage.jpg", b"\xff\xd8\xff" + bytes(range(256)) * 4, r"garbage\.jpg"),
])
def test_unreadable_files_raise_image_error(proc, tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError, match=message):
        proc(images=[tmp_path / name], prompts=[PROMPT])


def test_truncated_png_raises_image_error(proc, tmp_path):
    Image.fromarray(rgb_array(200, 200)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png: corrupt or truncated"):
        proc(images=[tmp_path / "cut.png"], prompts=[PROMPT])
    with pytest.raises(ImageError, match=r"cut\.png: corrupt or truncated"):  # lazily opened PIL image
        proc(images=[Image.open(tmp_path / "cut.png")], prompts=[PROMPT])


def test_missing_path_and_directory_raise_image_error(proc, tmp_path):
    with pytest.raises(ImageError, match=r"nope\.png: cannot open"):
        proc(images=[tmp_path / "nope.png"], prompts=[PROMPT])
    with pytest.raises(ImageError, match="is a directory"):
        proc(images=[tmp_path], prompts=[PROMPT])


@pytest.mark.parametrize("bad", [
    np.zeros((10, 10, 3), np.float32), np.zeros((0, 5, 3), np.uint8), np.zeros((4, 4, 2), np.uint8), 42,
])
def test_bad_in_memory_inputs_raise_image_error(proc, bad):
    with pytest.raises(ImageError):
        proc(images=[bad], prompts=[PROMPT])


def test_arrays_of_one_three_and_four_channels_are_accepted(proc):
    a = rgb_array(31, 29)
    grey = proc(images=[a[:, :, 0]], prompts=[PROMPT])
    assert torch.equal(grey.image_patches, proc(images=[a[:, :, :1]], prompts=[PROMPT]).image_patches)
    rgba = np.concatenate([a, np.full((31, 29, 1), 255, np.uint8)], axis=2)
    assert torch.equal(proc(images=[rgba], prompts=[PROMPT]).image_patches,
                       proc(images=[a], prompts=[PROMPT]).image_patches)


def test_image_errors_are_value_errors_and_name_the_file(proc, tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(ValueError) as info:
        proc.prepare_one(tmp_path / "x.png", PROMPT)
    assert isinstance(info.value, PreprocessError) and str(tmp_path / "x.png") in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("size", [(4000, 3000), (2001, 2000), (5000, 2100), (1921, 1081), (6000, 1000),
                                  (2900, 2899), (3000, 4000), (2500, 1500)])
def test_threaded_bilinear_is_pillows_resize_bit_for_bit(size):
    from fuyu.preprocess.image import bilinear

    w, h = size
    s = min(MAX_H / h, MAX_W / w)
    new_w, new_h = int(w * s), int(h * s)
    rng = np.random.default_rng(w * 7 + h)
    for mode in ("RGB", "L"):
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        expected = np.asarray(im.resize((new_w, new_h), Image.Resampling.BILINEAR))
        assert np.array_equal(np.asarray(bilinear(im, new_w, new_h)), expected), (size, mode)


def test_a_large_image_gives_one_image_warning_of_ours_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40×30 = 1200 pixels: over, but under twice
    Image.fromarray(rgb_array(30, 40)).save(tmp_path / "big.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        im = load_image(tmp_path / "big.png")
    assert im.size == (40, 30)
    ours = [w for w in caught if issubclass(w.category, ImageWarning)]
    assert [str(w.message) for w in ours] == [
        f"{tmp_path / 'big.png'}: very large image (40×30, 0 Mpx, over Pillow's 0 Mpx decompression-bomb "
        "limit); decoding it anyway"]
    assert issubclass(ImageWarning, UserWarning)


def test_over_twice_the_limit_stays_an_error_for_frames_too(tmp_path, monkeypatch):
    frames = [Image.fromarray(rgb_array(10, 10)), Image.fromarray(rgb_array(50, 50))]
    frames[0].save(tmp_path / "scan.tif", save_all=True, append_images=frames[1:])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # frame 2 is 2500 pixels
    from fuyu.preprocess import list_pages, load_page

    first, second = list_pages(tmp_path / "scan.tif")
    assert load_page(first).size == (10, 10)
    with pytest.raises(ImageError, match=r"scan\.tif#page=2: refused as a possible decompression bomb"):
        load_page(second)


def test_an_application_shows_a_large_image_as_one_line_and_no_pillow_text(tmp_path):
    """What the CLI does: image_warnings_to around the run; stderr gets our line only."""
    Image.fromarray(rgb_array(30, 40)).save(tmp_path / "big.png")
    script = (
        "import sys\n"
        "from PIL import Image\n"
        "from fuyu.preprocess.image import image_warnings_to, load_image\n"
        "Image.MAX_IMAGE_PIXELS = 1000\n"
        "with image_warnings_to(lambda m: print('warning:', m, file=sys.stderr)):\n"
        "    load_image(sys.argv[1])\n"
        "load_image(sys.argv[1])  # outside: Python's default display, Pillow's text and ours\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.png")], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": ""})
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert lines[0] == f"warning: {tmp_path / 'big.png'}: very large image (40×30, 0 Mpx, over Pillow's " \
                       "0 Mpx decompression-bomb limit); decoding it anyway"
    assert "DecompressionBombWarning" in "\n".join(lines[1:])  # outside only: it really was Pillow's
