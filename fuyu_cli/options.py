"""The options caption, ask and bbox share, declared once, and the groups they are passed on in.

`run_command` appends every shared option to a command's own parameters (Typer reads the
signature) and hands the command one `RunOptions`; a new shared option is one row in `SHARED`
and one field in a spec. Nothing here imports torch.
"""

from __future__ import annotations

import enum
import functools
import inspect
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Union

import typer

from fuyu.errors import FuyuError, one_line

INPUT, MODEL, GEN, OUT, SCALE = "Inputs", "Model", "Generation", "Output", "Past one machine"


class Dtype(str, enum.Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class Quantize(str, enum.Enum):  # the names fuyu.model.load_pretrained(quantization=) takes
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
    parquet = "parquet"


# --- parsers (callbacks): a bad spelling is one `error:` line and exit 2 before any work -------

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
    """--device-map → "auto" or {module: device}."""
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
    message = one_line(e)
    if isinstance(e, RuntimeError):  # torch.device's own text lists every backend; keep it short
        message = "unknown device (use a GPU index, cuda:N, cpu or disk)"
    return message if message.startswith(option) else f"{option} {value!r}: {message}"


def _check_top_p(value: Optional[float]) -> Optional[float]:
    if value is not None and not 0.0 < value <= 1.0:
        raise typer.BadParameter("must be in (0, 1]")
    return value


def _parse_shard(value: Optional[str]) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise typer.BadParameter("use I/N with 0 <= I < N, e.g. 0/4 (e.g. $SLURM_ARRAY_TASK_ID/4)")
    return int(m[1]), int(m[2])


def _check_pages(value: Optional[str]) -> Optional[str]:
    if value is not None:
        from fuyu.preprocess.pages import parse_pages

        try:
            parse_pages(value)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    return value


def _output_path(value: Optional[Path]) -> Optional[Path]:
    """-o - is stdout (None)."""
    return None if value is not None and str(value) == "-" else value


# --- the arguments and options, as Annotated aliases ---------------------------------------------

FLAG = ""  # metavar of on/off options: nothing after the name in --help

PathsArg = Annotated[list[str], typer.Argument(
    metavar="PATH", show_default=False,
    help="Images, documents (PDF, multi-page TIFF), folders, quoted globs ('shots/*.png'), URIs "
         "(s3://…, with --ray or --output-dir), or - to read paths from stdin as they arrive.")]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", metavar=FLAG, rich_help_panel=OUT,  # -q is ask's --question
    help="No progress or summary on stderr; errors and warnings still show.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", envvar="FUYU_MODEL", show_default=False, metavar="DIR|REPO", rich_help_panel=MODEL,
    help="Checkpoint folder, or a Hugging Face repo id (found in the local cache, or fetched "
         "with --download). Default: adept/fuyu-8b.")]
DeviceOpt = Annotated[str, typer.Option(
    help="auto, cpu, cuda or cuda:N.", metavar="DEVICE", callback=_check_device, rich_help_panel=MODEL)]
DtypeOpt = Annotated[Dtype, typer.Option(
    help="auto: bfloat16 (on a GPU without it, float16); on a CPU without bf16 arithmetic the "
         "kernels compute in float32 over the bf16 weights. Fuyu-8B takes 18.8 GB in 16-bit, "
         "37.6 GB in float32.",
    metavar="auto|bfloat16|float16|float32", rich_help_panel=MODEL)]
ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", min=1, metavar="N", show_default=False, rich_help_panel=MODEL,
    help="CPU threads for the model. Default: the CPUs this process may use (affinity, cgroup quota).")]


@dataclass(frozen=True)
class Shared:
    """One shared option: its parameter name, Annotated type and default."""

    name: str
    annotation: Any
    default: Any


