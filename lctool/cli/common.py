"""What every command shares: output conventions, the YAML recipe, device/dtype options, tables.

`conventions(command)` is applied by main.py to every registered command (sub-commands too), so a
command module only declares its own options and ends with `emit(result, render)`:

- results on stdout: `render(result)` as rich tables, or exactly one JSON object with `--json`;
  anything else a command or a library prints goes to stderr (nowhere with `--quiet`);
- `--config FILE`: options from a YAML recipe, fed through the same click types and pydantic models
  as the flags; flags given explicitly win; an unknown key is a one-line usage error (exit 2);
- `--quiet` / `--debug` work after the command name too (`lctool eval M --quiet`);
- `$LCTOOL_CACHE` is checked once, the same way, before any command runs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import typer
from rich.console import Console
from typer._click.core import Context, Parameter
from typer._click.exceptions import BadParameter, UsageError

from lctool.devices import DTYPES


class State:
    """Per-invocation flags: set by the top-level callback and by `conventions`."""

    debug: bool = False
    quiet: bool = False
    json: bool = False
    emitted: bool = False
    results_stream = None  # stdout as it was when the command started

    @classmethod
    def reset(cls) -> None:
        cls.debug = cls.quiet = cls.json = cls.emitted = False
        cls.results_stream = None


class _ResultStream:
    """The stream results go to: the command's original stdout; stderr in --json mode (only the
    JSON object may reach stdout)."""

    def _target(self):
        if State.json:
            return sys.stderr
        return State.results_stream or sys.stdout

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return self._target().isatty()

    def fileno(self) -> int:
        return self._target().fileno()


stderr = Console(stderr=True)
stdout = Console(file=_ResultStream())


def log(message: str) -> None:
    if not State.quiet:
        stderr.print(message)


# ---- results ---------------------------------------------------------------------------------------
def emit(result: dict, render: Callable[[dict], Any] | None = None) -> None:
    """A command's result, once: one JSON object with --json, else `render(result)` on stdout.

    `render` returns a rich renderable, a string (printed verbatim), or a list of them; by default a
    key/value table.
    """
    if State.emitted:
        raise RuntimeError("a command emitted two results")  # a bug: --json promises one object
    State.emitted = True
    if State.json:
        _write_json(result)
        return
    shown = render(result) if render else kv_table(None, result.items())
    for item in shown if isinstance(shown, list | tuple) else [shown]:
        if isinstance(item, str):  # verbatim: no markup, highlighting or wrapping (paths for $(...))
            stdout.file.write(item + "\n")
            stdout.file.flush()
        else:
            stdout.print(item)


def emit_error(message: str, exit_code: int) -> None:
    """In --json mode a failed command still prints one object, so scripts can always parse stdout."""
    if State.json and not State.emitted:
        State.emitted = True
        _write_json({"error": message, "exit_code": exit_code})


def _write_json(obj: object) -> None:
    stream = State.results_stream or sys.stdout
    stream.write(json.dumps(obj, indent=2, default=str) + "\n")
    stream.flush()


def kv_table(title: str | None, rows: Iterable[tuple[str, Any]]):
    """A two-column table: bold keys, plain values (None shown as '-')."""
    from rich.table import Table

    table = Table(title=_title(title), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(_plain(key), _plain(value))
    return table


def grid_table(title: str | None, columns: Iterable[str], rows: Iterable[Iterable[Any]],
               left: Iterable[str] = ()):
    """A table with a header row; columns are right-aligned (numbers) except those named in `left`."""
    from rich.table import Table

    left = set(left)
    table = Table(title=_title(title), title_justify="left")
    for column in columns:
        table.add_column(_plain(column), justify="left" if column in left else "right")
    for row in rows:
        table.add_row(*(_plain(cell) for cell in row))
    return table


def _plain(value: Any):
    """Text as given (brackets in paths or values are not rich markup); an empty cell shows '-'."""
    from rich.text import Text

    return Text("-" if value is None else str(value))


def _title(title: str | None):
    from rich.text import Text

    return None if title is None else Text(title)


def progress(transient: bool = True, disable: bool | None = None):
    """A rich progress bar on stderr; silent with --quiet, --json or when stderr is not a terminal."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if disable is None:
        disable = State.quiet or State.json or not stderr.is_terminal
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


