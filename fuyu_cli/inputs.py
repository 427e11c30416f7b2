"""Turn command-line paths into the stream of input files, as they are found.

Arguments may be files, folders, globs the shell did not expand, URIs, or `-` (paths on stdin,
one per line or NUL-separated, read as they arrive). Files named explicitly are always taken;
inside folders only image and document extensions are, and the rest is reported. Each file is
taken once, by its real path. Hidden files and folders inside folders are skipped and counted;
dangling links and special files (FIFOs, sockets, devices) found in folders are named in the
summary and never opened. Named explicitly, they become error records instead.
"""

from __future__ import annotations

import glob
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from fuyu.errors import FuyuError
from fuyu.output import MANIFEST as SIDECAR_MANIFEST
from fuyu.records import is_uri, resolve

def folder_extensions() -> frozenset[str]:
    """What folders contribute: images and documents the preprocessing can read here."""
    from fuyu.preprocess.pages import INPUT_EXTENSIONS

    return INPUT_EXTENSIONS


@dataclass
class Found:
    """What listing the input saw besides the files it yields (for the summary)."""

    skipped: list[str] = field(default_factory=list)  # folder entries with other extensions
    hidden: int = 0  # hidden files and folders inside folders
    special: list[str] = field(default_factory=list)  # dangling links, FIFOs, sockets, devices in folders
    duplicates: int = 0  # the same file reached twice (another spelling, a symlink)
    own_sidecars: int = 0  # .txt files fuyu wrote itself (--sidecar), not inputs

    def summary(self, show: int = 3) -> list[str]:
        """Summary phrases: '2 skipped, not images (.txt ×2: a.txt, b.txt)', …"""
        out = []
        if self.skipped:
            exts = Counter(Path(p).suffix.lower() or "(none)" for p in self.skipped)
            kinds = ", ".join(f"{e} ×{n}" for e, n in exts.most_common())
            out.append(f"{len(self.skipped)} skipped, not images ({kinds}: {_names(self.skipped, show)})")
        if self.special:
            out.append(f"{len(self.special)} skipped, not regular files ({_names(self.special, show)})")
        if self.hidden:
            out.append(f"{self.hidden} hidden skipped")
        if self.duplicates:
            out.append(f"{self.duplicates} duplicates taken once")
        return out


def _names(paths: list[str], show: int) -> str:
    from fuyu.records import printable

    return ", ".join(printable(p)[0] for p in paths[:show]) + (", …" if len(paths) > show else "")


class _Idle:
    """Yielded by the input stream when stdin has nothing new for a moment: whoever batches the
    input starts on what it has instead of waiting for more."""

    def __repr__(self) -> str:
        return "IDLE"


IDLE = _Idle()


def read_paths(stdin: BinaryIO, null: bool, idle_after: float = 0.2) -> Iterator[str | _Idle]:
    """Paths from stdin as they arrive (not after EOF), decoded like file names (os.fsdecode);
    IDLE whenever none has come for `idle_after` seconds. A daemon thread does the reading."""
    import queue
    import threading

    lines: queue.Queue = queue.Queue(maxsize=10000)
    done = object()

    sep = b"\0" if null else b"\n"

    def reader() -> None:
        try:
            pending = b""
            for chunk in _raw_chunks(stdin):
                *parts, pending = (pending + chunk).split(sep)
                for part in parts:
                    lines.put(part if null else part.rstrip(b"\r"))
            lines.put(pending if null else pending.rstrip(b"\r"))
        finally:
            lines.put(done)

    threading.Thread(target=reader, name="fuyu-stdin", daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=idle_after)
        except queue.Empty:
            yield IDLE
            line = _wait(lines)
        if line is done:
            return
        if line.strip():
            yield os.fsdecode(line)


def _wait(lines) -> bytes | object:
    """lines.get(), in waits of 0.1 s: a Ctrl-C the kernel hands to another thread (the reader,
    blocked in read()) reaches the main thread only when it next runs Python code, never during
    one untimed wait (seen: a run that ignored Ctrl-C while waiting for paths)."""
    import queue

    while True:
        try:
            return lines.get(timeout=0.1)
        except queue.Empty:
            pass


def _raw_chunks(stdin: BinaryIO) -> Iterator[bytes]:
    """What stdin holds, as it arrives: read from its file descriptor where it has one, not
    through its buffer, whose lock a reader blocked at Ctrl-C would hold while Python shuts down
    (a "Fatal Python error" and SIGABRT instead of exit 130)."""
    try:
        fd = stdin.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        fd = None
    while chunk := (os.read(fd, 65536) if fd is not None
                    else stdin.read1(65536) if hasattr(stdin, "read1") else stdin.read(65536)):
        yield chunk


def _walk(root: str, recursive: bool, found: Found, is_own_sidecar) -> Iterator[str]:
    """Folder entries in sorted order (depth-first with -r), skipping hidden ones."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise FuyuError(f"cannot list folder {root} ({e.strerror or e})", "check its permissions") from None
    for entry in entries:
        if entry.name == SIDECAR_MANIFEST:  # fuyu's own bookkeeping, not a hidden input
            continue
        if entry.name.startswith("."):
            found.hidden += 1
            continue
        path = os.path.join(root, entry.name)
        try:
            mode = entry.stat().st_mode  # follows links
        except OSError:
            found.special.append(path)  # a dangling link, or gone since listing
            continue
        if stat.S_ISDIR(mode):
            if recursive and not entry.is_symlink():  # a linked folder would be an alias or a loop
                yield from _walk(path, recursive, found, is_own_sidecar)
        elif not stat.S_ISREG(mode):
            found.special.append(path)
        elif Path(entry.name).suffix.lower() in folder_extensions():
            yield path
        elif is_own_sidecar(path):
            found.own_sidecars += 1
        else:
            found.skipped.append(path)


def iter_files(args: list[str], stdin: BinaryIO | None, found: Found, *, recursive: bool = False,
               null: bool = False, is_own_sidecar=lambda path: False) -> Iterator[str | _Idle]:
    """Every input file once, in the order found (and IDLE while stdin is quiet). A named path
    that does not exist is a usage error (exit 2) before anything is yielded; paths from stdin are
    taken as given (a stale one becomes an error record)."""
    if args.count("-") > 1:
        raise FuyuError("'-' given more than once", "read stdin once: pass - a single time")
    for arg in args:
        if arg != "-" and not is_uri(arg) and not os.path.lexists(arg) and not glob.has_magic(arg):
            raise FuyuError(f"no such file or folder ({arg})", "check the path; quote globs so fuyu can expand them")
    seen: set[str] = set()

    def once(path: str) -> bool:
        key = resolve(path)
        if key in seen:
            found.duplicates += 1
            return False
        seen.add(key)
        return True

    for arg in args:
        if arg == "-":
            yield from (p for p in read_paths(stdin, null) if p is IDLE or once(p))
        elif is_uri(arg):
            if once(arg):
                yield arg
        elif os.path.isdir(arg):
            yield from filter(once, _walk(arg, recursive, found, is_own_sidecar))
        elif os.path.lexists(arg):
            if once(arg):
                yield arg
        else:  # an unexpanded glob
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise FuyuError(f"no such file or folder ({arg})", "check the path; quote globs so fuyu can expand them")
            exts = folder_extensions()
            for m in matches:
                if os.path.isfile(m) and Path(m).suffix.lower() in exts and once(m):
                    yield m