# Every option caption/ask/bbox take besides their own, in --help order.
SHARED = [
    Shared("recursive", Annotated[bool, typer.Option(
        "--recursive", "-r", metavar=FLAG, rich_help_panel=INPUT,
        help="Search folders recursively (hidden files and folders are skipped).")], False),
    Shared("null", Annotated[bool, typer.Option(
        "--null", "-0", metavar=FLAG, rich_help_panel=INPUT,
        help="Paths on stdin are NUL-separated (find -print0).")], False),
    Shared("pages", Annotated[Optional[str], typer.Option(
        "--pages", metavar="1-3,7", callback=_check_pages, show_default=False, rich_help_panel=INPUT,
        help="Only these pages of PDFs and multi-page TIFFs (1-based).")], None),
    Shared("dpi", Annotated[Optional[float], typer.Option(
        "--dpi", min=10, max=1200, metavar="DPI", show_default=False, rich_help_panel=INPUT,
        help="Render PDF pages at this resolution. Default: the size the model uses, "
             "1080×1920 at most (≈98 DPI for a Letter page).")], None),
    Shared("all_frames", Annotated[bool, typer.Option(
        "--all-frames", metavar=FLAG, rich_help_panel=INPUT,
        help="Every frame of animated GIF/WebP files, each a page (default: the first frame).")], False),
    Shared("model", ModelOpt, None),
    Shared("download", Annotated[bool, typer.Option(
        "--download", metavar=FLAG, rich_help_panel=MODEL,
        help="Fetch the model from the Hugging Face Hub when it is not cached (asked first on a "
             "terminal); resumes an interrupted download. HF_HUB_OFFLINE=1 forbids it.")], False),
    Shared("device", DeviceOpt, "auto"),
    Shared("dtype", DtypeOpt, Dtype.auto),
    Shared("quantize", Annotated[Quantize, typer.Option(
        help="Quantize while loading: 8bit, 4bit (= nf4) or fp4 with bitsandbytes; int8 or int4 "
             "weight-only, with our CPU kernels (faster on CPU, closer to float32 than 8bit/nf4).",
        metavar="none|8bit|4bit|nf4|fp4|int8|int4", rich_help_panel=MODEL)], Quantize.none),
    Shared("quantize_head", Annotated[bool, typer.Option(
        "--quantize-head", metavar=FLAG, rich_help_panel=MODEL,
        help="With --quantize: quantize the LM head too (Fuyu-8B: 2.1 GB of the 16.6 GB a decode step "
             "reads, kept 16-bit by default): faster decoding, logits a little further from float32.")], False),
    Shared("device_map", Annotated[Optional[str], typer.Option(
        "--device-map", callback=_parse_device_map, metavar="auto|MAP", show_default=False,
        rich_help_panel=MODEL,
        help="Spread the model over GPUs, CPU and disk (overrides --device): auto fills GPUs, then "
             "CPU, then disk (limits: --max-memory); or map every module to a GPU index, cuda:N, cpu "
             "or disk, e.g. 'embed_tokens=0, vision_embed_tokens=0, lm_head=0, layers.0-17=0, "
             "layers.18-35=1, final_layernorm=1'.")], None),
    Shared("max_memory", Annotated[Optional[str], typer.Option(
        "--max-memory", callback=_parse_max_memory, metavar="DEVICE=SIZE,...", show_default=False,
        rich_help_panel=MODEL,
        help="With --device-map auto: the most each device may hold, e.g. '0=20GiB,cpu=30GiB' "
             "(GPU index or cuda:N, cpu; KB/MB/GB, KiB/MiB/GiB); the rest goes to disk.")], None),
    Shared("offload_folder", Annotated[Optional[Path], typer.Option(
        "--offload-folder", file_okay=False, metavar="DIR", show_default=False, rich_help_panel=MODEL,
        help="With --device-map: where layers sent to disk are written when they cannot be read "
             "from the checkpoint's own files (e.g. a pre-quantized checkpoint).")], None),
    Shared("batch_size", Annotated[Optional[int], typer.Option(
        "--batch-size", "-b", min=1, metavar="N", show_default=False, rich_help_panel=MODEL,
        help="Images per forward pass (all questions of an image run together). "
             "Default: 2 on CPU, 8 on GPU.")], None),
    Shared("threads", ThreadsOpt, None),
    Shared("max_new_tokens", Annotated[Optional[int], typer.Option(
        min=1, metavar="N", show_default=False, rich_help_panel=GEN,
        help="Stop after this many generated tokens. Default: 64 (bbox: 32).")], None),
    Shared("temperature", Annotated[Optional[float], typer.Option(
        min=0.0, metavar="T", show_default=False, rich_help_panel=GEN,
        help="Sample at this temperature (default 0: greedy decoding).")], None),
    Shared("top_p", Annotated[Optional[float], typer.Option(
        callback=_check_top_p, metavar="P", show_default=False, rich_help_panel=GEN,
        help="Nucleus sampling threshold (needs --temperature > 0).")], None),
    Shared("seed", Annotated[Optional[int], typer.Option(
        metavar="N", show_default=False, rich_help_panel=GEN,
        help="Seed for sampling, for repeatable runs (needs --temperature > 0).")], None),
    Shared("compile", Annotated[bool, typer.Option(
        "--compile", metavar=FLAG, rich_help_panel=GEN,
        help="torch.compile the decode step (CUDA graphs on a GPU); the first batch pays ~20-60 s "
             "of compiling. On CPU it pays back on long runs only, if at all; `fuyu benchmark "
             "--compile` measures it on yours.")], False),
    Shared("min_score", Annotated[Optional[float], typer.Option(
        "--min-score", max=0.0, metavar="X", show_default=False, rich_help_panel=GEN,
        help="Mark answers whose score (mean log-probability of their tokens, ≤ 0) is below X as "
             "doubtful, e.g. -0.5.")], None),
    Shared("fmt", Annotated[Format, typer.Option(
        "--format", "-f", metavar="jsonl|text|csv|parquet", rich_help_panel=OUT,
        help="JSON lines, 'path<TAB>text' lines, or CSV with a header (stdout); parquet parts "
             "(--output-dir only).")], Format.jsonl),
    Shared("output", Annotated[Optional[Path], typer.Option(
        "--output", "-o", dir_okay=False, metavar="FILE", show_default=False, rich_help_panel=OUT,
        callback=_output_path,
        help="Append JSON lines to FILE instead of stdout (- is stdout); a rerun skips what is in it. "
             "Locked while a run writes it.")], None),
    Shared("output_dir", Annotated[Optional[str], typer.Option(  # str: Path would fold s3:// to s3:/
        "--output-dir", metavar="DIR|URI", show_default=False, rich_help_panel=SCALE,
        help="Write records into DIR/part-NNNNN.jsonl (or .parquet), each part complete or absent; "
             "a rerun does only the parts not finished.")], None),
    Shared("shard_size", Annotated[int, typer.Option(
        "--shard-size", min=1, metavar="N", rich_help_panel=SCALE,
        help="Input files per part, with --output-dir.")], 1000),
    Shared("shard", Annotated[Optional[str], typer.Option(
        "--shard", metavar="I/N", callback=_parse_shard, show_default=False, rich_help_panel=SCALE,
        help="Do only parts I, I+N, I+2N, … (0-based), e.g. one per Slurm array task; N such runs "
             "into one --output-dir make the whole job.")], None),
    Shared("ray", Annotated[Optional[str], typer.Option(
        "--ray", metavar="auto|local|HOST:PORT", show_default=False, rich_help_panel=SCALE,
        help="Run on a Ray cluster (pip install 'fuyu[ray]'), writing parts into --output-dir.")], None),
    Shared("workers", Annotated[int, typer.Option(
        "--workers", min=1, metavar="N", rich_help_panel=SCALE,
        help="With --ray: model replicas.")], 1),
    Shared("gpus_per_worker", Annotated[float, typer.Option(
        "--gpus-per-worker", min=0, metavar="N", rich_help_panel=SCALE,
        help="With --ray: GPUs each replica takes.")], 0.0),
    Shared("cpus_per_worker", Annotated[Optional[float], typer.Option(
        "--cpus-per-worker", min=0.5, metavar="N", show_default=False, rich_help_panel=SCALE,
        help="With --ray: CPUs each replica takes (and its torch threads). Default: 1 with a GPU, "
             "else the cluster's CPUs shared out.")], None),
    Shared("sidecar", Annotated[bool, typer.Option(
        "--sidecar", metavar=FLAG, rich_help_panel=OUT,
        help="Also write IMAGE.txt next to each image; a rerun skips images that have one. A .txt "
             "fuyu did not write is never touched.")], False),
    Shared("overwrite", Annotated[bool, typer.Option(
        "--overwrite", metavar=FLAG, rich_help_panel=OUT,
        help="Redo this command's (image, prompt) pairs already in --output, --output-dir or "
             "sidecars; others' records stay.")], False),
    Shared("quiet", QuietOpt, False),
]


