"""Progress of a run: rows committed per status, counted as every stage commits, shown on one line.

Rows are committed by three stages (invalid rows at read, unreadable images at decode, the rest at
finish), so each commit reports its statuses to one small actor, :class:`RunCounters`, which the
driver polls to draw a single job-level line (rows done / to do, ok / empty / error, rows/s, ETA).
The authoritative counts at the end come from the metadata itself (``evf.pipelines.summary``).
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any, TextIO

from tqdm.auto import tqdm

__all__ = ["JobProgress", "RunCounters", "start_counters"]


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
    columns: ``evf run 1200/5000 rows | ok 1100 empty 60 error 40 | 12.3 rows/s | ETA 05:09``."""

    def __init__(self, counters: Any, to_do: int, enabled: bool, file: TextIO | None = None) -> None:
        self.counters = counters
        self.bar = tqdm(
            total=to_do,
            unit="row",
            disable=not enabled,
            file=file or sys.stderr,
            ncols=80,
            mininterval=1.0 if (file or sys.stderr).isatty() else 30.0,  # a log file: a line a while
            bar_format="evf run {n}/{total} rows | {desc} | {rate_fmt} | ETA {remaining}",
        )

    def update(self) -> dict[str, int]:
        """Poll the counters and redraw; returns the counts so far."""
        import ray

        counts = ray.get(self.counters.snapshot.remote())
        done = sum(counts.get(status, 0) for status in ("ok", "empty", "error"))
        self.bar.set_description_str(
            f"ok {counts.get('ok', 0)} empty {counts.get('empty', 0)} error {counts.get('error', 0)}",
            refresh=False,
        )
        self.bar.update(done - self.bar.n)
        return counts

    def close(self) -> None:
        self.bar.close()
