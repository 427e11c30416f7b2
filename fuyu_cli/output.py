"""Where records go on one machine: stdout (JSON lines, text or CSV), an --output file
(fuyu_cli/resume.py), sidecar files next to the images. --output-dir parts are fuyu_cli/parts.py.

Every sink writes one record at a time and flushes it, so a killed run loses at most the record
being written. stdout is looked up on each write (Rich may redirect it above a progress bar).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Protocol

from fuyu.errors import OutputError, StdoutClosed
from fuyu.records import FIELDS, Ask, Item, Record, printable


def record_text(rec: Record) -> str:
    """The one-line answer: boxes as 'x0,y0,x1,y1' for `bbox`, else the text with whitespace flattened."""
    if rec.task == "bbox":
        return " ".join(",".join(str(v) for v in box) for box in rec.boxes or [])
    return " ".join((rec.text or "").split())


def text_path(path: str) -> str:
    """A path for one field of a tab-separated line: backslash, tab, CR and newline written as
    \\\\, \\t, \\r, \\n, and bytes that are not UTF-8 as \\xNN, so every path reads back exactly."""
    escaped = path.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return printable(escaped)[0]


class Sink(Protocol):
    def write(self, rec: Record) -> None: ...


def emit(text: str) -> None:
    """Write and flush data on stdout; a closed pipe ends the run quietly (StdoutClosed)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise StdoutClosed() from None


class JsonLines:
    def write(self, rec: Record) -> None:
        emit(rec.to_json() + "\n")


class TextLines:
    """'path<TAB>answer' per finished record (path#page=N for pages); failures go to stderr only."""

    def write(self, rec: Record) -> None:
        if rec.ok:
            emit(f"{text_path(rec.id)}\t{record_text(rec)}\n")


class CsvRows:
    """A header, then one row per record: `columns` of `row(rec)` (default: a record's FIELDS)."""

    def __init__(self, columns=FIELDS, row=lambda rec: rec.to_dict()) -> None:
        self.columns, self.row = columns, row
        self.header_written = False

    def write(self, rec: Record) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if not self.header_written:
            w.writerow(self.columns)
            self.header_written = True
        d = self.row(rec)
        w.writerow(_cell(d.get(k)) for k in self.columns)
        emit(buf.getvalue())


def _cell(value) -> str:
    """A CSV cell: empty for None, JSON for booleans and lists (true, [[1, 2, 3, 4]])."""
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (bool, list, dict)) else value


STDOUT_SINKS = {"jsonl": JsonLines, "text": TextLines, "csv": CsvRows}


# --- sidecars --------------------------------------------------------------------------------

MANIFEST = ".fuyu-sidecars.jsonl"  # per folder: which .txt files fuyu wrote, and for what


def sidecar_path(item: Item) -> Path:
    """IMAGE.txt next to the image (IMAGE.page-N.txt for a page); a .txt input gets NAME.txt.txt."""
    p = Path(item.path)
    stem = p.name if p.suffix.lower() == ".txt" else p.stem
    return p.with_name(f"{stem}.txt" if item.page is None else f"{stem}.page-{item.page}.txt")


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class Sidecars:
    """IMAGE.txt next to each finished image: written to a temp file and renamed into place, then
    recorded in the folder's manifest (name, content hash, source, page, task, prompt). A .txt
    that the manifest does not vouch for (absent, or edited since) is the user's: never touched."""

    def __init__(self) -> None:
        self._manifests: dict[Path, dict[str, dict]] = {}

    def _manifest(self, folder: Path) -> dict[str, dict]:
        if folder not in self._manifests:
            entries: dict[str, dict] = {}
            try:
                for line in (folder / MANIFEST).read_bytes().splitlines():
                    try:
                        e = json.loads(line)
                        entries[e["name"]] = e
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line from a killed run
            except OSError:
                pass
            self._manifests[folder] = entries
        return self._manifests[folder]

    def _entry(self, path: Path) -> dict | None:
        """The manifest entry of an existing sidecar fuyu wrote and nobody changed, else None."""
        e = self._manifest(path.parent).get(path.name)
        return e if e is not None and e.get("sha256") == _sha256(path) else None

    def is_own(self, path: str) -> bool:
        p = Path(path)
        return p.suffix.lower() == ".txt" and self._entry(p) is not None

    def conflict(self, item: Item) -> str | None:
        """Why this item's sidecar must not be written (a one-line error for its record), or None."""
        path = sidecar_path(item)
        if not os.path.lexists(path):
            return None
        entry = self._entry(path)
        if entry is None:
            return (f"{printable(str(path))[0]} exists and was not written by fuyu; left untouched "
                    "(move it away, or use --output instead of --sidecar)")
        if entry.get("source") != os.path.realpath(item.path):
            return (f"{printable(str(path))[0]} holds the answer for {printable(entry.get('source', '?'))[0]}; "
                    "left untouched (the two images share a name: rename one, or use --output)")
        return None

    def done(self, item: Item, ask: Ask) -> bool:
        """Whether this item's sidecar already holds this prompt's answer."""
        path = sidecar_path(item)
        entry = self._entry(path) if os.path.lexists(path) else None
        return (entry is not None and entry.get("source") == os.path.realpath(item.path)
                and entry.get("task") == ask.task and entry.get("prompt") == ask.prompt)

    def write(self, rec: Record) -> None:
        if not rec.ok:
            return
        item = Item(rec.path, rec.page, rec.pages)
        problem = self.conflict(item)
        if problem is not None:  # appeared meanwhile, or another image of this run took the name
            rec.error = problem
            return
        dst = sidecar_path(item)
        tmp = dst.with_name(f".{dst.name}.fuyu-tmp")
        data = (record_text(rec) + "\n").encode("utf-8")
        entry = {"name": dst.name, "sha256": hashlib.sha256(data).hexdigest(),
                 "source": os.path.realpath(rec.path), "page": rec.page, "task": rec.task,
                 "prompt": rec.prompt}
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dst)
            with open(dst.parent / MANIFEST, "ab") as f:
                f.write((json.dumps(entry) + "\n").encode("ascii"))  # \\u escapes keep any name exact
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise OutputError(dst, e) from None
        self._manifest(dst.parent)[dst.name] = entry
