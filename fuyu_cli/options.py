"""Parameters shared by the commands (Annotated aliases), and the small groups they are passed on in.

Every command spells an option the same way by using these aliases. Nothing here imports torch.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

INPUT, MODEL, GEN, OUT = "Inputs", "Model", "Generation", "Output"


class Dtype(str, enum.Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class Quantize(str, enum.Enum):  # the names model.load_pretrained(quantization=) takes
    none = "none"
    bnb_8bit = "8bit"
    bnb_4bit = "4bit"
    nf4 = "nf4"
    fp4 = "fp4"
    int8 = "int8"
    int4 = "int4"


class Format(str, enum.Enum):
    jsonl = "jsonl"
    text = "text"
    csv = "csv"


def _check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise typer.BadParameter("use auto, cpu, cuda or cuda:N")
    return value


def _check_top_p(value: Optional[float]) -> Optional[float]:
    if value is not None and not 0.0 < value <= 1.0:
        raise typer.BadParameter("must be in (0, 1]")
    return value


PathsArg = Annotated[list[str], typer.Argument(
    metavar="PATHS", help="Images, folders, quoted globs ('shots/*.png'), or - to read paths from stdin.",
    show_default=False)]
RecursiveOpt = Annotated[bool, typer.Option(
    "--recursive", "-r", help="Search folders recursively.", rich_help_panel=INPUT)]
NullOpt = Annotated[bool, typer.Option(
    "--null", "-0", help="Paths on stdin are NUL-separated (find -print0).", rich_help_panel=INPUT)]

ModelOpt = Annotated[Optional[Path], typer.Option(
    "--model", "-m", envvar="FUYU_MODEL", show_default=False, rich_help_panel=MODEL,
    help="Checkpoint folder. Default: the Hugging Face cache copy of adept/fuyu-8b.")]
DeviceOpt = Annotated[str, typer.Option(
    help="auto, cpu, cuda or cuda:N.", callback=_check_device, rich_help_panel=MODEL)]
DtypeOpt = Annotated[Dtype, typer.Option(
    help="auto: bfloat16 where the device supports it, else float16 (GPU) or float32 (CPU).",
    rich_help_panel=MODEL)]
QuantizeOpt = Annotated[Quantize, typer.Option(
    help="Quantize while loading: 8bit, 4bit (= nf4) or fp4 with bitsandbytes; int8 or int4 "
         "with torch's weight-only kernels (faster on CPU).", rich_help_panel=MODEL)]
BatchSizeOpt = Annotated[Optional[int], typer.Option(
    "--batch-size", "-b", min=1, show_default=False, rich_help_panel=MODEL,
    help="Images per forward pass. Default: 2 on CPU, 8 on GPU.")]

MaxNewTokensOpt = Annotated[int, typer.Option(min=1, rich_help_panel=GEN,
                                              help="Stop after this many generated tokens.")]
TemperatureOpt = Annotated[float, typer.Option(min=0.0, rich_help_panel=GEN,
                                               help="0 means greedy decoding.")]
TopPOpt = Annotated[Optional[float], typer.Option(
    callback=_check_top_p, show_default=False, rich_help_panel=GEN,
    help="Nucleus sampling threshold (with --temperature > 0).")]
SeedOpt = Annotated[Optional[int], typer.Option(show_default=False, rich_help_panel=GEN,
                                                help="Seed for sampling, for repeatable runs.")]

FormatOpt = Annotated[Format, typer.Option(
    "--format", "-f", rich_help_panel=OUT,
    help="stdout format: JSON lines, 'path<TAB>text' lines, or CSV with a header.")]
OutputOpt = Annotated[Optional[Path], typer.Option(
    "--output", "-o", dir_okay=False, show_default=False, rich_help_panel=OUT,
    help="Append JSON lines to FILE instead of stdout; a rerun skips images already in it.")]
SidecarOpt = Annotated[bool, typer.Option(
    "--sidecar", help="Also write IMAGE.txt next to each image; a rerun skips images that have one.",
    rich_help_panel=OUT)]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Redo images already in --output or with a sidecar.", rich_help_panel=OUT)]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No progress or summary on stderr; errors still show.",
    rich_help_panel=OUT)]


@dataclass(frozen=True)
class InputSpec:
    paths: list[str]
    recursive: bool = False
    null: bool = False


@dataclass(frozen=True)
class ModelSpec:
    path: Optional[Path]  # None: look in the Hugging Face cache
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"
    batch_size: Optional[int] = None


@dataclass(frozen=True)
class GenOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: Optional[float] = None
    seed: Optional[int] = None


@dataclass(frozen=True)
class OutputSpec:
    format: str = "jsonl"
    output: Optional[Path] = None
    sidecar: bool = False
    overwrite: bool = False
    quiet: bool = False
