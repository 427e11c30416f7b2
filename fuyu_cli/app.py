"""The `fuyu` command: registers one module per subcommand; `main()` is the single error boundary.

Nothing imported here touches torch, fuyu.model or fuyu.preprocess, so `fuyu --help` stays instant.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
import warnings
from typing import Annotated

import typer
from typer.core import TyperArgument, TyperOption

from fuyu import __version__
from fuyu.commands import ask, bbox, benchmark, caption, convert
from fuyu.errors import INTERNAL, INTERRUPTED, OK, TERMINATED, USAGE, StdoutClosed, explain, one_line

# `fuyu convert` and `fuyu benchmark` plug in here, one module each under fuyu_cli/commands/.
COMMANDS = (caption, ask, bbox, benchmark, convert)

app = typer.Typer(
    name="fuyu",
    help="Run Adept's Fuyu-8B locally: caption screenshots and documents, ask about them, "
         "locate text.\n\nData goes to stdout (JSON lines), progress and errors to stderr. "
         "Exit code 0: all done; 1: some items failed; 2: usage error or unusable model; "
         "3: the output cannot be written; 130: interrupted.",
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
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True, metavar="",
                                          help="Show the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", envvar="FUYU_DEBUG", metavar="",
                                        help="Show full tracebacks on errors.")] = False,
) -> None:
    global _debug
    _debug = debug


for _command in COMMANDS:
    _command.register(app)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (finished records kept) but with its own exit code."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> None:
    """Entry point: exit 0 all done, 1 some items failed, 2 usage error or unusable model,
    3 output not writable, 130 Ctrl-C, 143 SIGTERM, 141 stdout closed (| head)."""
    from fuyu import threads

    threads.before_torch()  # thread settings that must precede torch's import
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        with _one_line_warnings():
            code = _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    sys.exit(code)


def _run(argv) -> int:
    command = typer.main.get_command(app)
    _blank_flag_metavars(command)
    try:
        rv = command.main(args=argv, prog_name="fuyu", standalone_mode=False)
        return rv if isinstance(rv, int) else OK
    except StdoutClosed:
        return _stdout_closed()
    except _Terminated:
        return TERMINATED
    except KeyboardInterrupt:
        return INTERRUPTED
    except typer.Abort:  # EOF at a prompt
        return INTERRUPTED
    except typer.TyperException as e:  # click's usage errors: one line, as every error
        from fuyu.render import error_line, stderr_console

        ctx = getattr(e, "ctx", None)
        where = f"{ctx.command_path} --help" if ctx is not None else "fuyu --help"
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        error_line(stderr_console(), message, f"see {where}")
        return getattr(e, "exit_code", USAGE)
    except Exception as exc:
        return report(exc)


def report(exc: BaseException) -> int:
    """One line `error: what — what to do` on stderr (plus the traceback with --debug); the exit code."""
    from fuyu.render import error_line, stderr_console

    debug = _debug or os.environ.get("FUYU_DEBUG", "") not in ("", "0")
    if debug:
        traceback.print_exception(exc)
    known = explain(exc)
    if known is None:
        hint = "this is a bug in fuyu: please report it with the output of --debug" if not debug else ""
        known = (f"unexpected {type(exc).__name__}: {exc}", hint, INTERNAL)
    message, hint, code = known
    error_line(stderr_console(), message, hint)
    return code


def _stdout_closed() -> int:
    """The reader of stdout went away (`fuyu … | head -1`): stop quietly with the shell's usual
    status for a writer killed by SIGPIPE, and keep the interpreter from complaining on exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 128 + signal.SIGPIPE


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _blank_flag_metavars(command) -> None:
    """--help shows readable metavars: nothing after on/off options (not '<bool>'), and an
    argument's own name rather than its Python type ('<list[str]>')."""
    for param in command.params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
        elif isinstance(param, TyperArgument):
            param.display_type_rich = lambda ctx: None  # its name already says what it is
    make_help = command.get_help_option

    def get_help_option(ctx):
        option = make_help(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = get_help_option
    for sub in getattr(command, "commands", {}).values():
        _blank_flag_metavars(sub)


class _OneLine(logging.Handler):
    """Third-party log records at WARNING and above become one `warning:` line of ours."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from fuyu.render import warning_line

            warning_line(one_line(record.getMessage(), first=True) or record.name)
        except Exception:  # a broken stderr must not break the run
            pass


# Notices about optional accelerations that change nothing for the user.
_DROPPED_LOGS = ("Failed to load CPU gemm_4bit_forward",)


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_DROPPED_LOGS)


class _one_line_warnings:
    """While running: Python warnings and library log warnings print as one `warning: …` line
    each (no source lines, no library prefixes); known harmless notices are dropped."""

    def __enter__(self):
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._show
        self._handler = _OneLine(logging.WARNING)
        self._handler.addFilter(_DropNotices())
        logging.getLogger().addHandler(self._handler)  # fuyu is the application: logs are ours to show
        return self

    def __exit__(self, *exc):
        warnings.showwarning = self._showwarning
        logging.getLogger().removeHandler(self._handler)
        return False

    @staticmethod
    def _show(message, category, filename, lineno, file=None, line=None):
        from fuyu.render import warning_line

        warning_line(one_line(message, first=True) or category.__name__)