# ---- device and dtype: one spelling, one validation, wherever a command has them --------------------
# The rules live in lctool.devices (the Python API's option models use them too); here they become click
# callbacks, so a bad value is a usage error (exit 2) before the command starts.


def check_device(name: str) -> str:
    """cpu, cuda, cuda:N or mps, and present on this machine."""
    from lctool.devices import check_device as resolve
    from lctool.errors import LctoolError

    try:
        return resolve(name)
    except LctoolError as e:
        raise BadParameter(str(e)) from None


def check_dtype(name: str | None, allowed: Iterable[str] = DTYPES) -> str | None:
    from lctool.devices import check_dtype as resolve
    from lctool.errors import LctoolError

    try:
        return resolve(name, allowed)
    except LctoolError as e:
        raise BadParameter(str(e)) from None


DEVICE_HELP = "Torch device: auto (default: cuda when present, else cpu), cpu, cuda, cuda:N or mps."


def device_option(default: str | None = "cpu", help: str = DEVICE_HELP):
    return typer.Option(default, "--device", help=help, callback=lambda value: value and check_device(value))


def dtype_option(default: str | None, help: str, allowed: Iterable[str] = DTYPES, flag: str = "--dtype"):
    allowed = tuple(allowed)
    return typer.Option(default, flag, help=f"{help} ({', '.join(allowed)}).",
                        callback=lambda value: check_dtype(value, allowed))


# ---- the YAML recipe ---------------------------------------------------------------------------------
def _is_option(param: Parameter) -> bool:
    return param.param_type_name == "option"


def _options_by_key(command) -> dict[str, tuple[Parameter, bool]]:
    """Every spelling a recipe key may use -> (option, whether it is the negative flag of a pair)."""
    keys: dict[str, tuple[Parameter, bool]] = {}
    for param in command.params:
        if not _is_option(param) or param.name in _OWN_PARAMS:
            continue
        keys[param.name] = (param, False)
        for flag in param.opts:
            if flag.startswith("--"):
                keys[flag[2:]] = (param, False)
                keys[flag[2:].replace("-", "_")] = (param, False)
        for flag in param.secondary_opts:
            if flag.startswith("--"):
                keys[flag[2:]] = (param, True)
                keys[flag[2:].replace("-", "_")] = (param, True)
    return keys


def _recipe_value(param: Parameter, value: Any, key: str, negative: bool, path: str) -> Any:
    if negative:
        if not isinstance(value, bool):
            raise UsageError(f"{path}: {key} takes true or false")
        return not value
    if param.multiple:
        return value if isinstance(value, list) else [value]
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return ",".join(str(v) for v in value)  # comma-list options (--lengths 256,1024)
    if isinstance(value, dict | list):
        raise UsageError(f"{path}: {key} takes a single value")
    return value


