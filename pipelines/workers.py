"""What every stage's task or actor shares: threaded I/O with per-item errors, error text, memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

Item = TypeVar("Item")
_EXCEPTION_NAME = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Warning|Exit)")

__all__ = ["error_kind", "error_text", "map_threads", "release_memory"]


def map_threads(function: Callable[[Item], Any], items: Sequence[Item], threads: int) -> list[Any]:
    """``[function(item)]`` with up to ``threads`` at once; an exception is returned, not raised,
    so that the caller can turn it into that item's row error."""

    def safe(item: Item) -> Any:
        try:
            return function(item)
        except Exception as error:  # reported per row by the caller
            return error

    if threads <= 1 or len(items) <= 1:
        return [safe(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(safe, items))


def error_text(error: BaseException, where: str) -> str:
    """A row's error message: ``"<where>: <ExceptionType>: <message>"`` (the type only when the
    message does not already name it)."""
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


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc only; a no-op elsewhere).

    Batches of varying image sizes fragment glibc's heap; without this a long-running worker's
    resident memory creeps up with the number of batches it has seen.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
