"""`fuyu convert`: Adept's original release, or any checkpoint fuyu loads, into a hub-layout checkpoint."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from fuyu.errors import FuyuError
from fuyu.options import QuietOpt

EXAMPLES = """[b]Examples[/b]

  fuyu convert fuyu_8b_release/ fuyu-8b                 [dim]# Adept's Megatron release[/dim]
  fuyu convert model_optim_rng.pt fuyu-8b --tokenizer adept_vocab.model
  fuyu convert fuyu-8b fuyu-8b-int8 --quantize int8     [dim]# pre-quantized: loads as a map[/dim]
  fuyu convert fuyu-8b fuyu-8b-small --shard-size 1GB --dtype float16
"""


class SaveDtype(str, enum.Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class SaveQuantize(str, enum.Enum):
    none = "none"
    int8 = "int8"
    nf4 = "nf4"


SrcArg = Annotated[Path, typer.Argument(
    exists=True, show_default=False,
    help="Adept's release folder (with model_optim_rng.pt and adept_vocab.model), its .pt file, "
         "or a checkpoint folder fuyu loads.")]
OutArg = Annotated[Path, typer.Argument(show_default=False, help="New checkpoint folder (must not exist).")]
TokenizerOpt = Annotated[Optional[Path], typer.Option(
    exists=True, dir_okay=False, show_default=False,
    help="adept_vocab.model, when SRC is a .pt file.")]
SaveDtypeOpt = Annotated[SaveDtype, typer.Option(help="dtype of the written 16/32-bit tensors.")]
ShardSizeOpt = Annotated[str, typer.Option(help="Largest shard file, e.g. 2GB, 500MB.")]
SaveQuantizeOpt = Annotated[SaveQuantize, typer.Option(
    help="Store weights pre-quantized: int8 (torch, fast on CPU) or nf4 (bitsandbytes).")]


def convert(
    src: SrcArg,
    out: OutArg,
    *,
    tokenizer: TokenizerOpt = None,
    dtype: SaveDtypeOpt = SaveDtype.bfloat16,
    shard_size: ShardSizeOpt = "2GB",
    quantize: SaveQuantizeOpt = SaveQuantize.none,
    quiet: QuietOpt = False,
) -> None:
    """Write a checkpoint folder: config, sharded safetensors, tokenizer and preprocessor files."""
    from fuyu.render import Reporter

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FuyuError(f"{out}: already exists", "choose a new output folder or remove it")
    from fuyu.model.convert import convert as convert_checkpoint  # imports torch
    from fuyu.model.convert import parse_size

    try:
        parse_size(shard_size)
    except ValueError as e:
        raise FuyuError(str(e), "e.g. --shard-size 2GB") from None
    reporter = Reporter(quiet)
    with reporter.byte_progress(f"converting {src}") as on_bytes:
        convert_checkpoint(src, out, tokenizer=tokenizer, dtype=dtype.value, shard_size=shard_size,
                           quantization=None if quantize is SaveQuantize.none else quantize.value,
                           progress=reporter.note, on_bytes=on_bytes)
    reporter.note(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command(epilog=EXAMPLES)(convert)
