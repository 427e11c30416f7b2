"""The `fuyu` command: registers one module per subcommand; `main()` is the single error boundary.

Nothing imported here touches torch, model/ or preprocess/, so `fuyu --help` stays instant.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated

import typer

from fuyu import __version__
from fuyu.commands import ask, bbox, benchmark, caption, convert
from fuyu.errors import explain

# `fuyu convert` and `fuyu benchmark` plug in here, one module each under fuyu_cli/commands/.
COMMANDS = (caption, ask, bbox, benchmark, convert)

app = typer.Typer(
    name="fuyu",
    help="Run Adept's Fuyu-8B locally: caption screenshots and documents, ask about them, "
         "locate text.\n\nData goes to stdout (JSON lines), progress and errors to stderr. "
         "Exit code 0: all done; 1: some images failed; 2: usage error or unusable model.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,  # locals hold multi-GB tensors; main() reports errors
    context_settings={"help_option_names": ["-h", "--help"]},
)

_debug = False


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"fuyu {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", envvar="FUYU_DEBUG",
                                        help="Show full tracebacks on errors.")] = False,
) -> None:
    global _debug
    _debug = debug


for _command in COMMANDS:
    _command.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: exit 0 all done, 1 some items failed, 2 usage error or unusable model, 130 Ctrl-C."""
    try:
        typer.main.get_command(app).main(args=argv, prog_name="fuyu")
    except Exception as exc:
        sys.exit(report(exc))


def report(exc: Exception) -> int:
    """One line `error: what — what to do` on stderr (plus the traceback with --debug); the exit code."""
    from fuyu.render import error_line, stderr_console

    debug = _debug or os.environ.get("FUYU_DEBUG", "") not in ("", "0")
    if debug:
        traceback.print_exception(exc)
    known = explain(exc)
    if known is None:
        hint = "" if debug else "rerun with --debug for the traceback"
        known = (f"unexpected {type(exc).__name__}: {exc}", hint, 1)
    message, hint, code = known
    error_line(stderr_console(), message, hint)
    return code
