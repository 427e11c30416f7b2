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

from fuyu.errors import one_line


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def error_line(console: Console, message: str, hint: str = "") -> None:
    """`error: what (file) — what to do`, always shown, even with --quiet."""
    message = one_line(message)  # e.g. CUDA's multi-line out-of-memory text
    console.print(Text.assemble(("error", "bold red"), ": ", message, f" — {hint}" if hint else ""))


class Reporter:
    def __init__(self, quiet: bool = False) -> None:
        self.console = stderr_console()
        self.quiet = quiet

    def error(self, path: str, message: str) -> None:
        from fuyu.records import printable

        path, message = printable(path)[0], printable(message)[0]
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
    def progress(self, tally, label: str, every: float = 30.0) -> Iterator[Callable[[], None]]:
        """Yields `advance()`, called after each record (counts live in `tally`, a pipeline.Tally).
        On a terminal: a bar with records done, rate, tokens/s and ETA once the total is known.
        Elsewhere (nohup, a log file): one plain line every `every` seconds."""
        if self.quiet:
            yield lambda: None
            return
        if not self.console.is_terminal:
            last = time.perf_counter()

            def advance_plain() -> None:
                nonlocal last
                now = time.perf_counter()
                if now - last >= every:
                    last = now
                    self.note(progress_line(label, tally, now))
            yield advance_plain
            return
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                       console=self.console, transient=True,
                       redirect_stdout=sys.stdout.isatty())  # data lines print above the bar
        with bar:
            task = bar.add_task(label, total=None, rate="")

            def advance() -> None:
                elapsed = max(time.perf_counter() - tally.started, 1e-9)
                done = tally.ok + tally.failed
                bar.update(task, completed=done, total=tally.total if tally.inputs_listed else None,
                           rate=f"{done / elapsed:.2f} rec/s  {tally.tokens / elapsed:.1f} tok/s")

            yield advance

    def summary(self, label: str, tally, extra: list[str]) -> None:
        """`caption: 3 done, 1 failed in 2.0 s (…); model loaded in 4.1 s (not included)`."""
        secs = max(time.perf_counter() - tally.started, 1e-6)
        counts = [f"{tally.ok} done", f"{tally.failed} failed" if tally.failed else "",
                  f"{tally.already} already done" if tally.already else "", *extra]
        load = "" if tally.load_seconds is None else f"; model loaded in {tally.load_seconds:.1f} s (not included)"
        self.note(f"{label}: " + ", ".join(filter(None, counts))
                  + f" in {secs:.1f} s ({tally.ok / secs:.2f} records/s, {tally.tokens / secs:.1f} tokens/s){load}")


def progress_line(label: str, tally, now: float) -> str:
    """One plain progress line: done/total, failures, rate, ETA (when the total is known)."""
    elapsed = max(now - tally.started, 1e-9)
    done = tally.ok + tally.failed
    rate = done / elapsed
    total = f"/{tally.total}" if tally.inputs_listed else ""
    eta = ""
    if tally.inputs_listed and rate > 0:
        left = (tally.total - done) / rate
        eta = f", ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
    failed = f" ({tally.failed} failed)" if tally.failed else ""
    return f"{label}: {done}{total} done{failed}, {rate:.2f} records/s{eta}"


def warning_line(message: str) -> None:
    """`warning: …` on stderr, one line, even with --quiet (it tells of a problem)."""
    console = stderr_console()
    console.print(Text.assemble(("warning", "bold yellow"), ": ", one_line(message)))


def draw_boxes(image, boxes: list[list[int]], dst: Path) -> None:
    """A copy of PIL `image` with `boxes` (x0, y0, x1, y1 in its pixels) outlined in red, saved to dst."""
    from PIL import ImageDraw

    im = image.convert("RGB")
    draw = ImageDraw.Draw(im)
    width = max(2, min(im.size) // 200)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1, y1], outline=(230, 30, 30), width=width)
    dst.parent.mkdir(parents=True, exist_ok=True)
    im.save(dst)


def benchmark_table(console: Console, res: dict) -> None:
    """`fuyu benchmark`'s card: one row per measurement (the JSON line on stdout has them all)."""
    from rich.table import Table

    quant = f", {res['quantize']}" if res.get("quantize") else ""
    table = Table(title=f"fuyu benchmark — {res['model']} on {res['device']} ({res['dtype']}{quant})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [("load", f"{res['load_s']:.2f} s, peak RSS {res['load_peak_rss_gb']:.2f} GB"),
            ("memory read bandwidth (streaming sum, median)", f"{res['bandwidth_gbs']} GB/s")]
    if "matmul_tflops" in res:
        rows.append(("matmul throughput (fastest of F.linear and oneDNN packed, prefill GEMMs, median)", f"{res['matmul_tflops']} TFLOP/s"))
    rows += [("preprocess 1920×1080", f"{res['preprocess_ms_1920x1080']} ms"),
             ("preprocess 640×480", f"{res['preprocess_ms_640x480']} ms")]
    prefills = res.get("prefill_images") or {"": res["prefill"]}
    for name, pre in prefills.items():
        gemm = pre.get("fraction_of_matmul", pre.get("fraction_of_gemm"))
        rows.append((f"prefill {name} {pre['tokens']} tokens (min/median/max)".replace("  ", " "),
                     f"{pre['ms']['min']}/{pre['ms']['median']}/{pre['ms']['max']} ms; {pre['tflops']} TFLOP/s "
                     f"({gemm:.0%} of the GEMM rate)"))
    if "first_token_ms" in res:
        rows.append(("first token: preprocess + prefill + head (min/median/max)",
                     "/".join(str(res["first_token_ms"][k]) for k in ("min", "median", "max")) + " ms"))
    for B, d in res["decode"].items():
        ms = "/".join(str(d["ms_per_step"][k]) for k in ("min", "median", "max"))
        rows.append((f"decode batch {B} (ms/step min/median/max)",
                     f"{ms}; {d['tokens_per_s']} tok/s, {d['weight_gbs']} GB/s of weights "
                     f"({d['fraction_of_bandwidth']:.0%} of {d['read_gbs']} GB/s read alongside)"))
    if "kv_cache_bytes_per_token" in res:
        rows.append(("KV cache per token", f"{res['kv_cache_bytes_per_token'] / 2**20:.4g} MiB"))
    if "caption_images_per_s" in res:
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
