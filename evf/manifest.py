"""Manifests: the Parquet tables that ``evf run``, ``evf eval`` and ``evf train`` read, one way.

A manifest is one Parquet file or a folder of ``*.parquet`` files (any fsspec URI; names starting
with ``.`` or ``_`` are ignored). Columns:

- ``image_url`` (required): local path, fsspec URI or ``data:`` URI. A relative path is resolved
  against the folder of the Parquet file that holds the row (so a manifest can ship with its images);
  so is ``mask_url`` (ground truth, read by ``evf eval`` and ``evf train``).
- ``prompt`` (required).
- ``id`` (optional): unique per row. Where the column is absent, or a row's id is null/empty, the id is
  derived from the row's position: ``"<file name>:<row index>"`` (file name relative to the manifest
  folder; the row index counts from 0 within that file). Duplicate ids make the manifest invalid.
- any of the request options (``evf.request.OPTION_NAMES``), per row, over the job's ``defaults``;
  null means "the job default". Other columns are ignored by the job.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from evf.parquet import open_parquet
from evf.storage import display_url, join_uri, open_filesystem, uri_protocol

__all__ = [
    "ID_COLUMN",
    "REQUIRED_COLUMNS",
    "Manifest",
    "ManifestError",
    "ManifestFile",
    "ROW_ERROR",
    "read_rows",
    "resolve_url",
    "row_id",
    "scan_manifest",
]

REQUIRED_COLUMNS = ("image_url", "prompt")
ID_COLUMN = "id"


class ManifestError(ValueError):
    """The manifest as a whole is unusable (missing, unreadable, missing columns, duplicate ids)."""


@dataclass(frozen=True)
class ManifestFile:
    """One Parquet file of a manifest.

    uri: readable location (absolute local path or full URI); name: relative to the manifest root
    (used in derived ids); base: the folder relative image URLs are resolved against; columns: the
    file's columns under the names the job uses; renamed: (job name, file's name) of the columns a
    column mapping renames.
    """

    uri: str
    name: str
    base: str
    num_rows: int
    columns: tuple[str, ...]
    row_groups: tuple[int, ...]
    renamed: tuple[tuple[str, str], ...] = ()

    def source_column(self, name: str) -> str:
        """The file's own name of the column the job calls ``name``."""
        return dict(self.renamed).get(name, name)


@dataclass
class Manifest:
    """The manifest's files and the ids of all its rows (for resume and the final accounting), as
    one Arrow array: ten million ids cost a few hundred MB, not Python objects per row."""

    uri: str
    files: list[ManifestFile]
    ids: pa.ChunkedArray

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)


# --------------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)  # rows repeat their image's URL (a prompt per row)
def resolve_url(url: str, base: str) -> str:
    """``url`` (an image or mask URL) made absolute: a relative path is joined onto ``base``, the
    folder of the manifest file that holds the row."""
    if uri_protocol(url) or os.path.isabs(url) or url.startswith("~"):
        return os.path.expanduser(url) if url.startswith("~") else url
    return join_uri(base, url)


def _parent(uri: str) -> str:
    if uri_protocol(uri):
        scheme, _, rest = uri.partition("://")
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(os.path.abspath(uri))


# --------------------------------------------------------------------------------------------------
# Scanning the manifest (driver side: footers and the id column only)
# --------------------------------------------------------------------------------------------------


def _list_files(uri: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, list[tuple[str, str]]]:
    """(filesystem, [(path within the fs, name relative to the root)]) of the manifest's files."""
    try:
        fs, path = open_filesystem(uri, storage_options)
    except Exception as error:
        raise ManifestError(
            f"cannot open manifest {display_url(uri)!r}: {type(error).__name__}: {error}"
        ) from None
    try:
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache()
        if fs.isdir(path):
            root = path.rstrip("/")
            found = sorted(
                p
                for p in fs.find(root)
                if p.endswith(".parquet")
                and not any(part.startswith((".", "_")) for part in p[len(root) :].split("/") if part)
            )
            if not found:
                raise ManifestError(f"manifest folder {display_url(uri)!r} holds no *.parquet files")
            return fs, [(p, p[len(root) :].lstrip("/")) for p in found]
        if not fs.exists(path):
            raise ManifestError(f"manifest {display_url(uri)!r} not found")
    except ManifestError:
        raise
    except Exception as error:
        raise ManifestError(
            f"cannot list manifest {display_url(uri)!r}: {type(error).__name__}: {error}"
        ) from None
    return fs, [(path, posixpath.basename(path.rstrip("/")))]


