"""`fuyu ask`: answer questions about each image or page; several questions share the image's prefill."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from fuyu.errors import FuyuError
from fuyu.options import PathsArg, RunOptions, run_command

EXAMPLES = """[b]Examples[/b]

  fuyu ask chart.png 'What is the highest value?'
  fuyu ask invoices/ -q 'Total?' -q 'Date?' -q 'Vendor?' --format csv > fields.csv
  fuyu ask docs/ --questions questions.txt -o answers.jsonl   [dim]# one question per line[/dim]
  ls shots/*.png | fuyu ask - -q 'Is there an error dialog?' -o answers.jsonl
"""

QuestionOpt = Annotated[Optional[list[str]], typer.Option(
    "--question", "-q", metavar="TEXT", show_default=False,
    help="A question; give -q several times for several (each image is computed once for all).")]
QuestionsFileOpt = Annotated[Optional[Path], typer.Option(
    "--questions", exists=True, dir_okay=False, metavar="FILE", show_default=False,
    help="Questions from a file, one per line (blank lines ignored).")]


def questions_from(paths: list[str], question: list[str] | None, questions: Path | None) -> tuple[list[str], list[str]]:
    """(paths, questions): -q and --questions, or else the last argument, which must not be a file."""
    asked = list(question or [])
    if questions is not None:
        asked += [line.strip() for line in questions.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not asked:
        if len(paths) < 2:
            raise FuyuError("no question given", "fuyu ask IMAGE 'question', or fuyu ask IMAGES... -q 'question'")
        *paths, last = paths
        if last == "-" or os.path.exists(last):
            raise FuyuError(f"the last argument ({last}) is a file, not a question",
                            "give the question with -q/--question, e.g. fuyu ask a.png b.png -q 'Total?'")
        asked = [last]
    if any(not q.strip() for q in asked):
        raise FuyuError("a question is empty", "give each -q some text")
    return paths, list(dict.fromkeys(asked))  # the same question twice is asked once


@run_command(default_max_new_tokens=64)
def ask(paths: PathsArg, question: QuestionOpt = None, questions: QuestionsFileOpt = None, *,
        run: RunOptions) -> None:
    """Ask questions about images: IMAGE... QUESTION, or IMAGE... -q Q1 -q Q2 (one record per question)."""
    from fuyu.pipeline import run_task
    from fuyu.records import Ask

    paths, asked = questions_from(paths, question, questions)
    run_task([Ask("ask", q) for q in asked], run.with_paths(paths))


def register(app: typer.Typer) -> None:
    app.command(epilog=EXAMPLES)(ask)
