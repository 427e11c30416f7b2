"""Everything a person reads on stderr (progress, errors, the summary), and --draw.

Rich lives here and nowhere else. The console is made per run, on stderr, never wraps lines
(an error stays one line), and honours NO_COLOR. The progress bar shows only on a terminal.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.text import Text


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def error_line(console: Console, message: str, hint: str = "") -> None:
    """`error: what (file) — what to do`, always shown, even with --quiet."""
    message = " ".join(message.splitlines())  # e.g. CUDA's multi-line out-of-memory text
    console.print(Text.assemble(("error", "bold red"), ": ", message, f" — {hint}" if hint else ""))


class Reporter:
    def __init__(self, quiet: bool = False) -> None:
        self.console = stderr_console()
        self.quiet = quiet

    def error(self, path: str, message: str) -> None:
        error_line(self.console, message if message.startswith(path) else f"{path}: {message}")

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(Text(message))

    @contextmanager
    def status(self, message: str) -> Iterator[None]:
        """A spinner while something slow happens (loading the model), on a terminal only."""
        if self.quiet or not self.console.is_terminal:
            yield
            return
        with self.console.status(message):
            yield

    @contextmanager
    def byte_progress(self, label: str) -> Iterator[Callable[[int, int], None] | None]:
        """Yields an on_bytes(done, total) callback drawing bytes done out of the total, on a
        terminal only (None otherwise). It pulses until the total is known; notes print above."""
        if self.quiet or not self.console.is_terminal:
            yield None
            return
        bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                       TransferSpeedColumn(), TimeRemainingColumn(), console=self.console,
                       transient=True)
        with bar:
            task = bar.add_task(label, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)

    @contextmanager
    def progress(self, total: int, label: str) -> Iterator[Callable[[dict], None]]:
        """Yields `advance(record)`; draws images done, images/s, tokens/s and ETA on a terminal."""
        if self.quiet or not self.console.is_terminal:
            yield lambda rec: None
            return
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                       console=self.console, transient=True,
                       redirect_stdout=sys.stdout.isatty())  # data lines print above the bar
        start, tokens = time.perf_counter(), 0
        with bar:
            task = bar.add_task(label, total=total, rate="")

            def advance(rec: dict) -> None:
                nonlocal tokens
                tokens += rec.get("new_tokens") or 0
                elapsed = max(time.perf_counter() - start, 1e-9)
                done = bar.tasks[0].completed + 1
                bar.update(task, advance=1,
                           rate=f"{done / elapsed:.2f} img/s  {tokens / elapsed:.1f} tok/s")

            yield advance


def draw_boxes(src: str, boxes: list[list[int]], dst: Path) -> None:
    """Copy of `src` with `boxes` (x0, y0, x1, y1 in image pixels) outlined in red."""
    from PIL import Image, ImageDraw

    with Image.open(src) as im:
        im = im.convert("RGB")
    draw = ImageDraw.Draw(im)
    width = max(2, min(im.size) // 200)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1, y1], outline=(230, 30, 30), width=width)
    dst.parent.mkdir(parents=True, exist_ok=True)
    im.save(dst)


def benchmark_table(console: Console, res: dict) -> None:
    """`fuyu benchmark`'s card: one row per measurement (the JSON line on stdout has them all)."""
    from rich.table import Table

    table = Table(title=f"fuyu benchmark — {res['model']} on {res['device']} ({res['dtype']})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    pre = res["prefill"]
    rows = [("load", f"{res['load_s']:.2f} s"),
            ("memory read bandwidth (streaming sum, median)", f"{res['bandwidth_gbs']} GB/s"),
            ("matmul throughput (F.linear, prefill GEMMs, median)", f"{res['matmul_tflops']} TFLOP/s"),
            ("preprocess 1920×1080", f"{res['preprocess_ms_1920x1080']} ms"),
            ("preprocess 640×480", f"{res['preprocess_ms_640x480']} ms"),
            (f"prefill {pre['tokens']} tokens (min/median/max)",
             f"{pre['ms']['min']}/{pre['ms']['median']}/{pre['ms']['max']} ms"),
            ("prefill throughput", f"{pre['tokens_per_s']} tok/s, {pre['tflops']} TFLOP/s "
                                   f"({pre['fraction_of_matmul']:.0%} of matmul)"),
            ("first token: preprocess + prefill + head (min/median/max)",
             "/".join(str(res["first_token_ms"][k]) for k in ("min", "median", "max")) + " ms")]
    for B, d in res["decode"].items():
        ms = "/".join(str(d["ms_per_step"][k]) for k in ("min", "median", "max"))
        rows.append((f"decode batch {B} (ms/step min/median/max)",
                     f"{ms}; {d['tokens_per_s']} tok/s, {d['weight_gbs']} GB/s of weights "
                     f"({d['fraction_of_bandwidth']:.0%} of {d['read_gbs']} GB/s read alongside)"))
    rows.append(("caption run, 8 mixed images, 20 tokens", f"{res['caption_images_per_s']} images/s"))
    for name, r in res.get("reference", {}).items():
        if isinstance(r, dict):
            rows.append((f"vs reference {name}", f"{r['ours_s']} s vs {r['reference_s']} s: {r['speedup']}×; "
                                                   f"same tokens {r['same_tokens']} (same batches), "
                                                   f"{r['same_tokens_one_batch']} (its one padded batch), "
                                                   f"{r['same_tokens_eager']} (eager attention)"))
    rows.append(("peak RSS", f"{res['peak_rss_gb']:.2f} GB"))
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
