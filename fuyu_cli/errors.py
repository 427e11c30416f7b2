"""Exit codes, and the errors the CLI knows how to explain in one line: `error: what (file) — what to do`."""

from __future__ import annotations

import errno
import sys

# Exit codes (docs/cli.md "Exit codes"); 141 (128 + SIGPIPE) when stdout's reader goes away is the
# shell's own convention, produced by dying of SIGPIPE rather than by a code of ours.
OK = 0
ITEMS_FAILED = 1  # some items failed; the others are done
USAGE = 2  # usage error, or a model that cannot be used
OUTPUT = 3  # the output cannot be written (disk full, permission, read-only): finished records kept
INTERRUPTED = 130  # Ctrl-C: finished records kept, a rerun continues
TERMINATED = 143  # SIGTERM (128 + 15), handled like Ctrl-C
INTERNAL = 70  # an unexpected error: a bug in fuyu (EX_SOFTWARE)


class FuyuError(Exception):
    """A failure the user can fix; `hint` says how."""

    def __init__(self, message: str, hint: str = "", exit_code: int = USAGE):
        super().__init__(message)
        self.hint = hint
        self.exit_code = exit_code


class OutputError(FuyuError):
    """Writing results failed: the run stops at once (exit 3), keeping what is written."""

    def __init__(self, path, exc: OSError):
        what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.EROFS: "read-only file system"}.get(exc.errno, exc.strerror or str(exc))
        super().__init__(f"cannot write {path}: {what}",
                         "free space or fix the permissions, then rerun the same command: finished "
                         "records are kept and the rest is done", OUTPUT)


class StdoutClosed(Exception):
    """stdout's reader went away (`fuyu … | head`): the run stops quietly (not an OSError, so no
    library on the way turns it into an error of its own)."""


def one_line(text: object, first: bool = False) -> str:
    """`text` (a message or an exception) as one line: each run of whitespace, newlines included,
    becomes one space. first: its first non-blank line only (what precedes a traceback: Ray's
    errors, log records, warnings)."""
    text = str(text)
    if first:
        text = next((line for line in text.splitlines() if line.strip()), "")
    return " ".join(text.split())


def record_error(exc: BaseException) -> str:
    """An exception as a failed record's `error`: ours and preprocessing's by their message (they
    name the file and what to do), anything else after its type."""
    known = isinstance(exc, FuyuError) or _library_error(exc, "fuyu.preprocess", "PreprocessError")
    return one_line(exc) if known else f"{type(exc).__name__}: {one_line(exc)}"


def _library_error(exc: BaseException, module: str, name: str) -> bool:
    # Checked through sys.modules so the error path never imports torch: if the class was
    # never imported, the exception cannot be one of its instances.
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(exc, cls)


def explain(exc: BaseException) -> tuple[str, str, int] | None:
    """(message, hint, exit code) for exceptions we know, None for the unexpected."""
    if isinstance(exc, FuyuError):
        return str(exc), exc.hint, exc.exit_code
    # The libraries' messages already name the file and say what to do.
    if (_library_error(exc, "fuyu.model", "CheckpointError")
            or _library_error(exc, "fuyu.preprocess", "PreprocessError")):
        return str(exc), "", USAGE
    if _library_error(exc, "torch", "OutOfMemoryError") or isinstance(exc, MemoryError):
        return ("out of memory while loading or running the model",
                "try --batch-size 1, --quantize 8bit/4bit or a smaller --dtype", USAGE)
    if isinstance(exc, NotImplementedError):
        return str(exc) or "not implemented", "choose another option", USAGE
    return None
