"""Documents written by hand or by Pillow, for the tests that read them (pages, the CLI)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from PIL import Image, ImageDraw


def pdf_bytes(pages: list[tuple[str, bytes]], encrypt: bytes | None = None, trailer: bytes = b"",
              catalog: bytes = b"", more: tuple[bytes, ...] = ()) -> bytes:
    """A minimal PDF: each page is (extra page-dictionary entries, content stream); 200×100 pt.
    Objects are 1 catalog, 2 page tree, 3/4 page 1 and its content, ..., then `encrypt`, then `more`."""
    objs = [b"<< /Type /Catalog /Pages 2 0 R %s >>" % catalog,
            b"<< /Type /Pages /Count %d /Kids [%s] >>" % (
                len(pages), b" ".join(b"%d 0 R" % (3 + 2 * i) for i in range(len(pages))))]
    for i, (extra, content) in enumerate(pages):
        objs.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] %s /Contents %d 0 R >>"
                    % (extra.encode(), 4 + 2 * i))
        objs.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
    if encrypt:
        objs.append(encrypt)
    objs.extend(more)
    out, offsets = b"%PDF-1.4\n", []
    for n, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (n, obj)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R %s >>\n" % (len(objs) + 1, trailer)
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return out


LEFT_RED = b"1 0 0 rg 0 0 100 100 re f"  # the left half of a 200×100 pt page, red


# PDF standard security handler, revision 2 (40-bit RC4), as the PDF 1.7 spec §7.6.3 describes it:
# a really encrypted file, which pypdfium2 opens with its password (tested below).
_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def rc4(key: bytes, data: bytes) -> bytes:
    s, j = list(range(256)), 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def encrypted_pdf(user_password: bytes, owner_password: bytes = b"owner") -> bytes:
    pad = lambda pw: (pw + _PAD)[:32]  # noqa: E731
    file_id, perms = b"0123456789abcdef", -4
    owner = rc4(hashlib.md5(pad(owner_password)).digest()[:5], pad(user_password))
    key = hashlib.md5(pad(user_password) + owner + struct.pack("<i", perms) + file_id).digest()[:5]
    content = rc4(hashlib.md5(key + (4).to_bytes(3, "little") + b"\0\0").digest()[:10], LEFT_RED)
    encrypt = b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P %d >>" % (
        owner.hex().encode(), rc4(key, _PAD).hex().encode(), perms)
    trailer = b"/Encrypt 5 0 R /ID [<%s> <%s>]" % ((file_id.hex().encode(),) * 2)
    return pdf_bytes([("", content)], encrypt, trailer)


def document_page(i: int, size=(612, 792)) -> Image.Image:
    """A page-like image: white, a coloured title bar and some 'lines of text'."""
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    d.rectangle((40, 40, size[0] - 40, 90), fill=[(200, 30, 30), (30, 160, 30), (30, 30, 200)][i % 3])
    for row in range(8 + i):
        d.rectangle((60, 120 + 40 * row, 60 + (row * 53 + i * 97) % 450 + 50, 135 + 40 * row), fill="black")
    return im


def write_pdf(path: Path, n_pages: int = 3) -> Path:
    """An n-page Letter PDF of document_page()s, written by Pillow."""
    pages = [document_page(i) for i in range(n_pages)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=72)
    return path


def write_mixed_folder(d: Path) -> Path:
    """A folder of a 3-page PDF (a.pdf) and eight small PNGs of different widths: 11 items,
    enough for a run to be interrupted half-way (the exactly-once tests)."""
    write_pdf(d / "a.pdf", 3)
    for i in range(8):
        Image.new("RGB", (60 + i, 40), (200, 30, 30)).save(d / f"img{i}.png")
    return d


def write_tiff(path: Path, sizes=((120, 90), (90, 120), (60, 60))) -> Path:
    """A multi-page TIFF, one frame per size, each a different colour."""
    frames = [Image.new("RGB", size, (40 * i, 200 - 50 * i, 90)) for i, size in enumerate(sizes)]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:])
    return path
