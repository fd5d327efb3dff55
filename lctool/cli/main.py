"""The `lctool` command: a thin typer shell over the operations in lctool.ops/quant/prune/merge.

Exit codes (docs/cli.md): 0 success; 1 failure during work (a bug or the environment: disk, memory,
a library error); 2 bad input or usage (one line `error: ...`, nothing written); 130 interrupted
(SIGINT, SIGTERM). `--debug` adds the traceback; with `--json` a failure also prints
{"error": ..., "exit_code": ...} on stdout.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import os
import signal
import sys
import traceback

import typer
from pydantic import ValidationError
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer >= 0.26 ships its own click

from lctool import __version__
from lctool.cli.common import State, apply_conventions, emit_error, stderr
from lctool.errors import LctoolError, validation_message

app = typer.Typer(
    name="lctool",
    help="Adapt and compress open transformer language models: checkpoint in, checkpoint out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each command lives in lctool/cli/<name>.py and exposes register(app).
COMMAND_MODULES = ("inspect", "testbed", "eval", "extend", "finetune", "quantize", "prune", "merge", "vocab")


def _version(value: bool) -> None:
    if value:
        print(f"lctool {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or logs on stderr."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    State.debug = debug or State.debug
    State.quiet = quiet or State.quiet


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        module_name = f"lctool.cli.{name}"
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).register(app)
    apply_conventions(app)  # --json, --config, --quiet/--debug and the stdout/stderr split, everywhere


_register_commands()


def _terminate(signum, frame):
    # SIGTERM becomes the same clean unwinding as Ctrl-C: writers remove their temp folders.
    raise KeyboardInterrupt


def run(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    State.reset()
    State.debug = "--debug" in args
    State.json = "--json" in args  # until the command itself knows (usage errors come before it)
    signal.signal(signal.SIGTERM, _terminate)
    command = typer.main.get_command(app)
    try:
        # Non-standalone click returns (not raises) the code of typer's Exit, e.g. 130 for Ctrl-C.
        result = command.main(args=args, prog_name="lctool", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else "", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 1
    except BaseException as e:  # noqa: BLE001 - the last line of defence: one line unless --debug
        if isinstance(e, SystemExit | GeneratorExit):
            raise
        message, code = _failure(e)
        message = _one_line(message)
        if State.debug and code != 130:
            traceback.print_exc()
        elif code == 1 and not _out_of_space(e):
            stderr.print("[dim](run with --debug for the traceback)[/dim]")
        print(f"error: {message}", file=sys.stderr)
        emit_error(message, code)
        return code


def _one_line(message: str) -> str:
    """Messages quote user input (a YAML key, a file name); newlines or other control characters in it
    must not break the one-line `error:` contract, so they are shown escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)


_SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _out_of_space(error: BaseException) -> bool:
    """A full disk or quota, or a file-size limit: the environment failed, not lctool (writers clean up).
    Libraries with native writers (safetensors) report it only in their message: "(os error 28)"."""
    if isinstance(error, OSError):
        return error.errno in _SPACE_ERRNOS
    return any(f"(os error {number})" in str(error) for number in _SPACE_ERRNOS)


def _failure(error: BaseException) -> tuple[str, int]:
    """The one-line message and exit code of an exception."""
    if _out_of_space(error):
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        why = error.strerror if isinstance(error, OSError) else os.strerror(
            next(n for n in _SPACE_ERRNOS if f"(os error {n})" in str(error)))
        return f"out of disk space{where}: {why}; no output was written", 1
    if isinstance(error, LctoolError):
        return str(error), 2
    if isinstance(error, ValidationError):
        return validation_message(error), 2
    if isinstance(error, ClickException):
        return error.format_message(), 2
    if isinstance(error, typer.Abort | KeyboardInterrupt):
        return "interrupted", 130
    return f"{type(error).__name__}: {error}", 1


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