def _file_uri(fs: Any, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _id_strings(column: pa.ChunkedArray | None, name: str, num_rows: int) -> pa.Array:
    """The ids of one file's rows (``row_id``'s rule), computed column-wise for text and integer ids."""

    def derived() -> pa.Array:
        positions = pc.cast(pa.array(np.arange(num_rows, dtype=np.int64)), pa.string())
        return pc.binary_join_element_wise(pa.scalar(derived_id_prefix(name)), positions, "")

    if column is None:
        return derived()
    values = column.combine_chunks()
    if (
        pa.types.is_string(values.type)
        or pa.types.is_large_string(values.type)
        or pa.types.is_integer(values.type)
    ):
        try:
            text = pc.cast(values, pa.string())
            blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(text), ""), True)
            return pc.if_else(blank, derived(), text) if pc.any(blank).as_py() else text
        except pa.ArrowInvalid:  # e.g. invalid UTF-8: the row-by-row rule replaces the bad bytes
            values = pc.cast(values, pa.binary())
    return pa.array(
        [row_id(value, name, index) for index, value in enumerate(values.to_pylist())], pa.string()
    )


def derived_id_prefix(name: str) -> str:
    """The prefix of a file's derived ids: ``"<file name>:"``."""
    return f"{name}:"


def row_id(value: Any, file_name: str, index: int) -> str:
    """The row's id: its ``id`` value as text, or ``"<file name>:<row index>"`` when null or empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{derived_id_prefix(file_name)}{index}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text if text.strip() else f"{derived_id_prefix(file_name)}{index}"


def scan_manifest(
    uri: str, storage_options: Mapping[str, Any] | None = None, columns: Mapping[str, str] | None = None
) -> Manifest:
    """List the manifest's files, check their columns and collect every row's id.

    ``columns`` maps the job's column names to the manifest's (``{"image_url": "url", "prompt":
    "caption"}`` for an img2dataset manifest), so other datasets run without rewriting them.

    Reads only Parquet footers and the ``id`` column. Raises ``ManifestError`` when the manifest is
    missing, a file is not Parquet, a required column is missing, or two rows share an id.
    """
    mapping = dict(columns or {})
    fs, entries = _list_files(uri, storage_options)
    files: list[ManifestFile] = []
    ids: list[pa.Array] = []
    for path, name in entries:
        shown = display_url(_file_uri(fs, path))
        try:
            with fs.open(path, "rb") as handle:
                parquet = open_parquet(handle)
                own = tuple(parquet.schema_arrow.names)
                renamed = tuple((ours, theirs) for ours, theirs in mapping.items() if theirs in own)
                taken = {theirs for _, theirs in renamed}
                columns = tuple(ours for ours, _ in renamed) + tuple(c for c in own if c not in taken)
                missing = [c for c in REQUIRED_COLUMNS if c not in columns]
                if missing:
                    wanted = [f"{c} (mapped to {mapping[c]!r})" if c in mapping else c for c in missing]
                    raise ManifestError(
                        f"manifest file {shown!r} lacks required column(s) {', '.join(wanted)} "
                        f"(it has: {', '.join(own) or 'none'}); map other names with the job's "
                        "columns setting, e.g. --columns image_url=url,prompt=caption"
                    )
                metadata = parquet.metadata
                row_groups = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
                id_name = dict(renamed).get(ID_COLUMN, ID_COLUMN)
                id_column = (
                    parquet.read(columns=[id_name], use_threads=False).column(0)
                    if ID_COLUMN in columns
                    else None
                )
        except ManifestError:
            raise
        except Exception as error:
            raise ManifestError(
                f"cannot read manifest file {shown!r}: {type(error).__name__}: {error}"
            ) from None
        ids.append(_id_strings(id_column, name, metadata.num_rows))
        file_uri = _file_uri(fs, path)
        files.append(
            ManifestFile(file_uri, name, _parent(file_uri), metadata.num_rows, columns, row_groups, renamed)
        )
    all_ids = pa.chunked_array(ids, pa.string())
    _check_unique(all_ids)
    return Manifest(uri, files, all_ids)


def _check_unique(ids: pa.ChunkedArray) -> None:
    # Sorted neighbours first: a sort's index costs 8 bytes a row where a hash table of every id
    # costs several times that, and ids are unique in every manifest but a broken one.
    ordered = ids.combine_chunks().take(pc.sort_indices(ids))
    if len(ordered) < 2 or not pc.any(pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))).as_py():
        return
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        shown = ", ".join(f"{r['values']!r} ({r['counts']}x)" for r in repeated.slice(0, 5).to_pylist())
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        raise ManifestError(
            f"manifest ids must be unique: {len(repeated)} id(s) appear more than once: {shown}{more}. "
            "Fix the id column, or drop it to derive ids from row positions."
        )


ROW_ERROR = "_error"
"""Key of a row read by ``read_rows`` whose bytes could not be read or decoded (the message)."""


def read_rows(
    file: ManifestFile,
    start: int,
    stop: int,
    columns: Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows ``start..stop-1`` of one manifest file as dicts of ``columns`` (those the file has),
    plus ``_row``, the row's index in the file.

    Bad bytes fail their rows, not the read: a value that is not valid UTF-8, or a row group that
    cannot be read, gives rows holding ``ROW_ERROR`` (a message naming the file, the rows and the
    column) and whatever of their ``id`` could be read.
    """
    fs, path = open_filesystem(file.uri, storage_options)
    columns = [c for c in columns if c in file.columns]
    sources = [file.source_column(c) for c in columns]
    with fs.open(path, "rb") as handle:
        parquet = open_parquet(handle)
        offset = 0
        for group, count in enumerate(file.row_groups):
            begin, end = offset, offset + count
            offset = end
            if end <= start or begin >= stop:
                continue
            lo, hi = max(start, begin) - begin, min(stop, end) - begin
            try:
                table = parquet.read_row_group(group, columns=sources, use_threads=False).slice(lo, hi - lo)
                table = table.rename_columns(columns)
            except Exception as error:
                yield from _unreadable_rows(parquet, group, file, begin + lo, begin + hi, error)
                continue
            for index, row in enumerate(_decoded_rows(table, file.name, begin + lo)):
                row["_row"] = begin + lo + index
                yield row


