"""The `lctool` command: a thin typer shell over the operations in lctool.ops/quant/prune/merge.

Exit codes: 0 success, 1 failure during work, 2 bad input or usage, 130 interrupted.
"""

from __future__ import annotations

import importlib
import importlib.util
import signal
import sys
import traceback

import typer
from pydantic import ValidationError
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer >= 0.26 ships its own click

from lctool import __version__
from lctool.cli.common import State, stderr
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
    State.debug = debug
    State.quiet = quiet


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        module_name = f"lctool.cli.{name}"
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).register(app)


_register_commands()


def _terminate(signum, frame):
    # SIGTERM becomes the same clean unwinding as Ctrl-C: writers remove their temp folders.
    raise KeyboardInterrupt


def run(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    State.debug = "--debug" in args
    signal.signal(signal.SIGTERM, _terminate)
    command = typer.main.get_command(app)
    try:
        # Non-standalone click returns (not raises) the code of typer's Exit, e.g. 130 for Ctrl-C.
        result = command.main(args=args, prog_name="lctool", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except LctoolError as e:
        if State.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"error: {validation_message(e)}", file=sys.stderr)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else "", file=sys.stderr)
        return 2
    except ClickException as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        return 2
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line unless --debug
        if State.debug:
            traceback.print_exc()
        else:
            stderr.print("[dim](run with --debug for the traceback)[/dim]")
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
