"""`fuyu ask`: answer questions about each image or page; several questions share the image's prefill.

-q questions give one record per (item, question); --field/--fields give one record per item (or,
with --per document, per file) with a column per field (fuyu/fields.py). Typed answers (--type, or
a field's type) are decoded under a grammar, so they always parse.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from fuyu.errors import FuyuError
from fuyu.options import GEN, PathsArg, RunOptions, run_command, text_after_paths

EXAMPLES = """[b]Examples[/b]

  fuyu ask chart.png 'What is the highest value?'
  fuyu ask invoices/ --fields invoice-fields.json --format csv > fields.csv   [dim]# a row per page[/dim]
  fuyu ask invoices/ --field total:number='What is the total amount?' --field vendor='Who sent it?' \\
      --per document -o fields.jsonl                 [dim]# a row per file; rerun with more fields[/dim]
  fuyu ask doc.pdf 'Total?' --type number
  fuyu ask docs/ --questions questions.txt -o answers.jsonl   [dim]# one question per line[/dim]
  ls shots/*.png | fuyu ask - -q 'Is there an error dialog?' --type boolean -o answers.jsonl
"""

FIELDS = "Fields"


class Per(str, enum.Enum):
    page = "page"
    document = "document"


QuestionOpt = Annotated[Optional[list[str]], typer.Option(
    "--question", "-q", metavar="TEXT", show_default=False,
    help="A question; give -q several times for several (each image is computed once for all).")]
QuestionsFileOpt = Annotated[Optional[Path], typer.Option(
    "--questions", exists=True, dir_okay=False, metavar="FILE", show_default=False,
    help="Questions from a file, one per line (blank lines ignored).")]
FieldOpt = Annotated[Optional[list[str]], typer.Option(
    "--field", metavar="NAME[:TYPE]=QUESTION", show_default=False, rich_help_panel=FIELDS,
    help="A named field: one record per item with a column per field (repeatable). TYPE: text "
         "(default), number, integer, boolean, choice (with --choices), regex (with --pattern).")]
FieldsFileOpt = Annotated[Optional[Path], typer.Option(
    "--fields", exists=True, dir_okay=False, metavar="FILE", show_default=False, rich_help_panel=FIELDS,
    help='Fields from a JSON list of {"name", "question", "type", "choices", "pattern"} (or TOML '
         "[[field]] tables); see docs/fields.md.")]
TypeOpt = Annotated[Optional[str], typer.Option(
    "--type", metavar="text|number|integer|boolean|choice|regex", show_default=False, rich_help_panel=GEN,
    help="The questions' answer type: decoding is constrained so the answer always parses "
         "(`answer` in the record).")]
ChoicesOpt = Annotated[Optional[str], typer.Option(
    "--choices", metavar="A,B,…", show_default=False, rich_help_panel=GEN,
    help="The answer is one of these (implies --type choice).")]
PatternOpt = Annotated[Optional[str], typer.Option(
    "--pattern", metavar="REGEX", show_default=False, rich_help_panel=GEN,
    help="The whole answer matches this regular expression (implies --type regex).")]
PerOpt = Annotated[Per, typer.Option(
    "--per", metavar="page|document", rich_help_panel=FIELDS,
    help="With fields: a row per page, or per file (each answer from the page where it scores best, "
         "that page in NAME_page).")]


def questions_from(paths: list[str], question: list[str] | None, questions: Path | None) -> tuple[list[str], list[str]]:
    """(paths, questions): -q and --questions, or else the last argument, which must not be a file."""
    asked = list(question or [])
    if questions is not None:
        asked += [line.strip() for line in questions.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not asked:
        paths, last = text_after_paths(
            paths, what="a question",
            missing=FuyuError("no question given", "fuyu ask IMAGE 'question', or fuyu ask IMAGES... -q 'question'"),
            hint="give the question with -q/--question, e.g. fuyu ask a.png b.png -q 'Total?'")
        asked = [last]
    if any(not q.strip() for q in asked):
        raise FuyuError("a question is empty", "give each -q some text")
    return paths, list(dict.fromkeys(asked))  # the same question twice is asked once


def answer_type(type: str | None, choices: str | None, pattern: str | None) -> tuple[str, tuple | None, str | None]:
    """(type, choices, pattern) from --type/--choices/--pattern; --choices alone means choice."""
    if type is None:
        type = "choice" if choices is not None else "regex" if pattern is not None else "text"
    parsed = None if choices is None else tuple(c.strip() for c in choices.split(","))
    return type, parsed, pattern


def fields_from(field: list[str] | None, fields_file: Path | None, choices, pattern) -> list:
    """The --fields file's fields, then each --field NAME[:TYPE]=QUESTION (--choices/--pattern
    complete a choice or regex field given that way)."""
    from fuyu.fields import make_field, parse_field_option, read_fields_file

    out = read_fields_file(fields_file) if fields_file is not None else []
    for value in field or []:
        name, question = parse_field_option(value)
        name, _, type = name.partition(":")
        type = type.strip() or "text"
        out.append(make_field(name.strip(), question, type, tuple(c.strip() for c in choices.split(","))
                              if choices is not None and type == "choice" else None,
                              pattern if type == "regex" else None, f"--field {value}"))
    return out


@run_command(default_max_new_tokens=64)
def ask(paths: PathsArg, question: QuestionOpt = None, questions: QuestionsFileOpt = None,
        field: FieldOpt = None, fields: FieldsFileOpt = None, per: PerOpt = Per.page,
        type: TypeOpt = None, choices: ChoicesOpt = None, pattern: PatternOpt = None, *,
        run: RunOptions) -> None:
    """Ask questions about images: IMAGE... QUESTION, IMAGE... -q Q1 -q Q2 (one record per
    question), or IMAGE... --field NAME=QUESTION... (one record per item, a column per field)."""
    from fuyu.pipeline import run_task
    from fuyu.records import Ask

    if field or fields is not None:
        from fuyu.fields import FieldSet, check_names

        if question or questions is not None:
            raise FuyuError("-q gives a record per question, --field/--fields a record per item",
                            "give the questions as fields, e.g. --field total='Total?'")
        if type is not None:
            raise FuyuError("--type types -q questions; a field has its own type",
                            "write --field NAME:TYPE=QUESTION, or \"type\" in the --fields file")
        named = check_names(fields_from(field, fields, choices, pattern))
        fieldset = FieldSet(named, per_document=per is Per.document, min_score=run.gen.min_score)
        return run_task(fieldset.asks, run, fields=fieldset)
    if per is not Per.page:
        raise FuyuError("--per document applies to fields", "add --field NAME=QUESTION (or --fields FILE)")
    paths, asked = questions_from(paths, question, questions)
    kind, options, regex = answer_type(type, choices, pattern)
    if kind == "text" and (choices is not None or pattern is not None):
        raise FuyuError("--choices and --pattern type the answer; --type text does not", "drop --type text")
    if kind == "text":
        asks = [Ask("ask", q) for q in asked]
    else:  # each question its own typed field, so that the runner constrains and parses it
        from fuyu.fields import make_field

        asks = [Ask("ask", q, field=make_field(f"q{i}", q, kind, options, regex, f"--type {kind}"))
                for i, q in enumerate(asked)]
    run_task(asks, run.with_paths(paths))


def register(app: typer.Typer) -> None:
    app.command(epilog=EXAMPLES)(ask)
