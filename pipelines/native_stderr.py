"""Known notes that Ray's C++ core writes straight to the driver's stderr, kept from the user.

Ray Data starts its model actors with their arguments in the object store and unlimited restarts,
and Ray's core worker then writes a line about it to file descriptor 2 on every run (see
ray-project/ray#53727): it is about Ray Data's own arguments, nothing a user of the job can act on.
Python's logging never sees it, and ``RAY_BACKEND_LOG_LEVEL`` would only swap it for a line per
Ray process saying that the level was set. So, while a job runs, file descriptor 2 is a pipe
whose reader forwards everything except lines matching ``_NOISE``; Python's own writes to stderr
(the progress line, log records) pass through it unchanged and at once.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["filtered_native_stderr"]

# A C++ log line: "[2026-12-07 01:19:25,723 E 1895 1895] core_worker.cc:2465: Actor with ..."
_NOISE = re.compile(
    rb"\[\d{4}-\d\d-\d\d [\d:,]+ [A-Z] \d+ \d+\] core_worker\.cc:\d+: Actor with class name: "
    rb"[^\n]*has constructor arguments in the object store[^\n]*\n"
)
_LOG_LINE_START = re.compile(rb"\[\d{4}-")  # where a C++ log line may begin


@contextmanager
def filtered_native_stderr() -> Iterator[None]:
    """File descriptor 2 filtered of ``_NOISE`` for the duration (restored after, all forwarded).
    Enter it after Ray has started its processes, so that none of them holds the pipe."""
    sys.stderr.flush()
    try:
        original = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep clean
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    reader = threading.Thread(target=_forward, args=(read_end, original), daemon=True)
    reader.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # the pipe's last writer closes: the reader reads to its end
        reader.join(timeout=2)
        os.close(original)


def _forward(source: int, sink: int) -> None:
    """Copy ``source`` to ``sink`` without ``_NOISE``. Text that may be the start of a C++ log line
    waits for its newline; anything else (the progress line's carriage-return updates) goes on at once."""
    pending = b""
    while chunk := os.read(source, 65536):
        pending = _NOISE.sub(b"", pending + chunk)
        start = _held_from(pending)
        if start:
            os.write(sink, pending[:start])
        pending = pending[start:]
    os.write(sink, _NOISE.sub(b"", pending))
    os.close(source)


def _held_from(data: bytes) -> int:
    """Where the part to hold back begins: an unfinished last line that is or may become a log line."""
    match = _LOG_LINE_START.search(data, data.rfind(b"\n") + 1)
    if match:
        return match.start()
    if data.endswith((b"[", b"[2", b"[20", b"[202")):
        return data.rfind(b"[")
    return len(data)
