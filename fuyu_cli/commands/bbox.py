"""`fuyu bbox`: find text in an image (boxes in image pixels), or read the text inside a box."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fuyu.options import (BatchSizeOpt, DeviceMapOpt, DeviceOpt, Dtype, DtypeOpt, Format,
                              FormatOpt, GenOptions, InputSpec, MaxMemoryOpt, MaxNewTokensOpt,
                              ModelOpt, ModelSpec, NullOpt, OffloadFolderOpt, OutputOpt,
                              OutputSpec, OverwriteOpt, PathsArg, Quantize, QuantizeOpt, QuietOpt,
                              RecursiveOpt, SeedOpt, SidecarOpt, TemperatureOpt, TopPOpt,
                              CompileOpt)

EXAMPLES = """[b]Examples[/b]

  fuyu bbox receipt.png 'Total'                         [dim]# → boxes x0,y0,x1,y1 in pixels[/dim]
  fuyu bbox receipt.png 'Total' --draw found.png        [dim]# a copy with the boxes drawn[/dim]
  fuyu bbox receipt.png --box 40,380,260,410            [dim]# → the text inside that box[/dim]
  fuyu bbox forms/ --find 'Signature' --draw drawn/ --format text
"""


def _parse_box(value: Optional[str]):
    if value is None:
        return None
    try:
        box = tuple(float(v) for v in value.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise typer.BadParameter("expected four numbers x0,y0,x1,y1 (pixels)")
    return box


FindOpt = Annotated[Optional[str], typer.Option(
    show_default=False, help="Text to locate, for many images (else the last argument).")]
BoxOpt = Annotated[Optional[str], typer.Option(
    callback=_parse_box, metavar="x0,y0,x1,y1", show_default=False,
    help="Read the text inside this box (image pixels) instead of finding text.")]
DrawOpt = Annotated[Optional[Path], typer.Option(
    show_default=False, help="Write a copy with the boxes drawn: a file for one image, "
                             "or a folder (no extension) that gets one copy per image.")]


def bbox(
    paths: PathsArg,
    find: FindOpt = None,
    box: BoxOpt = None,
    draw: DrawOpt = None,
    *,
    recursive: RecursiveOpt = False,
    null: NullOpt = False,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    quantize: QuantizeOpt = Quantize.none,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadFolderOpt = None,
    batch_size: BatchSizeOpt = None,
    max_new_tokens: MaxNewTokensOpt = 32,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    compile: CompileOpt = False,
    fmt: FormatOpt = Format.jsonl,
    output: OutputOpt = None,
    sidecar: SidecarOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Locate text: IMAGE... TEXT (or --find TEXT) gives boxes; IMAGE --box x0,y0,x1,y1 gives text."""
    if box is not None and find is not None:
        raise typer.BadParameter("use either --find or --box", param_hint="--box")
    if box is None and find is None:
        if len(paths) < 2:
            raise typer.BadParameter("give the text to find after the image, or use --find/--box",
                                     param_hint="PATHS")
        *paths, find = paths
    from fuyu.pipeline import run_task

    run_task("ocr" if box else "bbox", find,
             InputSpec(paths, recursive, null),
             ModelSpec(model, device, dtype.value, quantize.value, batch_size,
                       device_map, max_memory, offload_folder),
             GenOptions(max_new_tokens, temperature, top_p, seed, compile),
             OutputSpec(fmt.value, output, sidecar, overwrite, quiet),
             box=box, on_record=_drawer(draw) if draw else None)


def _drawer(target: Path):
    """`on_record` for --draw: one image → the file `target`; several → files in folder `target`."""
    from fuyu.render import draw_boxes

    as_folder = target.is_dir() or not target.suffix
    drawn: list[str] = []

    def draw(rec: dict) -> None:
        if not as_folder and drawn:
            raise ValueError(f"--draw {target} is one file but there are several images; "
                             "give a folder")
        drawn.append(rec["path"])
        dst = target / Path(rec["path"]).name if as_folder else target
        if dst.resolve() == Path(rec["path"]).resolve():
            raise ValueError(f"--draw would overwrite the image itself ({dst})")
        draw_boxes(rec["path"], rec["boxes"], dst)

    return draw


def register(app: typer.Typer) -> None:
    app.command(epilog=EXAMPLES)(bbox)
