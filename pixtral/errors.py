"""The one base class of every error a user can fix: bad files, bad options, unreadable images.

The CLI prints a `UserError` (and an `OSError`: permissions, a full disk) as one line and exits 2;
anything else is a bug, reported with the path of a saved traceback. Library code raises subclasses
that say which part of the input is at fault (ConfigError, WeightsError, ImageError, ...).
"""

from __future__ import annotations


class UserError(ValueError):
    """Input, options or files the user can fix; the message names the file/field and what was expected."""


class OptionError(UserError):
    """A command-line option (or the recipe field behind it) out of its accepted range."""


def check_range(option: str, value: object, low: float, high: float, kind: str = "an integer") -> None:
    """Raise OptionError naming `option` unless `value` is of `kind` (integer or number) in [low, high]."""
    integer = kind == "an integer"
    accepted = f"{kind} from {_number(low)} to {_number(high)}"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise OptionError(f"{option}: expected {accepted}, got {value!r}")
    if not low <= value <= high:
        raise OptionError(f"{option}: expected {accepted}, got {_number(value)}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def describe_os_error(err: OSError) -> str:
    """`PATH: reason` for an OSError (permissions, a full disk, a missing folder)."""
    reason = err.strerror or str(err)
    if err.filename is not None:
        target = f"{err.filename} -> {err.filename2}" if err.filename2 else str(err.filename)
        return f"{target}: {reason}"
    return reason
