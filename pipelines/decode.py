"""Stage 1 (CPU tasks): fetch, decode and prepare each distinct image of a batch once.

Rows of the batch that name the same image share one read, one decode and (in the model stage)
one image embedding. A row whose image cannot be read or decoded is committed here as an ``error``
row and goes no further.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from evf.errors import error_text
from evf.io import decode_image, read_bytes
from evf.pipelines.commit import JobOutput
from evf.pipelines.rows import ImageUnit, JobRow, rows_from_table, units_table
from evf.pipelines.workers import map_threads, release_memory
from evf.retry import is_retryable

__all__ = ["DecodeSettings", "decode_batch"]


@dataclass(frozen=True)
class DecodeSettings:
    output: JobOutput
    preprocessor: Any  # the model family's (``evf.registry.FamilyInfo.preprocessor``)
    io_threads: int = 8


def decode_batch(table: pa.Table, *, settings: DecodeSettings) -> pa.Table:
    """``ROW_SCHEMA`` rows in, one ``UNIT_SCHEMA`` row per distinct readable image out."""
    groups: dict[str, list[JobRow]] = {}
    for row in rows_from_table(table):
        groups.setdefault(row.image_url, []).append(row)
    urls = list(groups)
    storage = settings.output.storage

    def fetch(url: str) -> bytes:
        embedded = groups[url][0].image_bytes  # a manifest that holds its images
        return embedded if embedded is not None else read_bytes(url, storage.options(url), storage.retry)

    started = time.perf_counter()
    fetched = map_threads(fetch, urls, settings.io_threads)
    for rows in groups.values():
        for row in rows:
            row.image_bytes = None  # not carried on to the model
    fetch_ms = (time.perf_counter() - started) * 1000 / max(1, len(urls))
    units: list[ImageUnit] = []
    failed: list[dict] = []
    for url, data in zip(urls, fetched, strict=True):
        rows = groups[url]
        t0 = time.perf_counter()
        try:
            if isinstance(data, BaseException):
                raise data
            image = decode_image(data, url)
            prepared = settings.preprocessor(image)
        except Exception as error:
            where = "image read failed" if isinstance(data, BaseException) else "image decode failed"
            text, transient = error_text(error, where), is_retryable(error)
            failed += [settings.output.error_row(row, text, transient) for row in rows]
            continue
        share = (fetch_ms + (time.perf_counter() - t0) * 1000) / len(rows)
        for row in rows:
            row.elapsed_ms += share
        keep_image = settings.output.layout.overlays  # the finish stage draws each mask over it
        units.append(ImageUnit.prepared(url, image, prepared, rows, keep_image))
    settings.output.commit(failed)
    result = units_table(units)
    del units, fetched
    release_memory()
    return result
