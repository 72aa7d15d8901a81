"""Manifests: the tables that ``evf run``, ``evf eval`` and ``evf train`` read, one way.

A manifest is one file or a folder of ``*.parquet``, ``*.csv`` and ``*.jsonl`` (``*.ndjson``) files,
kinds mixed as you like (any fsspec URI; names starting with ``.`` or ``_`` are ignored). A CSV file
has a header line; its cells are text, an empty cell is null, and ``read_rows`` turns an option's
text into the option's type (``true``/``false``/``1``/``0``, ``3``, ``0.5``), leaving text it cannot
turn for validation to reject. A JSON Lines file holds one JSON object per line, values typed as
given. Columns:

- ``image_url`` (required): local path, fsspec URI or ``data:`` URI. A relative path is resolved
  against the folder of the manifest file that holds the row (so a manifest can ship with its images);
  so is ``mask_url`` (ground truth, read by ``evf eval`` and ``evf train``).
  Or, in a Parquet file, ``image``: the image itself, as bytes or as Hugging Face ``datasets``'
  struct{bytes, path} (``Image()`` features written by ``to_parquet``); the row's ``image_url`` is then
  ``<file URI>#row=<index>`` (``embedded_image_url``). An ``image`` column of text is read as
  ``image_url``.
- ``prompt`` (required).
- ``id`` (optional): unique per row. Where the column is absent, or a row's id is null/empty, the id is
  derived from the row's position: ``"<file name>:<row index>"`` (file name relative to the manifest
  folder; the row index counts from 0 within that file). Duplicate ids make the manifest invalid.
- any of the request options (``evf.request.OPTION_NAMES``), per row, over the job's ``defaults``;
  null means "the job default". Other columns are ignored by the job.

Here: the scan and ``read_rows`` for every kind, and Parquet's own reading; CSV and JSON Lines in
``evf.manifest_text``; what both need of one file (``ManifestFile``, ``ManifestError``, the column
names, row ids) in ``evf.manifest_file``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from evf.manifest_file import (
    ID_COLUMN,
    IMAGE_COLUMN,
    ROW_ERROR,
    ManifestError,
    ManifestFile,
    decoded_rows,
    id_strings,
    job_columns,
    parent_folder,
)
from evf.manifest_text import read_text_rows, scan_text
from evf.parquet import open_parquet
from evf.storage import display_url, join_uri, open_filesystem, uri_protocol

__all__ = [
    "MANIFEST_SUFFIXES",
    "Manifest",
    "embedded_image_url",
    "manifest_format",
    "read_embedded_image",
    "read_embedded_images",
    "read_rows",
    "resolve_url",
    "scan_manifest",
]

MANIFEST_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson")
"""The files a manifest folder is made of (case-insensitive); a single file of another name is Parquet."""


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
                if p.lower().endswith(MANIFEST_SUFFIXES)
                and not any(part.startswith((".", "_")) for part in p[len(root) :].split("/") if part)
            )
            if not found:
                raise ManifestError(
                    f"manifest folder {display_url(uri)!r} holds no *.parquet, *.csv or *.jsonl files"
                )
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


def scan_manifest(
    uri: str, storage_options: Mapping[str, Any] | None = None, columns: Mapping[str, str] | None = None
) -> Manifest:
    """List the manifest's files, check their columns and collect every row's id.

    ``columns`` maps the job's column names to the manifest's (``{"image_url": "url", "prompt":
    "caption"}`` for an img2dataset manifest), so other datasets run without rewriting them.

    Reads only Parquet footers and the ``id`` column; a CSV or JSON Lines file is read once, in
    chunks, keeping only its ids. Raises ``ManifestError`` when the manifest is missing, a file cannot
    be read or parsed (naming the file, and the line of a text file), a required column is missing,
    or two rows share an id.
    """
    mapping = dict(columns or {})
    fs, entries = _list_files(uri, storage_options)
    files: list[ManifestFile] = []
    ids: list[pa.Array] = []
    for path, name in entries:
        file_uri = _file_uri(fs, path)
        shown = display_url(file_uri)
        kind = manifest_format(path)
        try:
            with fs.open(path, "rb") as handle:
                if kind == "parquet":
                    file, file_ids = _scan_parquet(handle, file_uri, name, mapping, shown)
                else:
                    file, file_ids = scan_text(handle, kind, file_uri, name, mapping, shown)
        except ManifestError:
            raise
        except Exception as error:
            raise ManifestError(
                f"cannot read manifest file {shown!r}: {type(error).__name__}: {error}"
            ) from None
        ids.append(file_ids)
        files.append(file)
    all_ids = pa.chunked_array(ids, pa.string())
    _check_unique(all_ids)
    return Manifest(uri, files, all_ids)


def manifest_format(path: str) -> str:
    """The kind of a manifest file, by its name: "csv", "jsonl" (also ``.ndjson``) or "parquet"."""
    lowered = path.lower()
    if lowered.endswith(".csv"):
        return "csv"
    return "jsonl" if lowered.endswith((".jsonl", ".ndjson")) else "parquet"


def _scan_parquet(
    handle: Any, uri: str, name: str, mapping: Mapping[str, str], shown: str
) -> tuple[ManifestFile, pa.Array]:
    parquet = open_parquet(handle)
    schema = parquet.schema_arrow
    types = {field.name: field.type for field in schema}
    columns, renamed, embedded = job_columns(tuple(schema.names), mapping, shown, types)
    metadata = parquet.metadata
    row_groups = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    id_name = dict(renamed).get(ID_COLUMN, ID_COLUMN)
    id_column = parquet.read(columns=[id_name], use_threads=False).column(0) if ID_COLUMN in columns else None
    file = ManifestFile(
        uri, name, parent_folder(uri), metadata.num_rows, columns, row_groups, renamed, embedded=embedded
    )
    return file, id_strings(id_column, name, metadata.num_rows)


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


def read_rows(
    file: ManifestFile,
    start: int,
    stop: int,
    columns: Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows ``start..stop-1`` of one manifest file as dicts of ``columns`` (those the file has),
    plus ``_row``, the row's index in the file.

    Bad bytes fail their rows, not the read: a value that is not valid UTF-8, or a row group (a text
    file's chunk) that cannot be read, gives rows holding ``ROW_ERROR`` (a message naming the file,
    the rows and the column) and whatever of their ``id`` could be read. A CSV file's option values
    come as the options' types (``text_value``).
    """
    if file.format != "parquet":
        yield from read_text_rows(file, start, stop, columns, storage_options)
        return
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
            for index, row in enumerate(decoded_rows(table, file.name, begin + lo)):
                row["_row"] = begin + lo + index
                if file.embedded:
                    row["image_url"] = embedded_image_url(file, begin + lo + index)
                yield row


