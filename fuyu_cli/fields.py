"""Named fields (`fuyu ask --field NAME=QUESTION`, `--fields FILE`): their types, the regex that
constrains each typed answer, parsing answers into values, and one record per item (or per
document) with a column per field. docs/fields.md is the user's reference.

A field is asked as an `ask` question whose Ask carries the Field: the runner constrains its
decoding with `Field.regex` (fuyu.model.constrain) and parses the text with `Field.parse`. The
FieldRunner here turns the runner's one record per (item, field) into one FieldRecord per item.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from fuyu.errors import FuyuError, one_line
from fuyu.records import Ask, Outcome, Record, Unit, original_path, page_id, printable, record_key, resolve

TYPES = ("text", "number", "integer", "boolean", "choice", "regex")
# JSON's number and integer grammars; booleans as the model tends to say them.
NUMBER = r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?"
INTEGER = r"-?(0|[1-9][0-9]{0,17})"  # fits a 64-bit column
BOOLEANS = {"true": True, "yes": True, "false": False, "no": False}
# The columns of a field record: a field may not take their names.
RESERVED = ("path", "page", "pages", "id", "task", "prompt", "answers", "scores", "reasons",
            "answer_pages", "fields", "doubtful", "width", "height", "new_tokens", "seconds", "error",
            "path_bytes")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_META = set("\\.^$|?*+()[]{}-&~#")


def _escape(text: str) -> str:
    """A literal for outlines-core's regex syntax (and Python's): metacharacters backslashed."""
    return "".join("\\" + c if c in _META else c for c in text)


@dataclass(frozen=True)
class Field:
    """One named question and the type of its answer."""

    name: str
    question: str
    type: str = "text"
    choices: tuple[str, ...] | None = None
    pattern: str | None = None

    @property
    def regex(self) -> str | None:
        """What the answer's text must match (one leading space allowed: the tokenizer's word
        start, which decoding drops), or None for free text."""
        body = {"number": NUMBER, "integer": INTEGER,
                "boolean": "|".join(w for b in BOOLEANS for w in (b, b.capitalize())),
                "choice": "|".join(_escape(c) for c in self.choices or ()),
                "regex": self.pattern}.get(self.type)
        return None if body is None else f"( )?({body})"

    def parse(self, text: str):
        """The answer's value; ValueError when `text` is not one (an answer cut short)."""
        if self.type == "text":
            return " ".join(text.split())
        body = text[1:] if text.startswith(" ") else text
        if not re.fullmatch(self.regex, text):
            raise ValueError(f"{body!r} is not a complete {self.type}")
        if self.type == "number":
            value = float(body)
            return int(value) if value.is_integer() and abs(value) < 2**53 else value
        if self.type == "integer":
            return int(body)
        if self.type == "boolean":
            return BOOLEANS[body.lower()]
        return body

    def spec(self) -> dict:
        """The field as written in a fields file (what makes two fields the same)."""
        d = {"name": self.name, "question": self.question, "type": self.type}
        if self.choices is not None:
            d["choices"] = list(self.choices)
        if self.pattern is not None:
            d["pattern"] = self.pattern
        return d

    @property
    def ask(self) -> Ask:
        return Ask("ask", self.question, field=self)


def make_field(name, question, type="text", choices=None, pattern=None, where: str = "") -> Field:
    """A checked Field; every problem is a FuyuError (exit 2) saying which field and what to do."""
    at = f" ({where})" if where else ""
    if not isinstance(name, str) or not name.strip():
        raise FuyuError(f"a field has an empty name{at}", "give each field a name, e.g. --field total='Total?'")
    if not _NAME.fullmatch(name):
        raise FuyuError(f"field name {name!r}{at} is not a column name",
                        "use letters, digits and _ (not starting with a digit), e.g. invoice_total")
    if name in RESERVED:
        raise FuyuError(f"field name {name!r}{at} is one of the record's own columns",
                        f"rename the field, e.g. {name}_field (taken: {', '.join(RESERVED)})")
    if not isinstance(question, str) or not question.strip():
        raise FuyuError(f"field {name!r}{at} has no question", f"e.g. --field {name}='What is the {name}?'")
    if type not in TYPES:
        raise FuyuError(f"field {name!r}{at}: unknown type {type!r}", f"use one of {', '.join(TYPES)}")
    if (choices is not None) != (type == "choice"):
        raise FuyuError(f"field {name!r}{at}: " + ("a choice needs choices" if type == "choice" else
                        f"choices apply to type choice, not {type}"),
                        "e.g. --type choice --choices paid,unpaid (or \"choices\": [\"paid\", \"unpaid\"])")
    if choices is not None:
        if isinstance(choices, str) or not all(isinstance(c, str) and c.strip() for c in choices) or not choices:
            raise FuyuError(f"field {name!r}{at}: choices must be a list of non-empty strings",
                            "e.g. \"choices\": [\"paid\", \"unpaid\"]")
        choices = tuple(dict.fromkeys(choices))
    if (pattern is not None) != (type == "regex"):
        raise FuyuError(f"field {name!r}{at}: " + ("a regex needs a pattern" if type == "regex" else
                        f"a pattern applies to type regex, not {type}"), "e.g. --pattern '[A-Z]{2}-[0-9]+'")
    if pattern is not None:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise FuyuError(f"field {name!r}{at}: invalid regex {pattern!r} ({e})",
                            "write a Python regular expression that the whole answer must match") from None
    return Field(name, question.strip(), type, choices, pattern)


