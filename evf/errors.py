"""The base of every error that is the caller's to fix (not a bug, not a failed job).

Its message says what is wrong and the way out, in one line where it can. The command line prints
it as ``evf <command>: <message>`` and exits with status 2, without a traceback.
"""

from __future__ import annotations

__all__ = ["DeviceError", "UserError"]


class UserError(Exception):
    """Something the user asked for is invalid or unavailable (an argument, a config, a path...)."""


class DeviceError(UserError, RuntimeError):
    """The requested device does not exist here (e.g. ``cuda`` on a machine without a GPU)."""
