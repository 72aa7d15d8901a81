"""The end of a run: every manifest row accounted for from ``metadata/``, ``_job.json``, the summary."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from evf.io import write_bytes
from evf.storage import Storage, display_url
from pipelines.commit import STATUSES, OutputLayout
from pipelines.metadata import Committed, load_committed

log = logging.getLogger("evf.run")

__all__ = ["JobSummary", "RunRecord", "format_summary", "summarize_run"]


@dataclass
class RunRecord:
    """What the driver knows of a run as it goes; the summary and ``_job.json`` are made from it."""

    run_id: str
    started: float
    manifest: str
    output: str
    model_id: str
    is_demo_model: bool
    input_rows: int = 0
    skipped: int = 0
    stale: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    reservations: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None


@dataclass
class JobSummary:
    """The outcome of ``run_job``.

    counts: committed rows per status over the whole manifest after this run (``ok``, ``empty``,
    ``error``); ``input_rows == ok + empty + error`` when ``missing == 0``. this_run: rows committed
    by this run per status. skipped: rows already committed before this run (resume). retryable:
    error rows whose cause was transient (a re-run retries them).
    """

    run_id: str
    manifest: str
    output: str
    model_id: str
    is_demo_model: bool
    input_rows: int
    counts: dict[str, int]
    missing: int
    this_run: dict[str, int]
    skipped: int
    stale: int
    elapsed_s: float
    retryable: int = 0
    reservations: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return self.counts.get("ok", 0)

    @property
    def empty(self) -> int:
        return self.counts.get("empty", 0)

    @property
    def error(self) -> int:
        return self.counts.get("error", 0)

    @property
    def processed(self) -> int:
        return sum(self.this_run.values())

    @property
    def rows_per_s(self) -> float:
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(self.output)

    @property
    def masks_uri(self) -> str:
        return self.layout.masks

    @property
    def metadata_uri(self) -> str:
        return self.layout.metadata

    @property
    def job_json_uri(self) -> str:
        return self.layout.job_json

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(rows_per_s=round(self.rows_per_s, 3), processed=self.processed)
        return data


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def summarize_run(
    record: RunRecord,
    manifest_ids: pa.ChunkedArray,
    committed: Committed,
    layout: OutputLayout,
    storage: Storage,
) -> JobSummary:
    """Account for every manifest row from ``metadata/`` (``committed`` if it cannot be read back),
    write ``_job.json``, return the summary."""
    elapsed = time.time() - record.started
    try:
        committed = load_committed(layout, storage.options(layout.metadata))
    except OSError as error:
        log.error("cannot read back metadata: %s", error)
    counts = committed.counts(manifest_ids)
    this_run = committed.counts(manifest_ids, run_id=record.run_id)
    missing = record.input_rows - sum(counts.values())
    summary = JobSummary(
        run_id=record.run_id,
        manifest=display_url(record.manifest),
        output=display_url(record.output),
        model_id=record.model_id,
        is_demo_model=record.is_demo_model,
        input_rows=record.input_rows,
        counts={s: counts.get(s, 0) for s in STATUSES},
        missing=missing,
        this_run={s: this_run.get(s, 0) for s in STATUSES},
        skipped=record.skipped,
        stale=record.stale,
        elapsed_s=elapsed,
        retryable=committed.retryable(manifest_ids),
        reservations=record.reservations,
    )
    failure = record.failure
    if failure is None and missing:
        failure = f"{missing} manifest row(s) have no metadata row after the run"
    payload = {
        "run_id": record.run_id,
        "status": "failed" if failure else "succeeded",
        "error": failure,
        "started_at": _utc(record.started),
        "finished_at": _utc(time.time()),
        "elapsed_s": round(elapsed, 3),
        "manifest": summary.manifest,
        "output": summary.output,
        "model": record.model or {"model_id": record.model_id},
        "counts": {
            "input_rows": record.input_rows,
            **summary.counts,
            "retryable": summary.retryable,
            "missing": missing,
        },
        "this_run": {
            **summary.this_run,
            "processed": summary.processed,
            "skipped_committed": record.skipped,
            "stale": record.stale,
        },
        "rows_per_s": round(summary.rows_per_s, 3),
        "resources": record.reservations,
        "outputs": {"masks": summary.masks_uri, "metadata": summary.metadata_uri},
        "config": record.config,
    }
    try:
        data = json.dumps(payload, indent=2, default=str).encode("utf-8")
        write_bytes(layout.job_json, data, storage.options(layout.job_json))
    except OSError as error:
        log.error("could not write %s: %s", layout.job_json, error)
    return summary


def format_summary(summary: JobSummary) -> str:
    """The end-of-job table (counts per status, throughput, output locations)."""
    width = 12
    lines = [
        f"evf run {summary.run_id}",
        f"  {'manifest':<{width}} {summary.manifest} ({summary.input_rows} rows)",
        f"  {'model':<{width}} {summary.model_id}{' (demo model)' if summary.is_demo_model else ''}",
        f"  {'status':<{width}} {'all rows':>9} {'this run':>9}",
    ]
    for status in STATUSES:
        lines.append(
            f"  {status:<{width}} {summary.counts.get(status, 0):>9} {summary.this_run.get(status, 0):>9}"
        )
    total = sum(summary.counts.values())
    lines.append(f"  {'total':<{width}} {total:>9} {summary.processed:>9}")
    if summary.skipped:
        lines.append(f"  {'resumed':<{width}} {summary.skipped} row(s) were already committed and skipped")
    if summary.missing:
        lines.append(f"  {'MISSING':<{width}} {summary.missing} row(s) have no metadata row")
    lines += [
        f"  {'time':<{width}} {summary.elapsed_s:.1f} s ({summary.rows_per_s:.2f} rows/s this run)",
        f"  {'masks':<{width}} {summary.masks_uri}/",
        f"  {'metadata':<{width}} {summary.metadata_uri}/",
        f"  {'job record':<{width}} {summary.job_json_uri}",
    ]
    return "\n".join(lines)
