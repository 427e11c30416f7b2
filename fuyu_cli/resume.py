"""Skip what an earlier run already finished, and keep an --output file one record per image.

A run killed at any moment leaves the output file as complete lines plus, at worst, one partial
last line (records are appended one write each). Before appending again we cut that partial
line and drop the records of the images about to be redone (earlier failures, or all of them
with --overwrite), so after the rerun every image appears exactly once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from fuyu.errors import FuyuError


def sidecar_path(image: str) -> Path:
    p = Path(image)
    return p.with_name(p.name + ".txt") if p.suffix.lower() == ".txt" else p.with_suffix(".txt")


def _key(path: str) -> str:
    return os.path.abspath(path)


def repair_tail(output: Path) -> None:
    """Cut a partial last line left by a killed run (or end a whole JSON line with its newline)."""
    with open(output, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        tail = data[data.rfind(b"\n") + 1:]
        try:
            json.loads(tail)
            f.write(b"\n")
        except ValueError:
            f.truncate(len(data) - len(tail))


def _records(output: Path) -> list[tuple[bytes, dict | None]]:
    rows = []
    with open(output, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            rows.append((line, rec if isinstance(rec, dict) and "path" in rec else None))
    return rows


def _drop(output: Path, rows: list[tuple[bytes, dict | None]], keys: set[str]) -> None:
    """Rewrite `output` without the records for `keys`: temp file, fsync, rename."""
    tmp = output.with_name(f".{output.name}.tmp")
    with open(tmp, "wb") as f:
        f.writelines(line for line, rec in rows if rec is None or _key(rec["path"]) not in keys)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)


@dataclass
class Plan:
    todo: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)


def plan(images: list[str], output: Path | None, sidecar: bool, overwrite: bool) -> Plan:
    """Split `images` into those to run and those already finished; prepare `output` for appending."""
    if sidecar:
        owners: dict[Path, str] = {}
        for image in images:
            other = owners.setdefault(sidecar_path(image), image)
            if other != image:
                raise FuyuError(f"{other} and {image} would share the sidecar {sidecar_path(image)}",
                                "rename one of them, or use --output instead of --sidecar")
    rows = []
    if output is not None and output.exists():
        repair_tail(output)
        rows = _records(output)
    finished = {_key(rec["path"]) for _, rec in rows if rec is not None and not rec.get("error")}

    resumable = (output is not None or sidecar) and not overwrite
    result = Plan()
    for image in images:
        done = resumable and (output is None or _key(image) in finished) and (
            not sidecar or sidecar_path(image).exists())
        (result.done if done else result.todo).append(image)

    if output is not None:
        in_file = {_key(rec["path"]) for _, rec in rows if rec is not None}
        redo = in_file & {_key(p) for p in result.todo}
        if redo:
            _drop(output, rows, redo)
    return result
