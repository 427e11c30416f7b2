"""Parameters shared by the commands (Annotated aliases), and the small groups they are passed on in.

Every command spells an option the same way by using these aliases. Nothing here imports torch.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional, Union

import typer

from fuyu.errors import FuyuError

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


# Shown with every bad --device-map / --max-memory spelling, and in --help.
DEVICE_MAP_EXAMPLE = ("--device-map auto, or --device-map 'embed_tokens=0,vision_embed_tokens=0,"
                      "lm_head=0,layers.0-17=0,layers.18-35=cpu,final_layernorm=cpu'")
MAX_MEMORY_EXAMPLE = "--device-map auto --max-memory '0=20GiB,cpu=30GiB'"
_SIZE = re.compile(r"\s*(\d+(\.\d*)?|\.\d+)\s*([KMG]i?B)\s*", re.IGNORECASE)


def _parse_device_map(value: Optional[str]):
    """--device-map → "auto" or {module: device}. Bad spellings end the run with one `error:`
    line and exit 2 (a FuyuError, not typer's boxed usage message)."""
    if value is None:
        return None
    from fuyu.model.devices import parse_device_map  # imports torch: only when the option is given

    try:
        return parse_device_map(value)
    except (ValueError, RuntimeError) as e:  # RuntimeError: torch does not know the device
        raise FuyuError(_spelling_error("--device-map", value, e), f"e.g. {DEVICE_MAP_EXAMPLE}") from None


def _parse_max_memory(value: Optional[str]):
    """--max-memory → {device: size}; sizes are checked here, not deep inside accelerate."""
    if value is None:
        return None
    from fuyu.model.devices import parse_max_memory

    hint = f"e.g. {MAX_MEMORY_EXAMPLE}"
    try:
        memory = parse_max_memory(value)
    except (ValueError, RuntimeError) as e:
        raise FuyuError(_spelling_error("--max-memory", value, e), hint) from None
    for device, size in memory.items():
        if size.isdigit():
            memory[device] = int(size)  # bytes
        elif not _SIZE.fullmatch(size):
            raise FuyuError(f"--max-memory {value!r}: size {size!r} for {device} is not a size "
                            "(use e.g. 20GiB, 500MB, or bytes)", hint)
    return memory


def _spelling_error(option: str, value: str, e: BaseException) -> str:
    message = " ".join(str(e).split())
    if isinstance(e, RuntimeError):  # torch.device's own text lists every backend; keep it short
        message = "unknown device (use a GPU index, cuda:N, cpu or disk)"
    return message if message.startswith(option) else f"{option} {value!r}: {message}"


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
DeviceMapOpt = Annotated[Optional[str], typer.Option(
    "--device-map", callback=_parse_device_map, metavar="auto|MAP", show_default=False,
    rich_help_panel=MODEL,
    help="Spread the model over GPUs, CPU and disk (overrides --device): auto fills GPUs, then CPU, "
         "then disk (limits: --max-memory); or map every module to a GPU index, cuda:N, cpu or "
         "disk, e.g. 'embed_tokens=0, vision_embed_tokens=0, lm_head=0, layers.0-17=0, "
         "layers.18-35=1, final_layernorm=1'.")]
MaxMemoryOpt = Annotated[Optional[str], typer.Option(
    "--max-memory", callback=_parse_max_memory, metavar="DEVICE=SIZE,...", show_default=False,
    rich_help_panel=MODEL,
    help="With --device-map auto: the most each device may hold, e.g. '0=20GiB,cpu=30GiB' "
         "(GPU index or cuda:N, cpu; KB/MB/GB, KiB/MiB/GiB); the rest goes to disk.")]
OffloadFolderOpt = Annotated[Optional[Path], typer.Option(
    "--offload-folder", file_okay=False, show_default=False, rich_help_panel=MODEL,
    help="With --device-map: where layers sent to disk are written when they cannot be read "
         "from the checkpoint's own files (e.g. a pre-quantized checkpoint), "
         "e.g. --offload-folder /tmp/fuyu-offload.")]
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
CompileOpt = Annotated[bool, typer.Option(
    "--compile", rich_help_panel=GEN,
    help="torch.compile the decode step (CUDA graphs on a GPU); the first batch pays ~20-60 s of "
         "compiling. For GPUs: on CPU the eager path is faster.")]

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
    device_map: Union[str, dict, None] = None  # "auto" or {module: device}, parsed by DeviceMapOpt
    max_memory: Optional[dict] = None  # {device: size}, parsed by MaxMemoryOpt
    offload_folder: Optional[Path] = None

    def __post_init__(self) -> None:
        if self.max_memory is not None and self.device_map != "auto":
            raise FuyuError("--max-memory applies only with --device-map auto",
                            f"e.g. {MAX_MEMORY_EXAMPLE}")
        if self.offload_folder is not None and self.device_map is None:
            raise FuyuError("--offload-folder applies only with --device-map",
                            "e.g. --device-map auto --max-memory cpu=12GiB --offload-folder /tmp/fuyu-offload")


@dataclass(frozen=True)
class GenOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: Optional[float] = None
    seed: Optional[int] = None
    compile: bool = False


@dataclass(frozen=True)
class OutputSpec:
    format: str = "jsonl"
    output: Optional[Path] = None
    sidecar: bool = False
    overwrite: bool = False
    quiet: bool = False
