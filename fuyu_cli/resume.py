"""The --output file: one run at a time, records appended one fsynced line each, and every
(file, page, task, prompt) in it exactly once after a run.

- The file is locked (flock) for the whole run; a second run on it is refused at once and told
  which process holds it. Nothing ever rewrites the file while another run appends to it.
- A run killed at any moment leaves complete lines plus, at worst, one partial last line, which
  the next run cuts before appending.
- Retried failures and --overwrite append a new record for a key already in the file; when the
  run ends (and when the next one starts, after a crash), the file is compacted so the last
  record of each key is the only one. Compaction writes the kept lines to a journal file first
  (renamed into place when complete), then copies them over the locked file in place and deletes
  the journal; a run that finds a complete journal finishes the copy, so a crash at any step
  loses nothing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

from fuyu.errors import FuyuError, OutputError
from fuyu.records import Record, absolute


def lock_holder(fd: int) -> str:
    """'pid 1234: fuyu caption …' for the process holding a lock on fd's file (Linux
    /proc/locks), or 'another process' where that cannot be told."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[5] == inode:
                pid = fields[4]
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    cmd = ""
                return f"pid {pid}" + (f": {' '.join(cmd.split()[:6])}" if cmd.strip() else "")
    except OSError:
        pass
    return "another process"


class OutputFile:
    """An --output file opened for a run: locked, repaired, its finished keys known."""

    def __init__(self, path: Path):
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)  # the umask decides
        except OSError as e:
            raise OutputError(path, e) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = lock_holder(self.fd) if e.errno in (errno.EWOULDBLOCK, errno.EACCES) else str(e)
            os.close(self.fd)
            raise FuyuError(f"{path} is being written by another fuyu run ({holder})",
                            "wait for it to finish, or write to another --output file") from None
        self._journal = path.with_name(f".{path.name}.fuyu-compact")
        try:
            self._finish_journal()
            self._repair_tail()
            self.compact()
        except OSError as e:
            self.close()
            raise OutputError(path, e) from None
        self.finished: set[tuple] = set()  # keys with a record that succeeded
        for rec in self._records():
            if rec is not None and rec.ok:
                self.finished.add(rec.key())

    # --- reading -----------------------------------------------------------------------------

    def _lines(self) -> list[bytes]:
        os.lseek(self.fd, 0, os.SEEK_SET)
        data = b""
        while chunk := os.read(self.fd, 1 << 20):
            data += chunk
        return data.splitlines(keepends=True)

    def _records(self) -> list[Record | None]:
        return [_parse(line) for line in self._lines()]

    def _repair_tail(self) -> None:
        """Cut a partial last line left by a killed run (or end a whole JSON line with its newline)."""
        size = os.fstat(self.fd).st_size
        if size == 0:
            return
        lines = self._lines()
        tail = lines[-1]
        if tail.endswith(b"\n"):
            return
        if _parse(tail) is not None:
            os.write(self.fd, b"\n")
        else:
            os.ftruncate(self.fd, size - len(tail))

    # --- compaction --------------------------------------------------------------------------

    def compact(self) -> None:
        """Keep only the last record of each key (other lines, e.g. not ours, stay as they are)."""
        lines = self._lines()
        last: dict[tuple, int] = {}
        for i, line in enumerate(lines):
            rec = _parse(line)
            if rec is not None:
                last[rec.key()] = i
        keep = [line for i, line in enumerate(lines)
                if (rec := _parse(line)) is None or last[rec.key()] == i]
        if len(keep) == len(lines):
            return
        tmp = self._journal.with_name(self._journal.name + ".tmp")
        with open(tmp, "wb") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._journal)  # complete: from here on a crash is finished by the next run
        self._finish_journal()

    def _finish_journal(self) -> None:
        leftover = self._journal.with_name(self._journal.name + ".tmp")
        if leftover.exists():  # an incomplete journal: the file itself was not touched yet
            leftover.unlink()
        if not self._journal.exists():
            return
        data = self._journal.read_bytes()
        os.ftruncate(self.fd, 0)
        os.write(self.fd, data)  # O_APPEND: at the (new) end, i.e. from 0
        os.fsync(self.fd)
        self._journal.unlink()

    # --- writing -----------------------------------------------------------------------------

    def dicts(self) -> list[dict]:
        """Every line that is a JSON object (records of any command, field records included)."""
        out = []
        for line in self._lines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if isinstance(d, dict):
                out.append(d)
        return out

    def done(self, key: tuple) -> bool:
        return key in self.finished

    def write(self, rec: Record) -> None:
        """Append one record (absolute path, so a rerun from any folder recognises it), fsynced.
        A failed write is cut back to the last whole line and ends the run (exit 3)."""
        line = (rec.with_path(absolute(rec.path)).to_json() + "\n").encode("utf-8")
        size = os.fstat(self.fd).st_size
        try:
            written = os.write(self.fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(self.fd)
        except OSError as e:
            try:
                os.ftruncate(self.fd, size)  # no partial line stays behind (truncating needs no space)
            except OSError:
                pass
            raise OutputError(self.path, e) from None
        if rec.ok:
            self.finished.add(rec.key())

    def close(self, compact: bool = True) -> None:
        """Compact (a retried failure or an --overwrite leaves two records of one key), unlock.
        compact=False after a failed write: the next run compacts."""
        if self.fd < 0:
            return
        try:
            if compact:
                self.compact()
        except OSError as e:
            raise OutputError(self.path, e) from None
        finally:
            os.close(self.fd)
            self.fd = -1


def _parse(line: bytes) -> Record | None:
    """The record on one line, or None for anything else (a partial line, text not ours)."""
    try:
        d = json.loads(line)
    except ValueError:
        return None
    if not isinstance(d, dict) or not {"path", "task", "prompt"} <= d.keys():
        return None
    try:
        return Record.from_dict(d)
    except TypeError:
        return None
