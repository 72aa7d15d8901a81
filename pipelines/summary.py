"""The end of a run: every manifest row accounted for from ``metadata/``, ``_job.json``, the summary."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from evf.errors import error_kind
from evf.io import write_bytes
from evf.pipelines.commit import OutputLayout
from evf.pipelines.metadata import ACCOUNTING_COLUMNS, Committed, load_committed
from evf.result import STATUSES
from evf.storage import Storage, display_url

log = logging.getLogger("evf.run")

__all__ = ["ErrorKind", "JobSummary", "RunRecord", "error_kinds", "format_summary", "summarize_run"]


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
    model_rows: int = 0
    model_rows_by_node: dict[str, int] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    reservations: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None


@dataclass
class ErrorKind:
    """The error rows of one kind (``evf.pipelines.workers.error_kind``): how many, the first few ids."""

    kind: str
    rows: int
    first_ids: list[str]
    retryable: bool


def error_kinds(errors: pa.Table, shown: int = 3) -> list[ErrorKind]:
    """Error rows (``id``, ``error``, ``retryable``) grouped by kind, most frequent first."""
    kinds: dict[tuple[str, bool], ErrorKind] = {}
    for row_id, message, retryable in zip(
        *(errors.column(c).to_pylist() for c in ("id", "error", "retryable")), strict=True
    ):
        flag = bool(retryable)
        entry = kinds.setdefault(
            (error_kind(message or ""), flag), ErrorKind(error_kind(message or ""), 0, [], flag)
        )
        entry.rows += 1
        if len(entry.first_ids) < shown:
            entry.first_ids.append(row_id)
    return sorted(kinds.values(), key=lambda k: -k.rows)


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
    error_kinds: list[ErrorKind] = field(default_factory=list)
    reservations: dict[str, Any] = field(default_factory=dict)
    overlays: bool = False  # the run wrote overlays/ beside masks/

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
        return OutputLayout(self.output, overlays=self.overlays)

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
        committed = load_committed(layout, storage.options(layout.metadata), ACCOUNTING_COLUMNS)
    except OSError as error:
        log.error("cannot read back metadata: %s", error)
    committed = committed.of(manifest_ids)  # rows of ids no longer in the manifest do not count
    counts = committed.counts()
    errors = committed.table
    if "error" in errors.column_names:
        errors = errors.filter(pc.equal(errors.column("status"), "error"))
    this_run = committed.counts(run_id=record.run_id)
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
        retryable=committed.retryable(),
        error_kinds=error_kinds(errors) if "error" in errors.column_names else [],
        reservations=record.reservations,
        overlays=layout.overlays,
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
            "rows_through_model": record.model_rows,
            "model_rows_by_node": record.model_rows_by_node,
        },
        "rows_per_s": round(summary.rows_per_s, 3),
        "error_kinds": [asdict(kind) for kind in summary.error_kinds],
        "resources": record.reservations,
        "outputs": {
            "masks": summary.layout.masks,
            "metadata": summary.layout.metadata,
            **({"overlays": summary.layout.overlay_folder} if summary.layout.overlays else {}),
        },
        "config": record.config,
    }
    data = json.dumps(payload, indent=2, default=str).encode("utf-8")
    for uri in (layout.run_json(record.run_id), layout.job_json):  # the history first, then the latest
        try:
            write_bytes(uri, data, storage.options(uri), storage.retry)
        except OSError as error:
            log.error("could not write %s: %s", uri, error)
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
    if summary.retryable:
        lines.append(
            f"  {'retryable':<{width}} {summary.retryable} error row(s) failed for a transient cause; "
            "re-run the same command to retry them"
        )
    if summary.missing:
        lines.append(f"  {'MISSING':<{width}} {summary.missing} row(s) have no metadata row")
    if summary.error_kinds:
        lines.append(f"  {'errors':<{width}} by kind (first ids):")
        for kind in summary.error_kinds:
            flag = " [retryable]" if kind.retryable else ""
            lines.append(f"    {kind.rows:>7}  {kind.kind}{flag} ({', '.join(kind.first_ids)})")
        lines.append(
            f"  {'':<{width}} every error row and its message: the metadata (status == 'error'), "
            "or `evf review OUTPUT`"
        )
    lines += [
        f"  {'time':<{width}} {summary.elapsed_s:.1f} s ({summary.rows_per_s:.2f} rows/s this run)",
        f"  {'masks':<{width}} {summary.layout.masks}/",
    ]
    if summary.layout.overlays:
        lines.append(f"  {'overlays':<{width}} {summary.layout.overlay_folder}/")
    lines += [
        f"  {'metadata':<{width}} {summary.layout.metadata}/",
        f"  {'job record':<{width}} {summary.layout.job_json}",
    ]
    return "\n".join(lines)