EMBEDDED_IMAGE = re.compile(r"^(?P<file>.+)#row=(?P<row>\d+)&column=(?P<column>[^&#]+)$")
"""An ``embedded_image_url``: the manifest file's URI, the row's index in it and the image column."""


def embedded_image_url(file: ManifestFile, index: int) -> str:
    """The ``image_url`` of row ``index`` of a file that embeds its images,
    ``<file URI>#row=<index>&column=<column>``: the image's identity in keys, metadata and exports,
    which ``evf.io.read_bytes`` reads (``read_embedded_image``)."""
    return f"{file.uri}#row={index}&column={file.source_column(IMAGE_COLUMN)}"


def read_embedded_image(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes | str:
    """The image an ``embedded_image_url`` names: its bytes, or the path a Hugging Face struct holds
    instead (see ``read_embedded_images``). Reads one row group of one column."""
    match = EMBEDDED_IMAGE.match(url)
    if match is None:
        raise ValueError(f"not an embedded image's URL: {url!r}")
    uri, index, column = match["file"], int(match["row"]), match["column"]
    fs, path = open_filesystem(uri, storage_options)
    with fs.open(path, "rb") as handle:
        parquet = open_parquet(handle)
        starts = np.cumsum(
            [0] + [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
        )
        if not 0 <= index < starts[-1]:
            raise ValueError(f"{url!r}: the file has {starts[-1]} rows")
        group = int(np.searchsorted(starts, index, side="right") - 1)
        value = parquet.read_row_group(group, columns=[column], use_threads=False).column(0)[
            index - starts[group]
        ]
    image = _embedded_image(value.as_py(), posixpath.basename(path), parent_folder(uri), column, index)
    if isinstance(image, Exception):
        raise image
    return image


def read_embedded_images(
    file: ManifestFile, indices: Sequence[int], storage_options: Mapping[str, Any] | None = None
) -> list[bytes | str | Exception]:
    """The images of rows ``indices`` (ascending) of a file that embeds them, read row group by row
    group: the image's bytes, or where a Hugging Face struct holds only a ``path`` (``datasets``
    writes no bytes for images it loaded from files), that path resolved like an ``image_url``. A
    row with neither, or in a row group that cannot be read, gets the error."""
    source = file.source_column(IMAGE_COLUMN)
    found: list[bytes | str | Exception] = []
    fs, path = open_filesystem(file.uri, storage_options)
    with fs.open(path, "rb") as handle:
        parquet = open_parquet(handle)
        starts = np.cumsum((0, *file.row_groups))
        groups = np.searchsorted(starts, indices, side="right") - 1
        for group in dict.fromkeys(groups.tolist()):
            wanted = [i for i, g in zip(indices, groups, strict=True) if g == group]
            try:
                column = parquet.read_row_group(group, columns=[source], use_threads=False).column(0)
                values = column.take(pa.array([i - starts[group] for i in wanted])).to_pylist()
            except Exception as error:
                found += [error] * len(wanted)
                continue
            found += [
                _embedded_image(v, file.name, file.base, source, i)
                for i, v in zip(wanted, values, strict=True)
            ]
    return found


def _embedded_image(value: Any, name: str, base: str, source: str, index: int) -> bytes | str | Exception:
    if isinstance(value, dict):  # Hugging Face's struct{bytes, path}
        if value.get("bytes"):
            return value["bytes"]
        if isinstance(value.get("path"), str) and value["path"].strip():
            return resolve_url(value["path"].strip(), base)
    elif value:
        return value
    return ManifestError(f"manifest file {name!r} row {index}: column {source!r} holds no image")


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
