"""Reading a job's commit record back: every manifest row once, for every reader.

``metadata/`` may hold more than one row for an id: a retried error row, a row that a crashed run's
orphaned workers committed while the next run redid it, or the sources and result of a compaction
that was interrupted. The rule, applied by every reader here: **the row of the newest run wins**
(``run_id`` sorts by the run's start time); rows of the same run are the same row. A raw Parquet
reader of ``metadata/`` (pyarrow, DuckDB, Spark) sees every file and may see such duplicates until
``evf compact`` merges them away (docs/pipeline.md).

Everything is Arrow: a million committed rows cost tens of MB on the driver, not Python objects per
row, and metadata files are read in parallel.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from evf.parquet import open_parquet
from evf.pipelines.commit import METADATA_SCHEMA, OutputLayout
from evf.pipelines.workers import map_threads
from evf.storage import open_filesystem

__all__ = [
    "ACCOUNTING_COLUMNS",
    "COMMIT_COLUMNS",
    "Committed",
    "conform_metadata",
    "list_metadata_files",
    "load_committed",
    "newest_per_id",
    "read_metadata",
    "read_metadata_files",
    "release_arrow_memory",
]

COMMIT_COLUMNS = ("id", "key", "status", "retryable", "run_id")
"""What resume reads of each metadata file."""
ACCOUNTING_COLUMNS = ("id", "status", "retryable", "run_id", "error")
"""What a run's final accounting reads (no keys: only resume compares them)."""
READ_THREADS = 16  # metadata files read at once (object-store latency, not CPU, is the limit)
FILES_PER_MERGE = 512


def list_metadata_files(
    layout: OutputLayout, storage_options: Mapping[str, Any] | None
) -> tuple[Any, list[str]]:
    """(filesystem, sorted paths) of the metadata files (``*.parquet``, not hidden) under ``layout``."""
    fs, path = open_filesystem(layout.metadata, storage_options)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    if not fs.exists(path):
        return fs, []
    names = [
        p for p in fs.find(path) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith((".", "_"))
    ]
    return fs, sorted(names)


def conform_metadata(table: pa.Table, schema: pa.Schema = METADATA_SCHEMA) -> pa.Table:
    """``table`` in ``schema``: columns in order, missing ones (files written before a column was
    added, e.g. ``instances``) as nulls, columns unknown to the schema dropped."""
    if table.schema.equals(schema):
        return table
    names = set(table.column_names)
    columns = [
        table.column(f.name).cast(f.type) if f.name in names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def read_metadata_files(
    fs: Any, paths: Sequence[str], columns: Sequence[str] | None = None, threads: int = READ_THREADS
) -> pa.Table:
    """The rows of these metadata files (all duplicates kept), ``columns`` of ``METADATA_SCHEMA``.

    Raises ``OSError`` naming the first file that cannot be read (delete it to redo its rows).
    """
    schema = METADATA_SCHEMA if columns is None else pa.schema([METADATA_SCHEMA.field(c) for c in columns])

    def read(path: str) -> pa.Table:
        with fs.open(path, "rb") as handle:
            parquet = open_parquet(handle)
            wanted = [c for c in schema.names if c in parquet.schema_arrow.names]
            return conform_metadata(parquet.read(columns=wanted, use_threads=False), schema)

    merged: list[pa.Table] = []
    # A slice of files at a time, each merged into contiguous buffers: tens of thousands of small
    # per-file tables (a million rows in 32-row commits) never sit in memory together.
    for start in range(0, len(paths), FILES_PER_MERGE):
        chunk = paths[start : start + FILES_PER_MERGE]
        tables = map_threads(read, chunk, threads)
        for path, table in zip(chunk, tables, strict=True):
            if isinstance(table, BaseException):
                raise OSError(
                    f"metadata file {path!r} cannot be read ({type(table).__name__}: {table}); "
                    "delete it to recompute its rows"
                ) from None
        merged.append(pa.concat_tables(tables).combine_chunks())
        del tables
        release_arrow_memory()
    return pa.concat_tables(merged) if merged else schema.empty_table()


def newest_per_id(table: pa.Table) -> tuple[pa.Table, int]:
    """One row per ``id``, the one of the newest ``run_id`` (ties: any, they are the same row); and
    how many rows were dropped. Row order is not kept.

    Only the two key columns are sorted: a table without duplicates (the usual case) comes back as
    is, and one with duplicates is copied once, winners only.
    """
    if table.num_rows == 0:
        return table, 0
    order = pc.sort_indices(
        table.select(["id", "run_id"]), sort_keys=[("id", "ascending"), ("run_id", "descending")]
    )
    ids = _array(table.column("id")).take(order)
    first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1)).fill_null(True)
    keep = pa.concat_arrays([pa.array([True]), first])
    dropped = len(keep) - int(pc.sum(keep).as_py())
    return (table.take(order.filter(keep)) if dropped else table), dropped


