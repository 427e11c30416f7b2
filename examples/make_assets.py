"""Draw the example images in examples/assets/ (a settings-dialog screenshot, an invoice page and
a bar chart) and two invoices as PDFs in examples/invoices/ (one of two pages). Pillow only, with
its bundled font, so the output is the same on every machine.

    python examples/make_assets.py        # rewrites examples/assets/*.png and examples/invoices/*.pdf
"""

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ASSETS = Path(__file__).parent / "assets"
INVOICES = Path(__file__).parent / "invoices"
INK, MUTED, LINE, ACCENT = (32, 33, 36), (95, 99, 104), (218, 220, 224), (26, 115, 232)


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def screenshot() -> Image.Image:
    """A 800×500 desktop app window: title bar, sidebar, a form and two buttons."""
    im = Image.new("RGB", (800, 500), (246, 247, 249))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, 799, 36], fill=(60, 64, 67))
    d.text((16, 9), "Settings - Photo Library", font=font(16), fill="white")
    for i, color in enumerate([(237, 106, 94), (245, 191, 79), (98, 197, 84)]):
        d.ellipse([740 + 18 * i, 12, 752 + 18 * i, 24], fill=color)
    d.rectangle([0, 37, 180, 499], fill=(232, 234, 237))
    for i, item in enumerate(["General", "Account", "Storage", "Notifications", "Privacy", "Help"]):
        y = 60 + 40 * i
        if item == "Storage":
            d.rounded_rectangle([10, y - 8, 170, y + 24], 6, fill=(210, 227, 252))
        d.text((24, y), item, font=font(16), fill=ACCENT if item == "Storage" else INK)
    d.text((210, 60), "Storage", font=font(26), fill=INK)
    d.text((210, 100), "Choose where new photos are saved.", font=font(15), fill=MUTED)
    for i, (label, value) in enumerate([("Library folder", "/home/ana/Pictures"),
                                        ("Cache size limit", "2048 MB")]):
        y = 150 + 70 * i
        d.text((210, y), label, font=font(15), fill=INK)
        d.rounded_rectangle([210, y + 22, 600, y + 52], 4, outline=(189, 193, 198), fill="white")
        d.text((220, y + 29), value, font=font(15), fill=INK)
    d.rectangle([210, 310, 226, 326], outline=ACCENT, width=2)
    d.line([213, 318, 218, 323, 224, 312], fill=ACCENT, width=2)
    d.text((236, 309), "Upload photos automatically", font=font(15), fill=INK)
    d.rounded_rectangle([560, 430, 660, 466], 6, outline=(189, 193, 198), fill="white")
    d.text((585, 439), "Cancel", font=font(16), fill=ACCENT)
    d.rounded_rectangle([676, 430, 776, 466], 6, fill=ACCENT)
    d.text((708, 439), "Save", font=font(16), fill="white")
    return im


NORTHWIND = ("No. 2024-0117", "Northwind Supplies Ltd.\n12 Harbour Road\nBristol BS1 4QA",
             [("Printer paper A4", "10", "45.00"), ("Toner cartridge", "2", "118.50"),
              ("Desk lamp", "1", "32.90"), ("USB-C cable", "4", "27.60")], "224.00 GBP")
FABRIKAM = ("No. F-88213", "Fabrikam Office GmbH\nHafenstrasse 3\n20457 Hamburg",
            [("Office chair", "2", "398.00"), ("Monitor arm", "2", "119.80")], "517.80 EUR")


