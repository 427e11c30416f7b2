"""What a run is made of: items (a file, or one page of a document), the prompts asked of each,
and the record written for every (item, prompt). Every output (stdout, --output, --output-dir,
sidecars) and every resume decision uses these types, so they cannot drift apart.

Paths are kept as Python str. A file name that is not valid UTF-8 arrives with its stray bytes as
lone surrogates (os.fsdecode); records show such bytes as `\\xNN` in `path` and carry the exact
name in `path_bytes` (base64), which `original_path` turns back into the path.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property

from fuyu.errors import one_line

TASKS = ("caption", "ask", "bbox", "ocr")


def is_uri(path: str) -> bool:
    """s3://…, gs://…, hdfs://…, file://…: read through pyarrow, never through os."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.isalnum() and len(scheme) > 1


def resolve(path: str) -> str:
    """The key a path is known by across runs and working directories: its real absolute path
    (symlinks followed), or the URI itself."""
    return path if is_uri(path) else os.path.realpath(path)


def absolute(path: str) -> str:
    """The absolute path as the user would recognise it (symlinks kept), or the URI itself."""
    return path if is_uri(path) else os.path.abspath(path)


def printable(path: str) -> tuple[str, str | None]:
    """(text safe to print and to encode as UTF-8, base64 of the exact name or None when the
    name is plain text): undecodable bytes become `\\xNN`."""
    try:
        path.encode("utf-8")
        return path, None
    except UnicodeEncodeError:
        raw = os.fsencode(path)
        return raw.decode("utf-8", "backslashreplace"), base64.b64encode(raw).decode("ascii")


def page_id(path: str, page: int | None) -> str:
    return path if page is None else f"{path}#page={page}"


@dataclass(frozen=True)
class Item:
    """One input the model sees: an image file, or page `page` (1-based) of `pages` of a document.
    `source` is what listing learnt about it (a fuyu.preprocess.pages.Page: size, kind), if anything."""

    path: str
    page: int | None = None
    pages: int | None = None
    source: object = field(default=None, compare=False, repr=False)

    @property
    def id(self) -> str:
        return page_id(self.path, self.page)


@dataclass(frozen=True)
class Ask:
    """One prompt asked of every item: the task and the user's text (prompt, question, text to
    find) or box (pixels x0, y0, x1, y1, for ocr)."""

    task: str
    text: str | None = None
    box: tuple[float, float, float, float] | None = None
    field: object = None  # a fuyu.fields.Field: a named answer, typed, its decoding constrained

    @cached_property  # asked for by the runner, the record and --output's resume key
    def prompt(self) -> str:
        """The text given to the processor (fuyu.preprocess builds every prompt)."""
        from fuyu.preprocess import task_prompt

        return task_prompt(self.task, self.text, self.box)


@dataclass(frozen=True)
class Unit:
    """An item and everything asked of it: the image is prepared (and prefilled) once."""

    item: Item
    asks: tuple[Ask, ...]


# Field order of every output; CSV columns are exactly these.
FIELDS = ("path", "page", "pages", "id", "task", "prompt", "text", "answer", "boxes", "score", "doubtful",
          "width", "height", "prompt_tokens", "new_tokens", "seconds", "error", "path_bytes")


class Outcome:
    """What every output record answers the same way: its page's id, and whether it succeeded
    (a record class with path, page and error fields)."""

    @property
    def id(self) -> str:
        return page_id(self.path, self.page)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Record(Outcome):
    path: str
    task: str
    prompt: str
    page: int | None = None
    pages: int | None = None
    text: str | None = None
    answer: object = None  # a typed question's value (number, int, bool, str), parsed from text
    boxes: list[list[int]] | None = None
    # Mean log-probability of the generated tokens (EOS included), after any constraint's
    # renormalisation: 0 is certain, more negative is less sure.
    score: float | None = None
    doubtful: bool | None = None  # score below --min-score
    width: int | None = None
    height: int | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    seconds: float | None = None
    error: str | None = None
    path_bytes: str | None = field(default=None)  # set by `encoded` for non-UTF-8 names
    # Not written: a typed answer that did not parse (its reason is `error`), told apart from a
    # failed item by fuyu/fields.py.
    unparsed: bool = field(default=False, repr=False)
    asked: Ask | None = field(default=None, repr=False, compare=False)  # the Ask it answers

    @classmethod
    def failed(cls, item: Item, ask: Ask, message: str, size=None, seconds=None) -> Record:
        rec = cls(item.path, ask.task, _prompt_or_empty(ask), item.page, item.pages,
                  error=one_line(message))
        if size:
            rec.width, rec.height = size
        rec.seconds = seconds
        rec.asked = ask
        return rec

    def key(self) -> tuple:
        """Resume key: the same (file, page, task, prompt) is done once, whatever the working
        directory or the spelling of the path."""
        return record_key(original_path(self.path, self.path_bytes), self.page, self.task, self.prompt)

    def with_path(self, path: str) -> Record:
        return replace(self, path=path)

    def to_dict(self) -> dict:
        """JSON-ready: None fields left out, every string valid UTF-8 (bytes of a file name that
        are not show as \\xNN; the exact name goes to path_bytes)."""
        d = {k: printable(v)[0] if isinstance(v, str) else v for k, v in asdict(self).items() if v is not None}
        raw = printable(self.path)[1]
        if raw is not None:
            d["path_bytes"] = raw
        d["id"] = page_id(d["path"], self.page)
        return {k: d[k] for k in FIELDS if k in d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(", ", ": "))

    @classmethod
    def from_dict(cls, d: dict) -> Record:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def record_key(path: str, page: int | None, task: str, prompt: str) -> tuple:
    return (resolve(path), page, task, prompt)


def original_path(path: str, path_bytes: str | None) -> str:
    """The path as the file system knows it, from a record's `path` and `path_bytes`."""
    return os.fsdecode(base64.b64decode(path_bytes)) if path_bytes else path


def _prompt_or_empty(ask: Ask) -> str:
    try:
        return ask.prompt
    except Exception:  # a prompt that cannot even be built (bad box) still gets its record
        return ask.text or ""
