"""The base of every error that is the caller's to fix (not a bug, not a failed job).

Its message says what is wrong and the way out, in one line where it can. The command line prints
it as ``evf <command>: <message>`` and exits with status 2, without a traceback.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

__all__ = ["DeviceError", "UserError", "did_you_mean", "error_kind", "error_text", "unknown_name"]

_EXCEPTION_NAME = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Warning|Exit)")


class UserError(Exception):
    """Something the user asked for is invalid or unavailable (an argument, a config, a path...)."""


class DeviceError(UserError, RuntimeError):
    """The requested device does not exist here (e.g. ``cuda`` on a machine without a GPU)."""


def error_text(error: BaseException, where: str) -> str:
    """A request's error message: ``"<where>: <ExceptionType>: <message>"`` (the type only when the
    message does not already name it). The job's error rows and a server's error responses use it."""
    text = str(error) or type(error).__name__
    if not isinstance(error, OSError | ValueError) or type(error).__name__ not in text:
        text = f"{type(error).__name__}: {text}" if str(error) else type(error).__name__
    return f"{where}: {text}"


def error_kind(message: str) -> str:
    """The kind of an error text: its first ``": "``-separated part, plus the exception name when
    one follows (``"image read failed: ImageReadError: ..."`` -> ``"image read failed: ImageReadError"``)."""
    parts = message.split(": ")
    if len(parts) > 1 and _EXCEPTION_NAME.fullmatch(parts[1]):
        return f"{parts[0]}: {parts[1]}"
    return parts[0].strip()[:120]


def did_you_mean(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to a misspelt ``name`` (``batchsize`` -> ``batch_size``), if any is close."""
    known = list(known)
    lowered = {k.lower().replace("-", "_"): k for k in known}
    found = difflib.get_close_matches(name.lower().replace("-", "_"), list(lowered), n=1, cutoff=0.6)
    return lowered[found[0]] if found else None


def unknown_name(name: str, known: Iterable[str], what: str = "field") -> str:
    """``"unknown field; did you mean 'batch_size'?"``, or the allowed names when none is close
    (``"unknown field; allowed fields: a, b"``)."""
    known = list(known)
    close = did_you_mean(name, known)
    if close is not None:
        return f"unknown {what}; did you mean {close!r}?"
    return f"unknown {what}; allowed {what}s: {', '.join(known)}"