def check_names(fields: list[Field]) -> list[Field]:
    """No two fields share a name, and no CSV column (NAME_score, NAME_page) is another field's."""
    names = [f.name for f in fields]
    for name in names:
        if names.count(name) > 1:
            raise FuyuError(f"field {name!r} is given twice", "give each field its own name")
        for suffix in ("_score", "_page"):
            if name.endswith(suffix) and name[:-len(suffix)] in names:
                raise FuyuError(f"field {name!r} would share a column with field {name[:-len(suffix)]!r}'s "
                                f"{suffix[1:]}", "rename one of them")
    return fields


def read_fields_file(path: Path) -> list[Field]:
    """A JSON list of {"name", "question", "type", "choices", "pattern"}, or a TOML file of
    [[field]] tables with the same keys."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FuyuError(f"cannot read fields file {path}: {e}", "give a JSON or TOML file") from None
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        raise FuyuError(f"{path}: YAML fields files are not read (no dependency of fuyu parses YAML)",
                        "write the same list as JSON (or TOML [[field]] tables)")
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text).get("field")
        else:
            data = json.loads(text)
    except ImportError:
        raise FuyuError(f"{path}: TOML needs Python 3.11 or later", "write the fields as JSON") from None
    except ValueError as e:  # json.JSONDecodeError, tomllib.TOMLDecodeError
        raise FuyuError(f"{path} is not valid {'TOML' if suffix == '.toml' else 'JSON'}: "
                        f"{one_line(e)}", "fix the file; see docs/fields.md") from None
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        shape = "[[field]] tables" if suffix == ".toml" else 'a list of {"name": …, "question": …} objects'
        raise FuyuError(f"{path}: expected {shape}", "see docs/fields.md for the format")
    fields = []
    for i, d in enumerate(data, 1):
        unknown = set(d) - {"name", "question", "type", "choices", "pattern"}
        if unknown:
            raise FuyuError(f"{path}: field {i} has unknown keys {', '.join(sorted(unknown))}",
                            "use name, question, type, choices, pattern")
        fields.append(make_field(d.get("name"), d.get("question"), d.get("type", "text"), d.get("choices"),
                                 d.get("pattern"), f"{where}, field {i}"))
    return fields


def parse_field_option(value: str) -> tuple[str, str]:
    name, sep, question = value.partition("=")
    if not sep:
        raise FuyuError(f"--field {value!r}: expected NAME=QUESTION", "e.g. --field total='What is the total?'")
    return name.strip(), question


# --- records -------------------------------------------------------------------------------------

@dataclass
class FieldRecord(Outcome):
    """One item (or document) with a value for each field asked of it this run. `answers[name]`
    is None when the answer did not finish (`reasons[name]` says why); a field whose item failed
    is absent and `error` says why."""

    path: str
    page: int | None = None
    pages: int | None = None
    answers: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)
    answer_pages: dict | None = None  # --per document: the page each answer comes from
    fields: dict = field(default_factory=dict)  # name → spec of every field asked (resume key)
    doubtful: list | None = None  # fields whose score is below --min-score
    width: int | None = None
    height: int | None = None
    new_tokens: int | None = None
    seconds: float | None = None
    error: str | None = None
    path_bytes: str | None = None

    task = "fields"

    @property
    def prompt(self) -> str:  # what --output's compaction keys on, with path and page
        return ",".join(sorted(self.fields))

    @property
    def text(self) -> str:  # --format text
        return json.dumps(self.answers, ensure_ascii=False)

    def key(self) -> tuple:
        return record_key(original_path(self.path, self.path_bytes), self.page, self.task, self.prompt)

    def with_path(self, path: str) -> FieldRecord:
        from dataclasses import replace

        return replace(self, path=path)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None and v != {} or k == "answers"}
        d["path"], raw = printable(self.path)
        if raw is not None:
            d["path_bytes"] = raw
        order = ("path", "page", "pages", "id", "task", "prompt", "answers", "scores", "reasons", "answer_pages",
                 "doubtful", "fields", "width", "height", "new_tokens", "seconds", "error", "path_bytes")
        d.update(id=page_id(d["path"], self.page), task=self.task, prompt=self.prompt)
        return {k: d[k] for k in order if k in d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(", ", ": "))


class FieldSet:
    """The fields of one run and how its rows are cut (per page, or per document)."""

    def __init__(self, fields: list[Field], per_document: bool = False, min_score: float | None = None):
        self.fields, self.per_document, self.min_score = check_names(list(fields)), per_document, min_score

    @property
    def asks(self) -> list[Ask]:
        return [f.ask for f in self.fields]

    def fingerprint(self) -> dict:
        return {"fields": [f.spec() for f in self.fields], "per": "document" if self.per_document else "page",
                "min_score": self.min_score}

    # --- output shape ------------------------------------------------------------------------

    def columns(self) -> list[str]:
        cols = ["path", "page", "pages", "id"]
        for f in self.fields:
            cols += [f.name, f"{f.name}_score"] + ([f"{f.name}_page"] if self.per_document else [])
        return cols + ["doubtful", "error", "path_bytes"]

    def row(self, rec: FieldRecord) -> dict:
        """One flat row: a column per field, its score (and page, per document)."""
        d = rec.to_dict()
        row = {k: d.get(k) for k in ("path", "page", "pages", "id", "error", "path_bytes")}
        for f in self.fields:
            row[f.name] = rec.answers.get(f.name)
            row[f"{f.name}_score"] = rec.scores.get(f.name)
            if self.per_document:
                row[f"{f.name}_page"] = (rec.answer_pages or {}).get(f.name)
        row["doubtful"] = ";".join(rec.doubtful) if rec.doubtful else None
        return row

    def csv_rows(self):
        from fuyu.output import CsvRows

        return CsvRows(self.columns(), self.row)

    def schema(self):
        """Parquet columns: numbers float64, integers int64, booleans bool, the rest strings."""
        import pyarrow as pa

        kinds = {"number": pa.float64(), "integer": pa.int64(), "boolean": pa.bool_()}
        types = {"page": pa.int32(), "pages": pa.int32()}
        for f in self.fields:
            types[f.name] = kinds.get(f.type, pa.string())
            types[f"{f.name}_score"] = pa.float64()
            types[f"{f.name}_page"] = pa.int32()
        return pa.schema([(c, types.get(c, pa.string())) for c in self.columns()])

    # --- resume --------------------------------------------------------------------------------

    def answered(self, lines: Iterable[dict]) -> dict:
        """{(file, page): names answered} from an --output file's records; a field asked there
        under the same name but another question or type is refused (never a silent mix)."""
        mine = {f.name: {k: v for k, v in f.spec().items() if k != "name"} for f in self.fields}
        done: dict = {}
        for d in lines:
            if d.get("task") != "fields" or not isinstance(d.get("fields"), dict):
                continue
            for name in d.get("answers") or {}:
                spec = d["fields"].get(name)
                if name in mine and spec != mine[name]:
                    raise FuyuError(f"field {name!r} is in the output already, asked differently "
                                    f"({json.dumps(spec, ensure_ascii=False)})",
                                    "give the changed field a new name, or write to another --output")
                key = (resolve(original_path(d["path"], d.get("path_bytes"))), d.get("page"))
                done.setdefault(key, set()).add(name)
        return done

    def wrap(self, runner) -> FieldRunner:
        return FieldRunner(runner, self)


class FieldRunner:
    """A Runner whose records are FieldRecords: the inner runner's record per (item, field) are
    gathered per item (or per document) and written as one."""

    def __init__(self, runner, fieldset: FieldSet):
        self.runner, self.set = runner, fieldset
        self.load_seconds = getattr(runner, "load_seconds", None)
        for f in fieldset.fields:  # a pattern the grammar library cannot take fails before any work
            if f.regex is not None and hasattr(runner, "grammar"):
                try:
                    runner.grammar(f.regex)
                except FuyuError as e:
                    raise FuyuError(f"field {f.name!r}: {e}", e.hint) from None

    def default_batch_size(self) -> int:
        return self.runner.default_batch_size()

    def _group(self, path: str, page):
        return (path, None) if self.set.per_document else (path, page)

    def run(self, work, batch_size: int, gen, window: int | None = None) -> Iterator[FieldRecord]:
        expected: dict = {}  # group → records still to come from the runner
        listed: set = set()  # groups whose items have all been listed

        def watch(stream):
            current = None
            for w in stream:
                if isinstance(w, (Unit, Record)):
                    item = w.item if isinstance(w, Unit) else w
                    group = self._group(item.path, item.page)
                    if current is not None and group != current:
                        listed.add(current)
                    current = group
                    expected[group] = expected.get(group, 0) + (len(w.asks) if isinstance(w, Unit) else 1)
                yield w
            if current is not None:
                listed.add(current)

        pending: dict = {}
        kwargs = {} if window is None else {"window": window}
        for rec in self.runner.run(watch(work), batch_size, gen, **kwargs):
            group = self._group(rec.path, rec.page)
            pending.setdefault(group, []).append(rec)
            if len(pending[group]) >= expected.get(group, 0) and group in listed:
                yield self.combine(pending.pop(group))
        for records in pending.values():
            yield self.combine(records)

    def combine(self, records: list[Record]) -> FieldRecord:
        """One row from the records of an item (or of a document's pages): each field's answer
        from the page where its score is best among those where it parsed."""
        first = records[0]
        per_doc = self.set.per_document
        out = FieldRecord(first.path, None if per_doc else first.page, first.pages,
                          answer_pages={} if per_doc else None, width=first.width, height=first.height)
        out.new_tokens = sum(r.new_tokens or 0 for r in records)
        out.seconds = round(sum(r.seconds or 0 for r in records), 4)
        by_name: dict = {}
        for rec in records:
            if rec.asked is not None and rec.asked.field is not None:
                by_name.setdefault(rec.asked.field.name, []).append(rec)
        for f in self.set.fields:
            recs = by_name.get(f.name)
            if not recs:
                continue
            out.fields[f.name] = {k: v for k, v in f.spec().items() if k != "name"}
            good = [r for r in recs if r.ok]
            if good:
                best = max(good, key=lambda r: (r.score if r.score is not None else float("-inf"), -(r.page or 0)))
                out.answers[f.name] = f.parse(best.text) if f.type == "text" else best.answer
                out.scores[f.name] = best.score
                if per_doc:
                    out.answer_pages[f.name] = best.page
                if self.set.min_score is not None and best.score is not None and best.score < self.set.min_score:
                    out.doubtful = (out.doubtful or []) + [f.name]
            elif all(r.unparsed for r in recs):
                out.answers[f.name] = None
                out.reasons[f.name] = recs[0].error
            else:  # the item (or every page) failed: no answer, and the record says why
                out.fields.pop(f.name)
                out.error = next(r.error for r in recs if not r.unparsed)
        if per_doc and not out.answer_pages:
            out.answer_pages = None
        return out


# --- Python API ------------------------------------------------------------------------------------

def as_fields(fields) -> list[Field]:
    """Fields from Field objects or dicts with the keys of a fields file, checked."""
    out = []
    for i, f in enumerate(fields, 1):
        if isinstance(f, Field):
            out.append(make_field(f.name, f.question, f.type, f.choices, f.pattern))
        elif isinstance(f, dict):
            out.append(make_field(f.get("name"), f.get("question"), f.get("type", "text"), f.get("choices"),
                                  f.get("pattern"), f"field {i}"))
        else:
            raise FuyuError(f"field {i} is a {type(f).__name__}", "give Field(...) or {\"name\": …, \"question\": …}")
    return check_names(out)


def extract(paths: Iterable[str], fields, *, model: str | None = None, runner=None, per_document: bool = False,
            min_score: float | None = None, max_new_tokens: int = 64, device: str = "auto", dtype: str = "auto",
            batch_size: int | None = None, pages: str | None = None, dpi: float | None = None) -> Iterator[FieldRecord]:
    """FieldRecords for image and document files (a PDF: one per page, or one per file with
    per_document), as `fuyu ask --fields` writes them. `runner`: a fuyu.runner.Runner already
    loaded (else `model` is loaded here)."""
    from fuyu import sources
    from fuyu.options import GenOptions, ModelSpec
    from fuyu.pipeline import Tally, plan

    fieldset = FieldSet(as_fields(fields), per_document, min_score)
    src = sources.Options(pages, dpi)
    if runner is None:
        from fuyu.runner import Runner

        runner = Runner.load(ModelSpec(path=model, device=device, dtype=dtype), max_new_tokens=max_new_tokens,
                             sources_options=src)
    wrapped = fieldset.wrap(runner)
    work = plan(list(paths), fieldset.asks, src, Tally())
    gen = GenOptions(max_new_tokens=max_new_tokens, min_score=min_score)
    yield from wrapped.run(work, batch_size or runner.default_batch_size(), gen)