def load_recipe(ctx: Context, path: str) -> dict[str, Any]:
    """The recipe's options as click's default_map: below flags given explicitly, above defaults."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"--config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        raise UsageError(f"--config {path}: not valid YAML{line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of option: value")
    keys = _options_by_key(ctx.command)
    arguments = {p.name for p in ctx.command.params if not _is_option(p)}
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        if key in arguments or key.replace("-", "_") in arguments:
            raise UsageError(f"--config {path}: {key} is an argument; give it on the command line")
        if key not in keys:
            raise UsageError(f"--config {path}: unknown option {key!r} for {ctx.command_path}")
        param, negative = keys[key]
        if param.name in defaults:
            raise UsageError(f"--config {path}: {key} is given twice")
        if value is not None:
            defaults[param.name] = _recipe_value(param, value, key, negative, path)
    return defaults


def _config_callback(ctx: typer.Context, value: str | None) -> str | None:
    if value:
        ctx.default_map = {**(ctx.default_map or {}), **load_recipe(ctx, value)}
    return value


# ---- the wrapper main.py applies to every command ------------------------------------------------------
_OWN_PARAMS = ("lctool_config", "lctool_quiet", "lctool_debug")
_EXTRA_PARAMS = {
    "lctool_config": (str, typer.Option(
        None, "--config", metavar="FILE", is_eager=True, callback=_config_callback,
        help="Read options from a YAML recipe (keys are option names); flags given here win.")),
    "lctool_quiet": (bool, typer.Option(False, "--quiet", "-q", help="No progress or logs on stderr.")),
    "lctool_debug": (bool, typer.Option(False, "--debug", help="Show tracebacks on errors.")),
}
_JSON_PARAM = (bool, typer.Option(False, "--json", help="Exactly one JSON object on stdout (an error too)."))


def check_cache_env() -> None:
    """$LCTOOL_CACHE, when set, must be a folder (or creatable): checked once for every command."""
    from lctool.errors import LctoolError
    from lctool.io.cache import cache_root

    configured = os.environ.get("LCTOOL_CACHE")
    if not configured:
        return
    path = cache_root()
    if os.path.exists(path) and not os.path.isdir(path):
        raise LctoolError(f"LCTOOL_CACHE={configured} is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise LctoolError(f"LCTOOL_CACHE={configured}: {e.strerror or e}") from None


# Read by huggingface_hub and transformers when they are imported (later in the command, usually).
_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


@contextlib.contextmanager
def _library_output():
    """--quiet: library progress bars, warnings and logs below errors off for the command;
    --debug: lctool's own debug log on stderr."""
    saved_env = {key: os.environ.get(key) for key in _QUIET_ENV}
    hf_logging = sys.modules.get("transformers.utils.logging")
    bars_were_on = bool(hf_logging and hf_logging.is_progress_bar_enabled())
    lctool_logger = logging.getLogger("lctool")
    handler = logging.StreamHandler(sys.stderr) if State.debug else None
    if handler:
        lctool_logger.addHandler(handler)
        lctool_logger.setLevel(logging.DEBUG)
    with warnings.catch_warnings():
        if State.quiet:
            os.environ.update(_QUIET_ENV)
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            if hf_logging:
                hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if State.quiet:
                logging.disable(logging.NOTSET)
                for key, value in saved_env.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
                if bars_were_on:
                    hf_logging.enable_progress_bar()
            if handler:
                lctool_logger.removeHandler(handler)
                lctool_logger.setLevel(logging.NOTSET)


def conventions(command: Callable) -> Callable:
    """Wrap a typer command with the shared options and output rules (see the module docstring)."""
    signature = inspect.signature(command, eval_str=True)
    owns_json = "as_json" in signature.parameters  # older commands declare --json themselves
    extras = dict(_EXTRA_PARAMS) if owns_json else {**_EXTRA_PARAMS, "as_json": _JSON_PARAM}

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        kwargs.pop("lctool_config", None)
        State.quiet = kwargs.pop("lctool_quiet", False) or State.quiet
        State.debug = kwargs.pop("lctool_debug", False) or State.debug
        State.json = bool(kwargs["as_json"] if owns_json else kwargs.pop("as_json", False))
        check_cache_env()
        State.results_stream = sys.stdout
        stray = open(os.devnull, "w") if State.quiet else sys.stderr  # noqa: SIM115 - closed below
        try:
            with _library_output(), contextlib.redirect_stdout(stray):
                return command(*args, **kwargs)
        except KeyboardInterrupt:
            raise typer.Abort() from None  # click would turn it into a silent exit 130; main.py says so
        finally:
            if stray is not sys.stderr:
                stray.close()

    parameters = list(signature.parameters.values())
    for name, (annotation, default) in extras.items():
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotation))
    wrapper.__signature__ = signature.replace(parameters=parameters)
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    wrapper.lctool_conventions = True
    return wrapper


def apply_conventions(app: typer.Typer) -> None:
    """Wrap every command of `app` and of its sub-apps (vocab expand, testbed build, ...)."""
    for info in app.registered_commands:
        if info.callback and not getattr(info.callback, "lctool_conventions", False):
            info.callback = conventions(info.callback)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            apply_conventions(group.typer_instance)
