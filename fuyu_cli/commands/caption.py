"""`fuyu caption`: one caption per image or page, with the model card's prompt unless --prompt is given."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from fuyu.options import PathsArg, RunOptions, run_command

EXAMPLES = """[b]Examples[/b]

  fuyu caption shot.png
  fuyu caption shots/ --recursive --output captions.jsonl    [dim]# rerun to resume[/dim]
  fuyu caption 'scans/*.jpg' --format csv > captions.csv
  find . -name '*.png' -print0 | fuyu caption - --null --sidecar
  fuyu caption report.pdf --pages 1-3                        [dim]# one record per page[/dim]
  fuyu caption shot.png --prompt 'Describe the user interface.'
"""

PromptOpt = Annotated[Optional[str], typer.Option(
    "--prompt", "-p", metavar="TEXT", show_default=False,
    help="Instead of the model card's 'Generate a coco-style caption.' (a newline is added).")]


@run_command(default_max_new_tokens=64)
def caption(paths: PathsArg, prompt: PromptOpt = None, *, run: RunOptions) -> None:
    """Caption images and pages: one JSON line each on stdout."""
    from fuyu.pipeline import run_task
    from fuyu.records import Ask

    run_task([Ask("caption", prompt)], run)


def register(app: typer.Typer) -> None:
    app.command(epilog=EXAMPLES)(caption)
