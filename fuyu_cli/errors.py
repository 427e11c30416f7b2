"""Errors the CLI knows how to explain in one line: `error: what (file) — what to do`."""

from __future__ import annotations

import sys

USAGE = 2  # usage errors and unusable models; 1 means "some items failed"


class FuyuError(Exception):
    """A failure the user can fix; `hint` says how."""

    def __init__(self, message: str, hint: str = "", exit_code: int = USAGE):
        super().__init__(message)
        self.hint = hint
        self.exit_code = exit_code


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
    if _library_error(exc, "fuyu.model", "CheckpointError") or _library_error(exc, "fuyu.preprocess", "PreprocessError"):
        return str(exc), "", USAGE
    if _library_error(exc, "torch", "OutOfMemoryError") or isinstance(exc, MemoryError):
        return ("out of memory while loading or running the model",
                "try --batch-size 1, --quantize 8bit/4bit or a smaller --dtype", USAGE)
    if isinstance(exc, NotImplementedError):
        return str(exc) or "not implemented", "choose another option", USAGE
    return None