def release_arrow_memory() -> None:
    """Give the pages of Arrow's freed buffers back to the system. Arrow's allocator (mimalloc)
    keeps them for reuse, so the driver's phases (manifest scan, resume, accounting, compaction)
    would each stack their own high-water mark (at a million rows, reading the commit record once
    leaves ~150 MB of such pages)."""
    pa.default_memory_pool().release_unused()


@dataclass
class Committed:
    """What ``metadata/`` holds, one row per id (``COMMIT_COLUMNS``, newest run wins),
    and how many older duplicate rows were found."""

    table: pa.Table
    duplicate_rows: int = 0

    @classmethod
    def empty(cls) -> Committed:
        return cls(pa.schema([METADATA_SCHEMA.field(c) for c in COMMIT_COLUMNS]).empty_table())

    def of(self, ids: pa.Array | pa.ChunkedArray) -> Committed:
        """The committed rows of these ids (no copy when that is every row, the usual case)."""
        wanted = pc.is_in(self.ids, value_set=_array(ids))
        if pc.all(wanted).as_py():
            return self
        return Committed(self.table.filter(wanted), self.duplicate_rows)

    @property
    def ids(self) -> pa.ChunkedArray:
        return self.table.column("id")

    def contains(self, ids: pa.Array | pa.ChunkedArray) -> pa.BooleanArray:
        """Which of ``ids`` are committed."""
        return pc.is_in(ids, value_set=self.ids.combine_chunks())

    def settled(self, retry_errors: str = "retryable") -> Committed:
        """The rows a run leaves alone: all, less the ``error`` rows it redoes (``retry_errors``:
        ``"retryable"``, the transient ones; ``"all"``; ``"none"``)."""
        if retry_errors == "none":
            return self
        redo = pc.equal(self.table.column("status"), "error")
        if retry_errors == "retryable":
            redo = pc.and_(redo, pc.fill_null(self.table.column("retryable"), False))
        if not pc.any(redo).as_py():  # the usual case: no copy of a million-row table
            return self
        return Committed(self.table.filter(pc.invert(redo)), self.duplicate_rows)

    def counts(self, run_id: str | None = None) -> Counter[str]:
        """Committed rows per status, only those of ``run_id`` if given."""
        table = self.table
        if run_id is not None:
            table = table.filter(pc.equal(table.column("run_id"), run_id))
        counted = table.group_by("status").aggregate([("id", "count")])
        return Counter(
            dict(
                zip(counted.column("status").to_pylist(), counted.column("id_count").to_pylist(), strict=True)
            )
        )

    def retryable(self) -> int:
        """How many committed rows are retryable errors."""
        status, retryable = self.table.column("status"), self.table.column("retryable")
        flags = pc.and_(pc.equal(status, "error"), pc.fill_null(retryable, False))
        return int(pc.sum(flags).as_py() or 0)


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def load_committed(
    layout: OutputLayout,
    storage_options: Mapping[str, Any] | None = None,
    columns: Sequence[str] = COMMIT_COLUMNS,
) -> Committed:
    """The commit record under ``layout``: ``columns`` (``id``, ``status`` and ``run_id`` among them)
    of every metadata file, read in parallel, one row per id. Raises ``OSError`` naming an
    unreadable file."""
    fs, paths = list_metadata_files(layout, storage_options)
    if not paths:
        return Committed(pa.schema([METADATA_SCHEMA.field(c) for c in columns]).empty_table())
    table, duplicates = newest_per_id(read_metadata_files(fs, paths, columns))
    release_arrow_memory()
    return Committed(table, duplicates)


def read_metadata(root: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """Every metadata row of an output, one per id (the newest run's), sorted by id, in
    ``METADATA_SCHEMA``.

    Files written by earlier versions (without the newer columns) read with those columns null.
    """
    fs, paths = list_metadata_files(OutputLayout(root), storage_options)
    return newest_per_id(read_metadata_files(fs, paths))[0].sort_by("id")