def document(invoice=NORTHWIND, date: str | None = None) -> Image.Image:
    """A 600×780 invoice page with a header, addresses, a table and a total."""
    number, sender, items, total = invoice
    im = Image.new("RGB", (600, 780), "white")
    d = ImageDraw.Draw(im)
    d.text((50, 50), "INVOICE", font=font(34), fill=INK)
    d.text((400, 58), number, font=font(16), fill=MUTED)
    if date:
        d.text((400, 80), f"Date: {date}", font=font(15), fill=MUTED)
    d.text((50, 110), sender, font=font(15), fill=INK, spacing=6)
    d.text((330, 110), "Bill to:\nWilliams & Co.\n88 Station Street\nLeeds LS1 2AB",
           font=font(15), fill=INK, spacing=6)
    rows = [("Item", "Qty", "Price"), *items]
    y = 250
    for i, (item, qty, price) in enumerate(rows):
        f = font(16 if i == 0 else 15)
        d.text((50, y), item, font=f, fill=INK)
        d.text((380, y), qty, font=f, fill=INK)
        d.text((470, y), price, font=f, fill=INK)
        y += 36
        d.line([50, y - 8, 550, y - 8], fill=LINE if i else INK, width=1 if i else 2)
    d.text((330, y + 20), "Total due:", font=font(18), fill=INK)
    d.text((460, y + 20), total, font=font(18), fill=INK)
    d.text((50, 660), "Payment within 30 days. Thank you for your business.", font=font(14), fill=MUTED)
    return im


def terms() -> Image.Image:
    """A second page: payment terms."""
    im = Image.new("RGB", (600, 780), "white")
    d = ImageDraw.Draw(im)
    d.text((50, 50), "Terms and conditions", font=font(24), fill=INK)
    lines = ["1. Payment is due within 30 days of the invoice date.",
             "2. Late payments incur interest of 1% per month.",
             "3. Goods remain our property until paid in full.",
             "Bank: Hamburger Sparkasse, IBAN DE44 2005 0550 1234 5678 90"]
    for i, line in enumerate(lines):
        d.text((50, 110 + 34 * i), line, font=font(15), fill=INK)
    return im


def chart() -> Image.Image:
    """A 640×420 bar chart: life expectancy at birth by country, values on the bars."""
    im = Image.new("RGB", (640, 420), "white")
    d = ImageDraw.Draw(im)
    d.text((40, 20), "Life expectancy at birth, 2018 (years)", font=font(20), fill=INK)
    data = [("Japan", 84.2), ("Spain", 83.4), ("France", 82.5), ("Brazil", 75.7), ("India", 69.4)]
    x0, y0, h = 80, 360, 250  # axis origin and the pixel height of 90 years
    d.line([x0, y0, 600, y0], fill=INK, width=2)
    d.line([x0, y0, x0, 80], fill=INK, width=2)
    for tick in range(0, 91, 30):
        y = y0 - tick / 90 * h
        d.text((40, y - 8), str(tick), font=font(13), fill=MUTED)
        d.line([x0 - 4, y, x0, y], fill=INK)
    for i, (name, value) in enumerate(data):
        left = x0 + 25 + i * 100
        top = y0 - value / 90 * h
        d.rectangle([left, top, left + 60, y0 - 1], fill=ACCENT)
        d.text((left + 10, top - 20), f"{value}", font=font(14), fill=INK)
        d.text((left + 4, y0 + 8), name, font=font(14), fill=INK)
    return im


if __name__ == "__main__":
    ASSETS.mkdir(exist_ok=True)
    for name, draw in [("screenshot", screenshot), ("document", document), ("chart", chart)]:
        path = ASSETS / f"{name}.png"
        draw().save(path, optimize=True)
        print(f"{path} {path.stat().st_size // 1024} kB")
    INVOICES.mkdir(exist_ok=True)
    # 72 pixels per inch: each page is 600×780 points, which fuyu renders at 830×1080 pixels.
    for name, pages in [("northwind-2024-0117.pdf", [document(NORTHWIND, "2024-03-14")]),
                        ("fabrikam-F-88213.pdf", [document(FABRIKAM, "2024-04-02"), terms()])]:
        path = INVOICES / name
        pages[0].save(path, save_all=True, append_images=pages[1:], resolution=72)
        print(f"{path} {path.stat().st_size // 1024} kB")
