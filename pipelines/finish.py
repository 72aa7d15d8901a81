"""Stage 3 (CPU tasks): post-process, encode and write each row's mask (and, with ``overlays``, the
mask drawn over its image), then commit the batch.

A batch's masks (and overlays) are written first and its metadata file after them, in one object
(the commit), so a metadata row never points at a missing mask. Every failure of a row becomes its ``error``
row; only a failure to commit fails the task (and, after Ray's retries, the job).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from evf.errors import error_text
from evf.io import encode_jpeg, encode_png, write_bytes
from evf.overlay import overlay
from evf.pipelines.commit import JobOutput
from evf.pipelines.rows import ImageUnit, JobRow, units_from_table
from evf.pipelines.workers import map_threads, release_memory
from evf.result import RawMasks
from evf.retry import is_retryable
from evf.segment import finish

__all__ = ["FINISHED_SCHEMA", "FinishSettings", "finish_batch"]

FINISHED_SCHEMA = pa.schema([("id", pa.string()), ("status", pa.string())])
"""What the finish stage returns to the driver: one row per committed row."""


@dataclass(frozen=True)
class FinishSettings:
    output: JobOutput
    io_threads: int = 8


@dataclass
class _Finished:
    """A row's finished metadata and the PNG (and overlay JPEG) to write before it is committed."""

    row: JobRow
    metadata: dict[str, Any]
    png: bytes | None = None
    overlay: bytes | None = None
    writing: str = "mask write failed"  # what a write error of this row is reported as


def _finish_row(
    row: JobRow, masks: np.ndarray | None, image: np.ndarray | None, unit: ImageUnit, output: JobOutput
) -> _Finished:
    """Post-process one row's model masks (or record why it has none)."""
    if row.error is not None:
        return _Finished(row, output.error_row(row, row.error))
    if masks is None or row.mask_index is None or row.score is None:
        return _Finished(row, output.error_row(row, "model gave no mask for this row"))
    t0 = time.perf_counter()
    try:
        negative = masks[row.negative_index] if row.negative_index is not None else None
        raw = RawMasks(masks[row.mask_index], row.score, negative, presence_logit=row.presence_logit)
        result = finish(row.request, raw, image)
        png = encode_png(result.image)
        drawn = None
        if output.layout.overlays:
            if image is None:  # the decode stage keeps the pixels of every image when overlays are on
                raise ValueError("the image's pixels did not reach the finish stage")
            drawn = encode_jpeg(overlay(image, result.mask >= 128))
    except Exception as error:
        return _Finished(row, output.error_row(row, error_text(error, "post-processing failed")))
    finally:
        row.elapsed_ms += (time.perf_counter() - t0) * 1000
    return _Finished(row, output.result_row(row, result), png, drawn)


def finish_batch(table: pa.Table, *, settings: FinishSettings) -> pa.Table:
    """``UNIT_SCHEMA`` in (after the model); masks written, metadata committed; ``FINISHED_SCHEMA`` out."""
    output = settings.output
    finished: list[_Finished] = []
    for unit in units_from_table(table):
        masks, image = unit.mask_array(), unit.image_array()
        finished += [_finish_row(row, masks, image, unit, output) for row in unit.rows]

    writes = [item for item in finished if item.png is not None]

    def write(item: _Finished) -> None:
        uri = item.metadata["mask_url"]
        write_bytes(uri, item.png or b"", output.storage.options(uri), output.storage.retry)
        if item.overlay is not None:
            item.writing = "overlay write failed"
            uri = output.layout.overlay_uri(item.row.key, item.row.id)
            write_bytes(uri, item.overlay, output.storage.options(uri), output.storage.retry)

    t0 = time.perf_counter()
    outcomes = map_threads(write, writes, settings.io_threads)
    share = (time.perf_counter() - t0) * 1000 / max(1, len(writes))
    for item, outcome in zip(writes, outcomes, strict=True):
        item.row.elapsed_ms += share
        item.metadata["elapsed_ms"] = item.row.elapsed_ms
        if isinstance(outcome, BaseException):
            text = error_text(outcome, item.writing)
            item.metadata = output.error_row(item.row, text, is_retryable(outcome))
    rows = [item.metadata for item in finished]
    output.commit(rows)  # the commit: a failure here fails the task, the rows stay uncommitted
    result = pa.table([[r["id"] for r in rows], [r["status"] for r in rows]], schema=FINISHED_SCHEMA)
    del finished, writes
    release_memory()
    return result
