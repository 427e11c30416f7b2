"""Where records go: stdout (JSON lines, text or CSV), an --output file, sidecar files.

Every sink writes and flushes one record at a time, so a killed run loses at most the record
being written. stdout is looked up on each write (Rich may redirect it above a progress bar).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Protocol

from fuyu.options import OutputSpec
from fuyu.resume import sidecar_path

FIELDS = ("path", "task", "prompt", "text", "boxes", "width", "height",
          "prompt_tokens", "new_tokens", "seconds", "error")


def record_text(rec: dict) -> str:
    """The one-line answer: boxes as 'x0,y0,x1,y1' for `bbox`, else the text with whitespace flattened."""
    if rec.get("task") == "bbox":
        return " ".join(",".join(str(v) for v in box) for box in rec.get("boxes") or [])
    return " ".join((rec.get("text") or "").split())


def to_json(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False, separators=(", ", ": "))


class Sink(Protocol):
    def write(self, rec: dict) -> None: ...


class JsonLines:
    def write(self, rec: dict) -> None:
        sys.stdout.write(to_json(rec) + "\n")
        sys.stdout.flush()


class TextLines:
    """'path<TAB>answer' per finished image; failures are reported on stderr only."""

    def write(self, rec: dict) -> None:
        if not rec.get("error"):
            sys.stdout.write(f"{rec['path']}\t{record_text(rec)}\n")
            sys.stdout.flush()


class CsvRows:
    def __init__(self) -> None:
        self.header_written = False

    def write(self, rec: dict) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if not self.header_written:
            w.writerow(FIELDS)
            self.header_written = True
        row = {**rec, "boxes": json.dumps(rec["boxes"]) if rec.get("boxes") is not None else None}
        w.writerow("" if row.get(k) is None else row[k] for k in FIELDS)
        sys.stdout.write(buf.getvalue())
        sys.stdout.flush()


class AppendFile:
    """JSON lines appended to a file: one write per record, then fsync."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, rec: dict) -> None:
        os.write(self.fd, (to_json(rec) + "\n").encode())
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class Sidecars:
    """IMAGE.txt next to each finished image, written to a temp file and renamed into place."""

    def write(self, rec: dict) -> None:
        if rec.get("error"):
            return
        dst = sidecar_path(rec["path"])
        tmp = dst.with_name(f".{dst.name}.tmp")  # fixed name: a killed run's leftover is reused
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(record_text(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)


@contextmanager
def open_sinks(spec: OutputSpec) -> Iterator[list[Sink]]:
    sinks: list[Sink] = []
    if spec.output is not None:
        sinks.append(AppendFile(spec.output))
    else:
        sinks.append({"jsonl": JsonLines, "text": TextLines, "csv": CsvRows}[spec.format]())
    if spec.sidecar:
        sinks.append(Sidecars())
    try:
        yield sinks
    finally:
        for s in sinks:
            if isinstance(s, AppendFile):
                s.close()