def _decoded_rows(table: pa.Table, file_name: str, first: int) -> list[dict[str, Any]]:
    """``table``'s rows as dicts; a text value that is not valid UTF-8 marks its row ``ROW_ERROR``."""
    rows: list[dict[str, Any]] = [{} for _ in range(table.num_rows)]
    for name in table.column_names:
        column = table.column(name)
        try:
            values = column.to_pylist()
        except UnicodeDecodeError:
            values = pc.cast(column, pa.binary()).to_pylist()
            for index, raw in enumerate(values):
                try:
                    values[index] = None if raw is None else raw.decode("utf-8")
                except UnicodeDecodeError:
                    values[index] = None
                    shown = raw[:40].decode("utf-8", "replace")
                    rows[index][ROW_ERROR] = (
                        f"manifest file {file_name!r} row {first + index}: column {name!r} is not valid "
                        f"UTF-8 text ({shown!r})"
                    )
        for row, value in zip(rows, values, strict=True):
            row[name] = value
    return rows


def _unreadable_rows(
    parquet: pq.ParquetFile, group: int, file: ManifestFile, first: int, stop: int, error: Exception
) -> Iterator[dict[str, Any]]:
    message = (
        f"manifest file {file.name!r} rows {first}..{stop - 1} cannot be read "
        f"({type(error).__name__}: {error})"
    )
    ids: list[Any] = [None] * (stop - first)
    if ID_COLUMN in file.columns:  # the id column was readable when the manifest was scanned
        with contextlib.suppress(Exception):
            group_start = sum(file.row_groups[:group])
            source = [file.source_column(ID_COLUMN)]
            column = parquet.read_row_group(group, columns=source, use_threads=False).column(0)
            ids = column.slice(first - group_start, stop - first).to_pylist()
    for index, value in enumerate(ids):
        yield {ID_COLUMN: value, "_row": first + index, ROW_ERROR: message}