# --- the groups the options are passed on in -----------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class InputSpec:
    paths: list[str]
    recursive: bool = False
    null: bool = False
    pages: Optional[str] = None  # "1-3,7"
    dpi: Optional[float] = None
    all_frames: bool = False


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    path: Optional[str] = None  # a folder or a hub repo id; None: adept/fuyu-8b
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"
    quantize_head: bool = False  # the LM head quantized too (default: kept 16-bit)
    batch_size: Optional[int] = None
    device_map: Union[str, dict, None] = None  # "auto" or {module: device}, parsed already
    max_memory: Optional[dict] = None  # {device: size}, parsed already
    offload_folder: Optional[Path] = None
    download: bool = False
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_memory is not None and self.device_map != "auto":
            raise FuyuError("--max-memory applies only with --device-map auto",
                            f"e.g. {MAX_MEMORY_EXAMPLE}")
        if self.offload_folder is not None and self.device_map is None:
            raise FuyuError("--offload-folder applies only with --device-map",
                            "e.g. --device-map auto --max-memory cpu=12GiB --offload-folder /tmp/fuyu-offload")


@dataclass(frozen=True, kw_only=True)
class GenOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: Optional[float] = None
    seed: Optional[int] = None
    compile: bool = False
    min_score: Optional[float] = None  # answers scoring below it are marked doubtful


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    format: str = "jsonl"
    output: Optional[Path] = None
    sidecar: bool = False
    overwrite: bool = False
    quiet: bool = False
    output_dir: Optional[str] = None
    shard_size: int = 1000
    shard: Optional[tuple[int, int]] = None


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    address: Optional[str] = None  # --ray: auto | local | host:port
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: Optional[float] = None


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    inputs: InputSpec
    model: ModelSpec = field(default_factory=ModelSpec)
    gen: GenOptions = field(default_factory=GenOptions)
    out: OutputSpec = field(default_factory=OutputSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)

    def with_paths(self, paths: list[str]) -> RunOptions:
        return replace(self, inputs=replace(self.inputs, paths=paths))


