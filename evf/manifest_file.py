"""One file of a manifest, as both kinds of reader see it (``evf.manifest`` for Parquet and the
dispatch, ``evf.manifest_text`` for CSV and JSON Lines): ``ManifestFile``, ``ManifestError``, the
job's column names and a file's columns under them, row ids, and rows as dicts."""

from __future__ import annotations

import math
import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from evf.storage import uri_protocol

__all__ = [
    "ID_COLUMN",
    "IMAGE_COLUMN",
    "REQUIRED_COLUMNS",
    "ROW_ERROR",
    "ManifestError",
    "ManifestFile",
    "decoded_rows",
    "derived_id_prefix",
    "id_strings",
    "job_columns",
    "parent_folder",
    "row_id",
]

REQUIRED_COLUMNS = ("image_url", "prompt")
IMAGE_COLUMN = "image"
"""Where a file has no ``image_url``: the image itself in a Parquet file (a binary column, or Hugging
Face ``datasets``' struct{bytes, path}); a column of text under this name is read as ``image_url``."""
ID_COLUMN = "id"
ROW_ERROR = "_error"
"""Key of a row read by ``read_rows`` whose bytes could not be read or decoded (the message)."""


class ManifestError(ValueError):
    """The manifest as a whole is unusable (missing, unreadable, missing columns, duplicate ids)."""


@dataclass(frozen=True)
class ManifestFile:
    """One file of a manifest.

    uri: readable location (absolute local path or full URI); name: relative to the manifest root
    (used in derived ids); base: the folder relative image URLs are resolved against; columns: the
    file's columns under the names the job uses; row_groups: the rows of each row group (Parquet) or
    chunk (CSV, JSON Lines); renamed: (job name, file's name) of the columns a column mapping renames.

    A text file (``format`` "csv" or "jsonl") is read in chunks of whole lines that the scan chose:
    chunk ``i`` is bytes ``offsets[i]..offsets[i+1]-1`` and starts on line ``lines[i]`` (from 1);
    ``header``: a CSV file's column names as its header line gives them.
    """

    uri: str
    name: str
    base: str
    num_rows: int
    columns: tuple[str, ...]
    row_groups: tuple[int, ...]
    renamed: tuple[tuple[str, str], ...] = ()
    format: str = "parquet"
    offsets: tuple[int, ...] = ()
    lines: tuple[int, ...] = ()
    header: tuple[str, ...] = ()
    embedded: bool = False  # the file holds its images (``IMAGE_COLUMN``), not their URLs

    def source_column(self, name: str) -> str:
        """The file's own name of the column the job calls ``name``."""
        return dict(self.renamed).get(name, name)


def parent_folder(uri: str) -> str:
    """The folder that holds the file at ``uri`` (a local one made absolute): its ``base``."""
    if uri_protocol(uri):
        scheme, _, rest = uri.partition("://")
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(os.path.abspath(uri))


def job_columns(
    own: Sequence[str], mapping: Mapping[str, str], shown: str, types: Mapping[str, pa.DataType] | None = None
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], bool]:
    """(the file's columns under the job's names, the renamed ones, whether the file embeds its
    images); ``ManifestError`` when a required column is missing. ``types``: a Parquet file's column
    types, which tell embedded images (``IMAGE_COLUMN``) from text."""
    renamed = tuple((ours, theirs) for ours, theirs in mapping.items() if theirs in own)
    taken = {theirs for _, theirs in renamed}
    columns = tuple(ours for ours, _ in renamed) + tuple(c for c in own if c not in taken)
    embedded = False
    if "image_url" not in columns and IMAGE_COLUMN in columns:
        source = dict(renamed).get(IMAGE_COLUMN, IMAGE_COLUMN)
        embedded = _holds_images((types or {}).get(source), source, shown)
        if not embedded:  # text: the image's path or URI under another name
            renamed = tuple(r for r in renamed if r[0] != IMAGE_COLUMN) + (("image_url", source),)
            columns = tuple("image_url" if c == IMAGE_COLUMN else c for c in columns)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns and not (c == "image_url" and embedded)]
    if missing:
        wanted = [f"{c} (mapped to {mapping[c]!r})" if c in mapping else c for c in missing]
        wanted = [f"{w} (or {IMAGE_COLUMN}: the image's bytes)" if w == "image_url" else w for w in wanted]
        raise ManifestError(
            f"manifest file {shown!r} lacks required column(s) {', '.join(wanted)} "
            f"(it has: {', '.join(own) or 'none'}); map other names with the job's "
            "columns setting, e.g. --columns image_url=url,prompt=caption or --columns image=img"
        )
    return columns, renamed, embedded


def _holds_images(kind: pa.DataType | None, source: str, shown: str) -> bool:
    """Whether a column of this type holds images (True) or their URLs as text (False)."""
    if kind is None or pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return False
    if _is_image_bytes(kind):
        return True
    raise ManifestError(
        f"manifest file {shown!r}: column {source!r} holds {kind}: expected the images' bytes "
        "(binary), Hugging Face's image struct{bytes, path}, or text (a path or URI)"
    )


def _is_image_bytes(kind: pa.DataType) -> bool:
    """A binary column, or a struct with a binary ``bytes`` field (Hugging Face's ``Image()``)."""
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and _is_image_bytes(kind.field(index).type)
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)


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


def id_strings(column: pa.ChunkedArray | None, name: str, num_rows: int, first: int = 0) -> pa.Array:
    """The ids of one file's rows ``first..first+num_rows-1`` (``row_id``'s rule), computed
    column-wise for text and integer ids."""

    def derived() -> pa.Array:
        positions = pc.cast(pa.array(np.arange(first, first + num_rows, dtype=np.int64)), pa.string())
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
        [row_id(value, name, first + index) for index, value in enumerate(values.to_pylist())], pa.string()
    )


def decoded_rows(table: pa.Table, file_name: str, first: int) -> list[dict[str, Any]]:
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
