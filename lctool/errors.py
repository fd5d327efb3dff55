"""The one exception type that means "the user's input is wrong".

Anything raised as `LctoolError` reaches the user as a single line `error: <message>` and exit
status 2, with nothing written. Every other exception is a bug or an environment failure (exit 1).
"""


class LctoolError(Exception):
    """Bad input: missing or corrupt files, unsupported models, out-of-range options."""

    exit_code = 2


def check(condition: bool, message: str) -> None:
    """Raise `LctoolError(message)` unless `condition` holds."""
    if not condition:
        raise LctoolError(message)


def validation_message(error) -> str:
    """One line from a pydantic ValidationError: the first problem, naming the option."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "options"
    more = len(error.errors()) - 1
    return f"{where}: {first.get('msg')}" + (f" (and {more} more)" if more else "")