def run_options(paths: list[str], v: dict, default_max_new_tokens: int) -> RunOptions:
    """The shared option values (by parameter name) → RunOptions, after the checks that need
    several options at once (each a one-line usage error, before anything is loaded)."""
    temperature = v["temperature"] or 0.0
    if temperature == 0 and (v["top_p"] is not None or v["seed"] is not None):
        raise FuyuError(f"{'--top-p' if v['top_p'] is not None else '--seed'} only matters when "
                        "sampling", "add --temperature, e.g. --temperature 0.7 (greedy is the default)")
    fmt: str = v["fmt"].value
    output, output_dir = v["output"], v["output_dir"]
    if output is not None and output_dir is not None:
        raise FuyuError("--output and --output-dir are two places for the same records", "use one")
    if output is not None and fmt != "jsonl":
        raise FuyuError(f"--format {fmt} applies to stdout and --output-dir; --output always writes "
                        "JSON lines", "drop one of --format and --output")
    if fmt == "parquet" and output_dir is None:
        raise FuyuError("--format parquet writes parts", "add --output-dir DIR")
    if fmt in ("text", "csv") and output_dir is not None:
        raise FuyuError(f"--output-dir writes jsonl or parquet parts, not {fmt}",
                        "use --format jsonl or parquet")
    for flag, name in (("--shard", "shard"), ("--ray", "ray")):
        if v[name] is not None and output_dir is None:
            raise FuyuError(f"{flag} writes parts", "add --output-dir DIR (shared by all shards/workers)")
    if v["ray"] is not None and v["ray"].startswith("ray://"):  # github.com/ray-project/ray/issues/48682
        raise FuyuError("Ray Data does not run through Ray Client (ray://…): the driver must be on a "
                        "cluster node", "run fuyu on the head node with --ray auto (or ray job submit)")
    if v["ray"] is not None and v["shard"] is not None:
        raise FuyuError("--ray shares the parts out itself", "drop --shard")
    if v["sidecar"] and v["ray"] is not None:
        raise FuyuError("--sidecar writes next to local images, --ray runs elsewhere", "drop --sidecar")
    return RunOptions(
        inputs=InputSpec(paths=paths, recursive=v["recursive"], null=v["null"], pages=v["pages"], dpi=v["dpi"],
                         all_frames=v["all_frames"]),
        model=ModelSpec(path=v["model"], device=v["device"], dtype=v["dtype"].value, quantize=v["quantize"].value,
                        quantize_head=v["quantize_head"], batch_size=v["batch_size"], device_map=v["device_map"], max_memory=v["max_memory"],
                        offload_folder=v["offload_folder"], download=v["download"], threads=v["threads"]),
        gen=GenOptions(max_new_tokens=v["max_new_tokens"] or default_max_new_tokens, temperature=temperature,
                       top_p=v["top_p"], seed=v["seed"], compile=v["compile"], min_score=v["min_score"]),
        out=OutputSpec(format=fmt, output=output, sidecar=v["sidecar"], overwrite=v["overwrite"],
                       quiet=v["quiet"], output_dir=None if output_dir is None else str(output_dir),
                       shard_size=v["shard_size"], shard=v["shard"]),
        cluster=ClusterSpec(address=v["ray"], workers=v["workers"], gpus_per_worker=v["gpus_per_worker"],
                            cpus_per_worker=v["cpus_per_worker"]),
    )


def text_after_paths(paths: list[str], *, what: str, missing: FuyuError, hint: str) -> tuple[list[str], str]:
    """(paths, text) for `fuyu ask chart.png 'What is…'` and `fuyu bbox shot.png Save`: the text is
    the last argument, which must not be stdin's `-` or name a file (then `what` it is not, and
    `hint`); `missing` when there is no argument after the first path."""
    if len(paths) < 2:
        raise missing
    *paths, last = paths
    if last == "-" or os.path.exists(last):
        raise FuyuError(f"the last argument ({last}) is a file, not {what}", hint)
    return paths, last


def run_command(default_max_new_tokens: int) -> Callable:
    """Decorator: `fn(paths, <own options>, *, run: RunOptions)` becomes a Typer command taking its
    own options plus every SHARED one."""

    def decorate(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "run"]
        shared = [inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, annotation=s.annotation,
                                    default=s.default) for s in SHARED]

        @functools.wraps(fn)
        def command(**kwargs):
            values = {s.name: kwargs.pop(s.name) for s in SHARED}
            return fn(**kwargs, run=run_options(kwargs["paths"], values, default_max_new_tokens))

        params = own + shared
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # Typer must read this signature, not fn's
        return command

    return decorate
