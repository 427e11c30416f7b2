"""`fuyu bbox`: find text in an image (boxes in image pixels), or read the text inside a box."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from fuyu.errors import FuyuError
from fuyu.options import PathsArg, RunOptions, run_command, text_after_paths

EXAMPLES = """[b]Examples[/b]

  fuyu bbox receipt.png 'Total'                         [dim]# → boxes x0,y0,x1,y1 in pixels[/dim]
  fuyu bbox receipt.png 'Total' --draw found.png        [dim]# a copy with the boxes drawn[/dim]
  fuyu bbox receipt.png --box 40,380,260,410            [dim]# → the text inside that box[/dim]
  fuyu bbox shot.png --find Save --find Cancel          [dim]# one record per target[/dim]
  fuyu bbox forms/ --find 'Signature' --draw drawn/ --format text
"""


def _parse_boxes(values: Optional[list[str]]):
    if not values:
        return None
    boxes = []
    for value in values:
        try:
            box = tuple(float(v) for v in value.split(","))
        except ValueError:
            box = ()
        if len(box) != 4:
            raise typer.BadParameter(f"{value!r}: expected four numbers x0,y0,x1,y1 (pixels)")
        boxes.append(box)
    return boxes


FindOpt = Annotated[Optional[list[str]], typer.Option(
    "--find", metavar="TEXT", show_default=False,
    help="Text to locate (else the last argument); give --find several times for several targets.")]
BoxOpt = Annotated[Optional[list[str]], typer.Option(
    "--box", callback=_parse_boxes, metavar="x0,y0,x1,y1", show_default=False,
    help="Read the text inside this box (image pixels); may be given several times.")]
DrawOpt = Annotated[Optional[Path], typer.Option(
    "--draw", metavar="FILE|DIR", show_default=False,
    help="Write a copy with the boxes drawn: a file for one image, or a folder (no extension) "
         "that gets one copy per image.")]


@run_command(default_max_new_tokens=32)
def bbox(paths: PathsArg, find: FindOpt = None, box: BoxOpt = None, draw: DrawOpt = None, *,
         run: RunOptions) -> None:
    """Locate text: IMAGE... TEXT (or --find TEXT) gives boxes; IMAGE --box x0,y0,x1,y1 gives text."""
    from fuyu.pipeline import run_task
    from fuyu.records import Ask

    targets = list(find or [])
    if not targets and not box:
        paths, last = text_after_paths(
            paths, what="the text to find",
            missing=FuyuError("nothing to find", "fuyu bbox IMAGE 'text', --find TEXT or --box x0,y0,x1,y1"),
            hint="give the text with --find, e.g. fuyu bbox a.png b.png --find Save")
        targets = [last]
    asks = [Ask("bbox", t) for t in dict.fromkeys(targets)] + [Ask("ocr", box=b) for b in dict.fromkeys(box or [])]
    on_record = None
    if draw is not None:
        if run.cluster.address is not None:
            raise FuyuError("--draw draws on this machine, --ray runs on the cluster", "drop one of them")
        as_folder = draw.is_dir() or not draw.suffix
        if not as_folder and not _one_image(paths):
            raise FuyuError(f"--draw {draw} is one file, but the inputs can hold several images",
                            "give a folder (no extension) to get one copy per image")
        from fuyu.pipeline import source_options

        on_record = _drawer(draw, as_folder, source_options(run))
    run_task(asks, run.with_paths(paths), on_record=on_record)


def _one_image(paths: list[str]) -> bool:
    """One argument naming one existing file (not a folder, glob or stdin)."""
    return (len(paths) == 1 and paths[0] != "-" and not glob.has_magic(paths[0])
            and os.path.isfile(paths[0]))


def _drawer(target: Path, as_folder: bool, src):
    """`on_record` for --draw: every box found in an image (all its targets) drawn on one copy."""
    from fuyu.render import draw_boxes

    drawn: dict[str, list] = {}

    def draw(rec) -> None:
        if not as_folder and drawn and rec.id not in drawn:
            raise ValueError(f"--draw {target} is one file but there are several images; give a folder")
        boxes = drawn.setdefault(rec.id, [])
        boxes += rec.boxes or []
        name = Path(rec.path).name if rec.page is None else f"{Path(rec.path).stem}.page-{rec.page}.png"
        dst = target / name if as_folder else target
        if dst.resolve() == Path(rec.path).resolve():
            raise ValueError(f"--draw would overwrite the image itself ({dst})")
        from fuyu import sources
        from fuyu.preprocess.image import load_image
        from fuyu.records import Item

        # Boxes are pixels of the upright image (EXIF orientation applied) or of the rendered page.
        draw_boxes(load_image(sources.open_image(Item(rec.path, rec.page, rec.pages), src)), boxes, dst)

    return draw


def register(app: typer.Typer) -> None:
    app.command(epilog=EXAMPLES)(bbox)
