"""Output layout, metadata (the commit record) and resume.

Under the output URI::

    masks/<key>.png            the mask (or the RGBA image when mask_only is false)
    metadata/part-<hash>.parquet   one file per written batch; one row per manifest row
    _job.json                  config used, counts and timings of the last run

A row is *committed* once its metadata row exists. A batch's masks are written first and its
metadata file after them, in one object (atomic on object stores; temp file + rename locally), so a
metadata row never points at a missing mask. A re-run lists ``metadata/``, reads the ``id``/``key``
columns, and never processes (or writes a second row for) a committed id. The file name is a hash of
the batch's ids: a retried task rewrites the same file instead of adding a second one.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from evf.io import ImageWriteError, write_bytes
from evf.request import OPTION_NAMES
from evf.segment import SegmentResult
from evf.storage import Storage, display_url, join_uri, open_filesystem
from pipelines.rows import INSTANCE_TYPE, OPTION_TYPES, RLE_TYPE, JobRow

log = logging.getLogger(__name__)

__all__ = [
    "METADATA_SCHEMA",
    "STATUSES",
    "Committed",
    "JobOutput",
    "OutputLayout",
    "conform_metadata",
    "load_committed",
    "metadata_table",
    "read_metadata",
    "write_metadata",
]

STATUSES = ("ok", "empty", "error")

METADATA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("key", pa.string()),
        ("image_url", pa.string()),
        ("prompt", pa.string()),
        *[(name, OPTION_TYPES[name]) for name in OPTION_NAMES],
        ("status", pa.string()),
        ("error", pa.string()),
        ("mask_url", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("area", pa.int64()),
        ("bbox", pa.list_(pa.int32(), 4)),
        ("score", pa.float32()),
        ("rle", RLE_TYPE),
        ("instances", pa.list_(INSTANCE_TYPE)),
        ("model_id", pa.string()),
        ("elapsed_ms", pa.float32()),
        ("run_id", pa.string()),
        ("manifest_file", pa.string()),
        ("manifest_row", pa.int64()),
    ]
)
"""One row per manifest row. ``bbox`` is (x, y, w, h) of the final mask; ``rle`` is COCO compressed
RLE (``{"size": [H, W], "counts": str}``, pycocotools-decodable); ``score`` the model's predicted IoU;
``instances`` the GroundingDINO boxes of ``use_grounding_dino`` rows (``INSTANCE_TYPE``, highest
detector score first; ``[]`` when no box passed the threshold; null for EVF rows and errors);
``elapsed_ms`` the row's share of the work (shared image read/decode/model calls split between the
rows that share them); ``run_id`` the run that computed the row. Option columns hold the values used
(null on rows whose options were invalid)."""


@dataclass(frozen=True)
class OutputLayout:
    """Where a job's outputs go under ``root``."""

    root: str

    @property
    def masks(self) -> str:
        return join_uri(self.root, "masks")

    @property
    def metadata(self) -> str:
        return join_uri(self.root, "metadata")

    @property
    def job_json(self) -> str:
        return join_uri(self.root, "_job.json")

    def mask_uri(self, key: str) -> str:
        return join_uri(self.root, "masks", f"{key}.png")

    def metadata_uri(self, ids: Iterable[str]) -> str:
        digest = hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()[:24]
        return join_uri(self.root, "metadata", f"part-{digest}.parquet")


@dataclass(frozen=True)
class JobOutput:
    """Where and as what a run commits rows: shared by every stage that writes metadata.

    ``counters``: the run's ``pipelines.progress.RunCounters`` actor (None outside a job), told the
    statuses of each commit so the driver can show progress.
    """

    layout: OutputLayout
    storage: Storage
    model_id: str
    run_id: str
    counters: Any = None

    def _row(self, row: JobRow, status: str, error: str | None) -> dict[str, Any]:
        return {
            "id": row.id,
            "key": row.key,
            "image_url": display_url(row.image_url),
            "prompt": row.request.prompt,
            **row.request.options(),
            "status": status,
            "error": error,
            "model_id": self.model_id,
            "elapsed_ms": row.elapsed_ms,
            "run_id": self.run_id,
            "manifest_file": row.manifest_file,
            "manifest_row": row.manifest_row,
        }

    def error_row(self, row: JobRow, error: str) -> dict[str, Any]:
        """The metadata row of a row that failed after it was read (image, model or write)."""
        return self._row(row, "error", error)

    def result_row(self, row: JobRow, result: SegmentResult, width: int, height: int) -> dict[str, Any]:
        """The metadata row of a finished row (``ok``, or ``empty`` when the final mask is empty)."""
        return {
            **self._row(row, "empty" if result.empty else "ok", None),
            "mask_url": self.layout.mask_uri(row.key),
            "width": width,
            "height": height,
            "area": int(result.area),
            "bbox": [int(v) for v in result.bbox],
            "score": float(result.score),
            "rle": result.rle,
            # GroundingDINO rows: the boxes and their masks (RLE) as the model stage encoded them.
            "instances": row.instances if row.request.use_grounding_dino else None,
        }

    def invalid_row(
        self, *, id: str, key: str, image_url: Any, prompt: Any, error: str, file: str, index: int
    ) -> dict[str, Any]:
        """The metadata row of a manifest row whose request is invalid (option columns null)."""
        return {
            "id": id,
            "key": key,
            "image_url": display_url(image_url) if isinstance(image_url, str) else None,
            "prompt": prompt if isinstance(prompt, str) else None,
            "status": "error",
            "error": error,
            "model_id": self.model_id,
            "run_id": self.run_id,
            "manifest_file": file,
            "manifest_row": index,
        }

    def commit(self, rows: Sequence[Mapping[str, Any]], **extra_counts: int) -> None:
        """Write these metadata rows as one commit file (nothing to write for no rows), then report
        their statuses (and ``extra_counts``, e.g. ``stale``) to the run's counters."""
        if rows:
            uri = self.layout.metadata_uri(str(r["id"]) for r in rows)
            write_metadata(self.layout, rows, self.storage.options(uri))
        counts = {**Counter(str(r["status"]) for r in rows), **{k: v for k, v in extra_counts.items() if v}}
        if self.counters is not None and counts:
            self.counters.add.remote(counts)


