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

from evf.io import ImageWriteError, join_uri, open_filesystem, write_bytes
from evf.request import OPTION_DEFAULTS, OPTION_NAMES

log = logging.getLogger(__name__)

__all__ = [
    "INSTANCE_TYPE",
    "METADATA_SCHEMA",
    "RLE_TYPE",
    "STATUSES",
    "Committed",
    "OutputLayout",
    "conform_metadata",
    "load_committed",
    "metadata_table",
    "read_metadata",
    "write_metadata",
]

STATUSES = ("ok", "empty", "error")

_OPTION_TYPES: dict[str, pa.DataType] = {
    name: pa.string()
    if name == "negative_prompt"
    else pa.int32()
    if isinstance(default, int) and not isinstance(default, bool)
    else pa.bool_()
    for name, default in OPTION_DEFAULTS.items()
}

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32(), 2)), ("counts", pa.string())])
"""COCO compressed RLE: ``{"size": [H, W], "counts": str}``."""

INSTANCE_TYPE = pa.struct(
    [
        ("box", pa.list_(pa.float32(), 4)),
        ("detector_score", pa.float32()),
        ("mask_score", pa.float32()),
        ("label", pa.string()),
        ("rle", RLE_TYPE),
    ]
)
"""One GroundingDINO box of a row (``evf.segment.SegmentResult.instances``): ``box`` ``[x, y, w, h]``
float pixels, GroundingDINO's score, SAM 2's predicted IoU, the matched prompt words, and the COCO
RLE of that box's own mask (before post-processing and negative subtraction)."""

METADATA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("key", pa.string()),
        ("image_url", pa.string()),
        ("prompt", pa.string()),
        *[(name, _OPTION_TYPES[name]) for name in OPTION_NAMES],
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


def _typed_option(name: str, value: Any) -> Any:
    kind = _OPTION_TYPES[name]
    if value is None:
        return None
    if kind == pa.string():
        return value if isinstance(value, str) else None
    if kind == pa.bool_():
        return value if isinstance(value, bool) else None
    return (
        value
        if isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31
        else None
    )


def _instances(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    return [
        {
            "box": [float(v) for v in item["box"]],
            "detector_score": float(item["detector_score"]),
            "mask_score": float(item["mask_score"]),
            "label": item.get("label") or "",
            "rle": {"size": [int(v) for v in item["rle"]["size"]], "counts": str(item["rle"]["counts"])},
        }
        for item in value
    ]


def metadata_row(record: Mapping[str, Any], *, model_id: str, run_id: str) -> dict[str, Any]:
    """The metadata row of a finished record (status ok/empty/error)."""
    request = record.get("request") or {}
    result = record.get("result") or {}
    row: dict[str, Any] = {
        "id": record["id"],
        "key": record["key"],
        "image_url": record.get("image_url_display") or record.get("image_url"),
        "prompt": record.get("prompt"),
    }
    for name in OPTION_NAMES:
        row[name] = _typed_option(name, request.get(name)) if request else None
    row.update(
        status=record["status"],
        error=record.get("error"),
        mask_url=result.get("mask_url"),
        width=record.get("width"),
        height=record.get("height"),
        area=result.get("area"),
        bbox=result.get("bbox"),
        score=result.get("score"),
        rle=result.get("rle"),
        instances=_instances(result.get("instances")),
        model_id=model_id,
        elapsed_ms=record.get("elapsed_ms"),
        run_id=run_id,
        manifest_file=record.get("file"),
        manifest_row=record.get("row"),
    )
    return row


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
    """What ``metadata/`` holds: id -> key and id -> status, plus the number of duplicate rows found."""

    keys: dict[str, str] = field(default_factory=dict)
    statuses: dict[str, str] = field(default_factory=dict)
    files: int = 0
    duplicate_rows: int = 0

    def counts(self, ids: Iterable[str] | None = None) -> Counter[str]:
        """Committed rows per status, over ``ids`` (default: all)."""
        if ids is None:
            return Counter(self.statuses.values())
        return Counter(self.statuses[i] for i in ids if i in self.statuses)


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
    committed = Committed(files=len(paths))
    for path in paths:
        try:
            with fs.open(path, "rb") as handle:
                table = pq.read_table(handle, columns=["id", "key", "status"])
        except Exception as error:
            raise OSError(
                f"metadata file {path!r} cannot be read ({type(error).__name__}: {error}); "
                "delete it to recompute its rows"
            ) from None
        for row_id, key, status in zip(
            table.column("id").to_pylist(),
            table.column("key").to_pylist(),
            table.column("status").to_pylist(),
            strict=True,
        ):
            if row_id in committed.keys:
                committed.duplicate_rows += 1
            committed.keys[row_id] = key
            committed.statuses[row_id] = status
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
