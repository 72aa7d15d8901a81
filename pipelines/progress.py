"""Progress of a run: rows committed per status, counted as every stage commits, shown on one line.

Rows are committed by three stages (invalid rows at read, unreadable images at decode, the rest at
finish), so each commit reports its statuses to one small actor, :class:`RunCounters`, which the
driver polls to draw a single job-level line (rows done / to do, ok / empty / error, rows/s, ETA).
The line is redrawn on a timer (:meth:`JobProgress.start`), not as the dataset's output arrives:
every second on a terminal, every 30 s in a log file, and once more, exactly, at the end or Ctrl-C.
The authoritative counts at the end come from the metadata itself (``evf.pipelines.summary``).
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
from collections import Counter
from typing import Any, TextIO

from tqdm.auto import tqdm

__all__ = ["JobProgress", "RunCounters", "start_counters"]

log = logging.getLogger(__name__)

TERMINAL_INTERVAL = 1.0  # seconds between redraws on a terminal
LOG_INTERVAL = 30.0  # and in a log file: a line a while
POLL_TIMEOUT = 5.0  # a poll of the counters that takes longer is skipped (a stuck actor never hangs)
FINAL_POLL_TIMEOUT = 10.0  # the last, exact poll at the end or at Ctrl-C


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


# Whether file descriptor 2 was a terminal when the job module was imported: while a job runs it is
# the pipe of ``evf.pipelines.native_stderr``, whose reader forwards to the original stderr.
_STDERR_WAS_TERMINAL = _isatty(2)


def _is_terminal(stream: TextIO) -> bool:
    """``stream`` is a terminal, or is file descriptor 2 piped (by the native-stderr filter) to
    what was a terminal."""
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return True
    try:
        fd = stream.fileno()
        return fd == 2 and _STDERR_WAS_TERMINAL and stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (AttributeError, OSError, ValueError):  # no descriptor (e.g. io.StringIO)
        return False


class RunCounters:
    """Ray actor: running totals of one run (``ok``, ``empty``, ``error``, ``stale``)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, counts: dict[str, int]) -> None:
        self.counts.update(counts)

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


def start_counters() -> Any:
    """A ``RunCounters`` actor for this run, on the driver's node (a worker node may go away
    mid-job; the driver's cannot without ending the run), reserving no CPU: it only adds numbers."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(RunCounters).remote()


class JobProgress:
    """The job-level progress line (``enabled=False``: counts only, nothing drawn), at most 80
    columns: ``evf run 1200/5000 rows | ok 1100 empty 60 error 40 | 12.3 rows/s | ETA 05:09``.

    :meth:`start` redraws it from the counters on a daemon thread, every ``TERMINAL_INTERVAL`` on a
    terminal and every ``LOG_INTERVAL`` otherwise, whatever the dataset's iterator does; :meth:`close`
    stops the thread, polls once more (the counts committed at the end or at Ctrl-C) and draws them."""

    def __init__(self, counters: Any, to_do: int, enabled: bool, file: TextIO | None = None) -> None:
        self.counters = counters
        self.enabled = enabled
        stream = file or sys.stderr
        self.interval = TERMINAL_INTERVAL if _is_terminal(stream) else LOG_INTERVAL
        self.bar = tqdm(
            total=to_do,
            unit="row",
            disable=not enabled,
            file=stream,
            ncols=80,
            mininterval=0,  # the timer decides when to draw
            miniters=1,
            bar_format="evf run {n}/{total} rows | {desc} | {rate_fmt} | ETA {remaining}",
        )
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()  # one poll-and-draw at a time; none after close()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        """Redraw the line on a timer until :meth:`close` (nothing to do when not enabled)."""
        if not self.enabled or self._thread is not None or self._closed:
            return
        self._thread = threading.Thread(target=self._redraw, name="evf-progress", daemon=True)
        self._thread.start()

    def _redraw(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.update(POLL_TIMEOUT, redraw=True)
            except Exception as error:  # the line is a courtesy: never let it end the run
                log.debug("progress line: %s", error)

    def update(self, timeout: float | None = FINAL_POLL_TIMEOUT, redraw: bool = False) -> dict[str, int]:
        """Poll the counters (at most ``timeout`` seconds: else the last counts) and draw them if they
        changed (``redraw``: in any case, e.g. for the elapsed time); returns the counts so far."""
        import ray

        try:
            counts = ray.get(self.counters.snapshot.remote(), timeout=timeout)
        except Exception as error:  # a stuck or gone actor, or Ray already shut down
            log.debug("progress line: the run's counters did not answer: %s", error)
            counts = None
        with self._lock:
            changed = (
                counts is not None
                and counts != self.counts
                # the counts only grow: a late answer to an older poll must not undo a newer one
                and sum(counts.values()) >= sum(self.counts.values())
            )
            if changed:
                self.counts = counts
            if not self._closed and (changed or redraw):
                self._draw(self.counts)
            return dict(self.counts)

    def _draw(self, counts: dict[str, int]) -> None:
        done = sum(counts.get(status, 0) for status in ("ok", "empty", "error"))
        self.bar.set_description_str(
            f"ok {counts.get('ok', 0)} empty {counts.get('empty', 0)} error {counts.get('error', 0)}",
            refresh=False,
        )
        if not self.bar.update(done - self.bar.n):  # no new rows: still redraw (elapsed, rate, ETA)
            self.bar.refresh()

    def close(self) -> None:
        """Stop the timer, draw the counts committed so far (one last poll) and end the line."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=POLL_TIMEOUT + 1.0)
        if self._closed:
            return
        if self.enabled:
            self.update()
        with self._lock:
            self._closed = True
            self.bar.close()
