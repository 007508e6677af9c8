"""The project's error type, lowest floor of the package: imported by every face, it imports nothing heavy.

:class:`UsageError` is bad input (a value, file or setting the run cannot use): the CLI prints it as one
line with exit code 2. :class:`usage_errors` turns a ValueError/OSError/ImportError raised inside it into
one; :func:`preview` keeps a bad value's repr short in a message.
"""

from __future__ import annotations

from typing import Any

__all__ = ["UsageError", "preview", "usage_errors"]

_FALSE_STRINGS = ("", "false", "no", "0", "none")
_TRUE_STRINGS = ("1", "true", "yes")


class UsageError(ValueError):
    """Bad input: a value, file or setting the run cannot use. Reported in one line, exit code 2."""


class usage_errors:
    """Turn ValueError/OSError/ImportError raised inside into :class:`UsageError` (bad input, not a bug)."""

    def __enter__(self) -> usage_errors:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if error is not None and not isinstance(error, UsageError) and isinstance(error, (ValueError, OSError,
                                                                                          ImportError)):
            raise UsageError(" ".join(str(error).split()) or type(error).__name__) from error
        return False


def preview(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to a short preview (nested or huge values, such as a YAML alias bomb, stay cheap)."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict = 2, 6, 6, 4
    short.maxstring = short.maxother = short.maxlong = limit
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