def metadata_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=METADATA_SCHEMA)


def write_metadata(
    layout: OutputLayout, rows: Sequence[Mapping[str, Any]], storage_options: Mapping[str, Any] | None
) -> str:
    """Write one batch's metadata rows as one Parquet object (the commit). Returns its URI."""
    table = metadata_table(rows)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    uri = layout.metadata_uri(str(r["id"]) for r in rows)
    write_bytes(uri, buffer.getvalue(), storage_options)
    return uri


# --------------------------------------------------------------------------------------------------
# Reading back what is committed
# --------------------------------------------------------------------------------------------------


@dataclass
class Committed:
    """What ``metadata/`` holds: id -> key, status and the run that committed it, plus the number
    of duplicate rows found."""

    keys: dict[str, str] = field(default_factory=dict)
    statuses: dict[str, str] = field(default_factory=dict)
    run_ids: dict[str, str] = field(default_factory=dict)
    duplicate_rows: int = 0

    def counts(self, ids: Iterable[str] | None = None, run_id: str | None = None) -> Counter[str]:
        """Committed rows per status, over ``ids`` (default: all), only those of ``run_id`` if given."""
        chosen = self.statuses if ids is None else (i for i in ids if i in self.statuses)
        return Counter(self.statuses[i] for i in chosen if run_id is None or self.run_ids[i] == run_id)


def _metadata_files(layout: OutputLayout, storage_options: Mapping[str, Any] | None) -> tuple[Any, list[str]]:
    fs, path = open_filesystem(layout.metadata, storage_options)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    if not fs.exists(path):
        return fs, []
    names = [
        p for p in fs.find(path) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith((".", "_"))
    ]
    return fs, sorted(names)


def load_committed(layout: OutputLayout, storage_options: Mapping[str, Any] | None = None) -> Committed:
    """Read the ``id``, ``key`` and ``status`` columns of every metadata file under ``layout``.

    Raises ``OSError`` naming the file when one cannot be read (delete it to redo its rows).
    """
    fs, paths = _metadata_files(layout, storage_options)
    committed = Committed()
    for path in paths:
        try:
            with fs.open(path, "rb") as handle:
                table = pq.read_table(handle, columns=["id", "key", "status", "run_id"])
        except Exception as error:
            raise OSError(
                f"metadata file {path!r} cannot be read ({type(error).__name__}: {error}); "
                "delete it to recompute its rows"
            ) from None
        for row_id, key, status, run_id in zip(*(table.column(i).to_pylist() for i in range(4)), strict=True):
            if row_id in committed.keys:
                committed.duplicate_rows += 1
            committed.keys[row_id] = key
            committed.statuses[row_id] = status
            committed.run_ids[row_id] = run_id
    return committed


def conform_metadata(table: pa.Table) -> pa.Table:
    """``table`` in ``METADATA_SCHEMA``: columns in order, missing ones (files written before a column
    was added, e.g. ``instances``) as nulls, columns unknown to the schema dropped."""
    if table.schema.equals(METADATA_SCHEMA):
        return table
    names = set(table.column_names)
    columns = [
        table.column(f.name).cast(f.type) if f.name in names else pa.nulls(table.num_rows, f.type)
        for f in METADATA_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=METADATA_SCHEMA)


def read_metadata(root: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """All metadata rows of an output (for inspection and tests), in ``METADATA_SCHEMA``.

    Files written by earlier versions (without the newer columns) read with those columns null.
    """
    fs, paths = _metadata_files(OutputLayout(root), storage_options)
    tables = []
    for path in paths:
        with fs.open(path, "rb") as handle:
            tables.append(conform_metadata(pq.read_table(handle)))
    return pa.concat_tables(tables) if tables else METADATA_SCHEMA.empty_table()


def clear_outputs(layout: OutputLayout, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete ``metadata/`` (the commit records first), then ``masks/`` and ``_job.json``."""
    for uri in (layout.metadata, layout.masks, layout.job_json):
        fs, path = open_filesystem(uri, storage_options)
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache()
        try:
            if fs.exists(path):
                fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as error:
            raise ImageWriteError(
                f"cannot delete {uri!r} for --overwrite: {type(error).__name__}: {error}"
            ) from None
