"""What every stage's task or actor shares: threaded I/O with per-item errors, memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

Item = TypeVar("Item")

__all__ = ["map_threads", "release_memory"]


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
