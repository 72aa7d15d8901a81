"""``evf run --dry-run``: what a run would do, from the manifest and the commit record alone.

Reads and validates every manifest row exactly as the job's read stage does and looks each up in
the output's commits; starts no Ray and loads no weights. Reports the rows to do, committed, stale
and invalid (the first invalid rows with their messages), the distinct images to read, and a time
and cost estimate.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from evf.io import read_bytes
from evf.manifest import read_rows, scan_manifest
from evf.pipelines.commit import OutputLayout, check_output_writable
from evf.pipelines.config import JobConfig
from evf.pipelines.metadata import load_committed
from evf.pipelines.read import READ_COLUMNS, CommittedIndex, InvalidRow, digests, grounding_id, parse_row
from evf.pipelines.sources import with_images_manifest
from evf.storage import Storage, display_url

__all__ = ["FAL_PRICE_PER_REQUEST", "DEFAULT_ROWS_PER_S", "DryRun", "dry_run", "format_dry_run"]

FAL_PRICE_PER_REQUEST = 0.005
"""US$ per request of the hosted fal-ai/evf-sam endpoint (one image and one prompt)."""
DEFAULT_ROWS_PER_S = 0.5
"""The estimate's rate when the output has no earlier run to learn from: this project's 2-core
development machine with the demo model does ~0.6 rows/s on the sample; real checkpoints on a GPU
are far faster, so the first real run's own rate replaces this."""
SHOWN_INVALID = 5


@dataclass
class DryRun:
    """What ``evf run`` would do now (see the module docstring)."""

    manifest: str
    output: str
    rows: int = 0
    to_do: int = 0
    committed: int = 0
    stale: int = 0
    invalid: int = 0
    first_invalid: list[tuple[str, str]] = field(default_factory=list)
    distinct_images: int = 0
    rows_per_s: float = DEFAULT_ROWS_PER_S
    rate_source: str = "default"

    @property
    def estimated_s(self) -> float:
        return (self.to_do + self.invalid) / self.rows_per_s if self.rows_per_s > 0 else 0.0

    @property
    def fal_cost(self) -> float:
        return self.to_do * FAL_PRICE_PER_REQUEST


def _last_rate(layout: OutputLayout, storage: Storage) -> float | None:
    """rows/s of the last run that processed rows (its ``_job.json``), if any."""
    try:
        record = json.loads(read_bytes(layout.job_json, storage.options(layout.job_json)))
    except (OSError, ValueError):
        return None
    rate = record.get("rows_per_s")
    return float(rate) if isinstance(rate, int | float) and rate > 0 else None


def dry_run(config: JobConfig) -> DryRun:
    """Count what a run of ``config`` would do (no Ray, no weights); see the module docstring."""
    config = config.resolved()
    storage = config.storage()
    check_output_writable(config.output, storage)  # what the run would find first
    layout = OutputLayout(config.output)
    listing = tempfile.TemporaryDirectory(prefix="evf-dry-run-")  # an images job's rows, not in the output
    config = with_images_manifest(config, storage, os.path.join(listing.name, "images.parquet"))
    manifest = scan_manifest(config.manifest, storage.options(config.manifest), config.columns)
    committed = load_committed(layout, storage.options(layout.metadata)) if not config.overwrite else None
    index = CommittedIndex.build(committed.settled(config.retry_errors).table) if committed else None
    report = DryRun(
        display_url(config.images or config.manifest), display_url(config.output), rows=manifest.num_rows
    )
    grounding = grounding_id(
        config.grounding.model, config.grounding.box_threshold, config.grounding.text_threshold
    )
    images: list[np.ndarray] = []
    for file in manifest.files:
        rows = [
            parse_row(raw, file=file, defaults=config.defaults, model_id=config.model, grounding=grounding)
            for raw in read_rows(file, 0, file.num_rows, READ_COLUMNS, storage.options(file.uri))
        ]
        done = stale = np.zeros(len(rows), bool)
        if index is not None:
            done, stale = index.lookup([r.id for r in rows], [r.key for r in rows])
        report.committed += int(done.sum())
        report.stale += int(stale.sum())
        left = [row for row, is_done in zip(rows, done, strict=True) if not is_done]
        invalid = [row for row in left if isinstance(row, InvalidRow)]
        report.invalid += len(invalid)
        report.first_invalid += [(r.id, r.error) for r in invalid][
            : SHOWN_INVALID - len(report.first_invalid)
        ]
        valid = [row for row in left if not isinstance(row, InvalidRow)]
        report.to_do += len(valid)
        images.append(digests([row.image_url for row in valid]))
    report.distinct_images = int(len(np.unique(np.concatenate(images)))) if images else 0
    rate = _last_rate(layout, storage)
    if rate is not None:
        report.rows_per_s, report.rate_source = rate, f"the last run ({display_url(layout.job_json)})"
    return report


def format_dry_run(report: DryRun) -> str:
    width = 12
    hours = report.estimated_s / 3600
    lines = [
        "evf run --dry-run (nothing was run; no Ray, no model weights)",
        f"  {'manifest':<{width}} {report.manifest} ({report.rows} rows)",
        f"  {'output':<{width}} {report.output}",
        f"  {'to do':<{width}} {report.to_do} row(s) on {report.distinct_images} distinct image(s)",
        f"  {'committed':<{width}} {report.committed} row(s) already done (skipped)",
        f"  {'stale':<{width}} {report.stale} committed row(s) whose inputs changed (kept; --overwrite "
        "redoes them)",
        f"  {'invalid':<{width}} {report.invalid} row(s) would be committed as errors",
    ]
    lines += [f"    {row_id}: {message}" for row_id, message in report.first_invalid]
    lines += [
        f"  {'estimate':<{width}} {report.estimated_s:.0f} s ({hours:.2f} h) at "
        f"{report.rows_per_s:.2f} rows/s ({report.rate_source})",
        f"  {'fal.ai':<{width}} ${report.fal_cost:,.2f} for the same rows "
        f"at ${FAL_PRICE_PER_REQUEST} a request",
    ]
    return "\n".join(lines)
