"""`fuyu ask`: answer one question about each image."""

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

  fuyu ask chart.png 'What is the highest value?'
  fuyu ask invoices/ --question 'What is the total amount?' --format text
  ls shots/*.png | fuyu ask - --question 'Is there an error dialog?' -o answers.jsonl
"""

QuestionOpt = Annotated[Optional[str], typer.Option(
    show_default=False, help="The question, for many images (else the last argument).")]


def ask(
    paths: PathsArg,
    question: QuestionOpt = None,
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
    """Ask a question about images: IMAGE... QUESTION, or IMAGE... --question TEXT."""
    if question is None:
        if len(paths) < 2:
            raise typer.BadParameter("give the question after the image, or use --question",
                                     param_hint="PATHS")
        *paths, question = paths
    if not question.strip():
        raise typer.BadParameter("the question is empty", param_hint="--question")
    from fuyu.pipeline import run_task

    run_task("ask", question,
             InputSpec(paths, recursive, null),
             ModelSpec(model, device, dtype.value, quantize.value, batch_size,
                       device_map, max_memory, offload_folder),
             GenOptions(max_new_tokens, temperature, top_p, seed, compile),
             OutputSpec(fmt.value, output, sidecar, overwrite, quiet))


def register(app: typer.Typer) -> None:
    app.command(epilog=EXAMPLES)(ask)
