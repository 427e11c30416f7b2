"""Turn command-line paths into the list of images to process.

Arguments may be files, folders, globs the shell did not expand, or `-` (paths on stdin, one per
line or NUL-separated). Files named explicitly are always taken; inside folders only image
extensions are, and the rest is reported as skipped.
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from fuyu.errors import FuyuError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass
class Inputs:
    images: list[str] = field(default_factory=list)  # in the order found, each file once
    skipped: list[str] = field(default_factory=list)  # folder entries with other extensions

    def skipped_summary(self, show: int = 3) -> str:
        """'2 skipped (.txt ×2: a.txt, b.txt)' or '' when nothing was skipped."""
        if not self.skipped:
            return ""
        exts = Counter(Path(p).suffix.lower() or "(none)" for p in self.skipped)
        kinds = ", ".join(f"{e} ×{n}" for e, n in exts.most_common())
        names = ", ".join(self.skipped[:show]) + (", …" if len(self.skipped) > show else "")
        return f"{len(self.skipped)} skipped, not images ({kinds}: {names})"


def _read_stdin(stdin: TextIO, null: bool) -> list[str]:
    text = stdin.read()
    parts = text.split("\0") if null else text.splitlines()
    return [p for p in parts if p.strip()]


def _folder(root: Path, recursive: bool) -> list[Path]:
    entries = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in entries if p.is_file() and not p.name.startswith("."))


def collect(args: list[str], stdin: TextIO, *, recursive: bool = False, null: bool = False) -> Inputs:
    """Expand `args`; a named path that does not exist is a usage error (exit 2) before any work."""
    found = Inputs()
    seen: set[str] = set()

    def add(path: str, explicit: bool) -> None:
        key = os.path.abspath(path)
        if key in seen:
            return
        seen.add(key)
        if explicit or Path(path).suffix.lower() in IMAGE_EXTENSIONS:
            found.images.append(path)
        else:
            found.skipped.append(path)

    if args.count("-") > 1:
        raise FuyuError("'-' given more than once", "read stdin once: pass - a single time")
    for arg in args:
        if arg == "-":
            # Paths from a pipeline are taken as given: a stale one becomes an error record.
            for line in _read_stdin(stdin, null):
                add(line, explicit=True)
        elif os.path.isdir(arg):
            for p in _folder(Path(arg), recursive):
                add(str(p), explicit=False)
        elif os.path.exists(arg):
            add(arg, explicit=True)
        elif glob.has_magic(arg) and (matches := sorted(glob.glob(arg, recursive=True))):
            for m in matches:
                if os.path.isfile(m):
                    add(m, explicit=False)
        else:
            raise FuyuError(f"no such file or folder ({arg})",
                            "check the path; quote globs so fuyu can expand them")
    return found
