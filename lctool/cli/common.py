"""What every command shares: the stderr console, result output, and option helpers.

Results go to stdout (a rich table, or one JSON object with --json); progress and logs to stderr.
"""

from __future__ import annotations

import json
import sys

from rich.console import Console

stderr = Console(stderr=True)
stdout = Console()


class State:
    """Global flags set by the top-level callback."""

    debug: bool = False
    quiet: bool = False


def log(message: str) -> None:
    if not State.quiet:
        stderr.print(message)


def emit_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def progress(transient: bool = True, disable: bool | None = None):
    """A rich progress bar on stderr; silent with --quiet or when stderr is not a terminal."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if disable is None:
        disable = State.quiet or not stderr.is_terminal
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=transient,
        disable=disable,
    )
