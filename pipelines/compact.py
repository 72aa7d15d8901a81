"""Compaction: many small commit files merged into a few large ones, crash-safely.

A job commits one small Parquet file per batch (31,250 files per million rows at 32 rows a batch),
which every reader then lists and opens. ``compact`` merges them:

1. list the metadata files and read their ``id`` and ``run_id`` columns (in parallel): which row of
   each id wins, the newest run's (``evf.pipelines.metadata.newest_per_id``);
2. read the whole rows a slice of files at a time and keep the winners, each slice encoded at once
   as a row group of the merged file being built (only its compressed bytes are held);
3. write those as ``compact-<digest>-<n>.parquet`` files of at most ``rows_per_file`` rows, each
   in one atomic write; the digest names the set of source files, so a compaction redone over the
   same sources rewrites the same files;
4. only then delete the source files (not the files step 3 wrote).

A crash at any point loses no row: sources are deleted only after every merged file is written, and
a crash between 3 and 4 leaves rows twice, which every reader through ``evf.pipelines.metadata``
resolves (same id, same run: the same row). A raw Parquet reader of ``metadata/`` sees those
duplicates until the next compaction. Files that a running job commits meanwhile are not in the
listing of step 1 and are left alone.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from evf.io import write_bytes
from evf.pipelines.commit import METADATA_SCHEMA, OutputLayout
from evf.pipelines.metadata import FILES_PER_MERGE, list_metadata_files, newest_per_id, read_metadata_files
from evf.pipelines.workers import map_threads
from evf.storage import join_uri, open_filesystem

log = logging.getLogger(__name__)

__all__ = ["AUTO_COMPACT_FILES", "ROWS_PER_FILE", "Compaction", "compact", "drop_superseded"]

ROWS_PER_FILE = 250_000
AUTO_COMPACT_FILES = 256
"""A run compacts the output at its end when metadata/ holds more files than this."""


@dataclass(frozen=True)
class Compaction:
    """What ``compact`` did: files read and written, rows kept, older duplicate rows dropped."""

    files_read: int
    files_written: int
    rows: int
    duplicates_dropped: int


def compact(
    root: str,
    storage_options: Mapping[str, Any] | None = None,
    rows_per_file: int = ROWS_PER_FILE,
    parts_only: bool = False,
) -> Compaction:
    """Merge the metadata files under the output ``root`` (see the module docstring).

    ``parts_only``: merge only the per-batch ``part-*`` files (what a run does at its end, so that
    it never rewrites rows an earlier compaction already merged); else every file.
    """
    layout = OutputLayout(root)
    fs, paths = list_metadata_files(layout, storage_options)
    if parts_only:
        paths = [p for p in paths if p.rsplit("/", 1)[-1].startswith("part-")]
    if len(paths) <= 1:
        return Compaction(len(paths), 0, 0, 0)
    return _merge(fs, paths, layout, rows_per_file, storage_options)


def drop_superseded(root: str, storage_options: Mapping[str, Any] | None = None) -> Compaction:
    """Merge just the metadata files that hold an id more than once between them (a row committed
    again: a retried error, a row a crashed run committed twice), so that every reader, a raw
    ``pyarrow.dataset`` over ``metadata/`` included, sees each id once. Files without such an id are
    left as they are; crash-safe as ``compact``. Reads the ``id`` column of every file."""
    layout = OutputLayout(root)
    fs, paths = list_metadata_files(layout, storage_options)
    ids = map_threads(lambda path: read_metadata_files(fs, [path], ["id"], threads=1).column("id"), paths, 16)
    for path, column in zip(paths, ids, strict=True):
        if isinstance(column, BaseException):
            raise OSError(f"metadata file {path!r} cannot be read ({column})")
    if not paths:
        return Compaction(0, 0, 0, 0)
    every = pa.chunked_array([c for c in ids], pa.string())
    counts = pc.value_counts(every)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if not len(repeated):
        return Compaction(0, 0, 0, 0)
    holding = [p for p, column in zip(paths, ids, strict=True) if pc.any(pc.is_in(column, repeated)).as_py()]
    return _merge(fs, holding, layout, ROWS_PER_FILE, storage_options)


def _merge(
    fs: Any,
    paths: list[str],
    layout: OutputLayout,
    rows_per_file: int,
    storage_options: Mapping[str, Any] | None,
) -> Compaction:
    """Steps 1-4 of the module docstring over these files."""
    winners, dropped = newest_per_id(read_metadata_files(fs, paths, ["id", "run_id"]))
    digest = hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest()[:16]
    merged = _MergedFiles(join_uri(layout.metadata, f"compact-{digest}"), rows_per_file, storage_options)
    # Whole rows are read a slice of files at a time and only the winning row of each id is kept, so
    # the driver never holds every row at once (only the ids and run ids of all of them).
    taken = np.zeros(winners.num_rows, bool)
    for start in range(0, len(paths), FILES_PER_MERGE):
        rows = read_metadata_files(fs, paths[start : start + FILES_PER_MERGE])
        merged.add(_winning_rows(rows, winners, taken) if dropped else rows)  # no duplicate: all win
    written = [open_filesystem(uri, storage_options)[1] for uri in merged.close()]
    keep = set(written)
    outcomes = map_threads(fs.rm_file, [p for p in paths if p not in keep], 16)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    if failed:  # the rows are safe in the merged files; the next compaction deletes these again
        log.warning("compaction could not delete %d source file(s), e.g. %s", len(failed), failed[0])
    return Compaction(len(paths), len(written), winners.num_rows, dropped)


class _MergedFiles:
    """``<prefix>-<n>.parquet`` files of up to ``rows_per_file`` rows, built row group by row group
    in memory (zstd-compressed bytes only, never the rows) and each written in one atomic write
    (``evf.io.write_bytes``: a crash never leaves a partial merged file)."""

    def __init__(self, prefix: str, rows_per_file: int, storage_options: Mapping[str, Any] | None) -> None:
        self.prefix, self.rows_per_file, self.storage_options = prefix, rows_per_file, storage_options
        self.written: list[str] = []
        self.buffer: io.BytesIO | None = None
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        while table.num_rows:
            if self.writer is None:
                self._open()
            room = self.rows_per_file - self.rows
            self.writer.write_table(table.slice(0, room))
            self.rows += min(room, table.num_rows)
            table = table.slice(room)
            if self.rows == self.rows_per_file:
                self._publish()

    def close(self) -> list[str]:
        """Write the last file (an empty one if no row came: the sources are still replaced) and
        return the URIs of all of them."""
        if self.writer is None and not self.written:
            self._open()
        if self.writer is not None:
            self._publish()
        return self.written

    def _open(self) -> None:
        self.buffer = io.BytesIO()
        self.writer = pq.ParquetWriter(self.buffer, METADATA_SCHEMA, compression="zstd")

    def _publish(self) -> None:
        assert self.writer is not None and self.buffer is not None
        self.writer.close()
        uri = f"{self.prefix}-{len(self.written):04d}.parquet"
        write_bytes(uri, self.buffer.getvalue(), self.storage_options)
        self.written.append(uri)
        self.writer, self.buffer, self.rows = None, None, 0


def _winning_rows(rows: pa.Table, winners: pa.Table, taken: np.ndarray) -> pa.Table:
    """The rows of ``rows`` that are their id's winner (same run id) and not yet taken (a row may
    stand twice in the files, same id and run); marks them taken."""
    position = pc.index_in(rows.column("id"), value_set=winners.column("id").combine_chunks())
    index = position.to_numpy(zero_copy_only=False)
    run_ids = winners.column("run_id").combine_chunks().take(position)
    newest = pc.fill_null(pc.equal(rows.column("run_id"), run_ids), True).to_numpy(zero_copy_only=False)
    keep = np.zeros(rows.num_rows, bool)
    for row, (where, is_newest) in enumerate(zip(index, newest, strict=True)):
        if is_newest and not taken[where]:
            taken[where] = keep[row] = True
    return rows.filter(pa.array(keep))
