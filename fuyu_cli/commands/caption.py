"""`fuyu caption`: one caption per image, with the model card's prompt unless --prompt is given."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from fuyu.options import (BatchSizeOpt, DeviceMapOpt, DeviceOpt, Dtype, DtypeOpt, Format,
                              FormatOpt, GenOptions, InputSpec, MaxMemoryOpt, MaxNewTokensOpt,
                              ModelOpt, ModelSpec, NullOpt, OffloadFolderOpt, OutputOpt,
                              OutputSpec, OverwriteOpt, PathsArg, Quantize, QuantizeOpt, QuietOpt,
                              RecursiveOpt, SeedOpt, SidecarOpt, TemperatureOpt, TopPOpt,
                              CompileOpt)

EXAMPLES = """[b]Examples[/b]

  fuyu caption shot.png
  fuyu caption shots/ --recursive --output captions.jsonl    [dim]# rerun to resume[/dim]
  fuyu caption 'scans/*.jpg' --format csv > captions.csv
  find . -name '*.png' -print0 | fuyu caption - --null --sidecar
  fuyu caption shot.png --prompt 'Describe the user interface.'
"""

PromptOpt = Annotated[Optional[str], typer.Option(
    "--prompt", "-p", show_default=False,
    help="Instead of the model card's 'Generate a coco-style caption.' (a newline is added).")]


def caption(
    paths: PathsArg,
    prompt: PromptOpt = None,
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
    max_new_tokens: MaxNewTokensOpt = 64,
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
    """Caption images: one JSON line per image on stdout."""
    from fuyu.pipeline import run_task

    run_task("caption", prompt,
             InputSpec(paths, recursive, null),
             ModelSpec(model, device, dtype.value, quantize.value, batch_size,
                       device_map, max_memory, offload_folder),
             GenOptions(max_new_tokens, temperature, top_p, seed, compile),
             OutputSpec(fmt.value, output, sidecar, overwrite, quiet))


def register(app: typer.Typer) -> None:
    app.command(epilog=EXAMPLES)(caption)
