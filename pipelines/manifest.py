"""The job's manifest: Parquet rows -> validated request records (id, key, request or error).

A manifest is one Parquet file or a folder of ``*.parquet`` files (any fsspec URI). Columns:

- ``image_url`` (required): local path, fsspec URI or ``data:`` URI. A relative path is resolved
  against the folder of the Parquet file that holds the row (so a manifest can ship with its images).
- ``prompt`` (required).
- ``id`` (optional): unique per row. Where the column is absent, or a row's id is null/empty, the id is
  derived from the row's position: ``"<file name>:<row index>"`` (file name relative to the manifest
  folder; the row index counts from 0 within that file). Duplicate ids make the manifest invalid.
- any of the request options (``evf.request.OPTION_NAMES``), per row, over the job's ``defaults``;
  null means "the job default". Other columns are ignored.

Each row becomes one *record* (a plain dict, JSON-serialisable) that travels through the job:
``id``, ``key``, ``image_url`` (resolved), ``prompt``, ``request`` (the validated fields, or None),
``status`` ("" = to do, "error" = invalid row, "skip" = already committed), ``error``, ``file``,
``row``. ``key`` is a deterministic hash of (image_url, prompt, options, model id, and for
``use_grounding_dino`` rows the GroundingDINO model and thresholds) and names the mask file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from evf.io import join_uri, open_filesystem, redact
from evf.request import OPTION_NAMES, InvalidRequestError, parse_request

__all__ = [
    "ID_COLUMN",
    "REQUIRED_COLUMNS",
    "Manifest",
    "ManifestError",
    "ManifestFile",
    "grounding_id",
    "record_from_row",
    "request_key",
    "resolve_image_url",
    "scan_manifest",
]

REQUIRED_COLUMNS = ("image_url", "prompt")
ID_COLUMN = "id"
INT_OPTIONS = frozenset({"blur_mask", "expand_mask"})
READ_COLUMNS = (ID_COLUMN, *REQUIRED_COLUMNS, *OPTION_NAMES)


class ManifestError(ValueError):
    """The manifest as a whole is unusable (missing, unreadable, missing columns, duplicate ids)."""


@dataclass(frozen=True)
class ManifestFile:
    """One Parquet file of a manifest.

    uri: readable location (absolute local path or full URI); name: relative to the manifest root
    (used in derived ids); base: the folder relative image URLs are resolved against.
    """

    uri: str
    name: str
    base: str
    num_rows: int
    columns: tuple[str, ...]
    row_groups: tuple[int, ...]


@dataclass
class Manifest:
    """The manifest's files and the ids of all its rows (for resume and the final accounting)."""

    uri: str
    files: list[ManifestFile]
    ids: set[str]

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)


# --------------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------------


def _has_scheme(url: str) -> bool:
    if url[:5].lower() == "data:":
        return True
    scheme, sep, _ = url.partition("://")
    return (
        bool(sep) and len(scheme) > 1 and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum()
    )


def resolve_image_url(url: str, base: str) -> str:
    """``url`` made absolute: relative paths are joined onto ``base`` (the manifest file's folder)."""
    if _has_scheme(url) or os.path.isabs(url) or url.startswith("~"):
        return os.path.expanduser(url) if url.startswith("~") else url
    return join_uri(base, url)


def _parent(uri: str) -> str:
    if _has_scheme(uri):
        scheme, _, rest = uri.partition("://")
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(os.path.abspath(uri))


def display_url(url: str) -> str:
    """``url`` as it may be stored or logged: a password inside it is hidden."""
    return redact({"url": url})["url"]


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


def _id_strings(column: pa.ChunkedArray | None, name: str, num_rows: int) -> list[str]:
    values = column.to_pylist() if column is not None else [None] * num_rows
    return [row_id(value, name, index) for index, value in enumerate(values)]


def row_id(value: Any, file_name: str, index: int) -> str:
    """The row's id: its ``id`` value as text, or ``"<file name>:<row index>"`` when null or empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{file_name}:{index}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text if text.strip() else f"{file_name}:{index}"


def scan_manifest(uri: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """List the manifest's files, check their columns and collect every row's id.

    Reads only Parquet footers and the ``id`` column. Raises ``ManifestError`` when the manifest is
    missing, a file is not Parquet, a required column is missing, or two rows share an id.
    """
    fs, entries = _list_files(uri, storage_options)
    files: list[ManifestFile] = []
    ids: set[str] = set()
    duplicates: dict[str, int] = {}
    for path, name in entries:
        shown = display_url(_file_uri(fs, path))
        try:
            with fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                columns = tuple(parquet.schema_arrow.names)
                missing = [c for c in REQUIRED_COLUMNS if c not in columns]
                if missing:
                    raise ManifestError(
                        f"manifest file {shown!r} lacks required column(s) {', '.join(missing)} "
                        f"(it has: {', '.join(columns) or 'none'})"
                    )
                metadata = parquet.metadata
                row_groups = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
                id_column = parquet.read(columns=[ID_COLUMN]).column(0) if ID_COLUMN in columns else None
        except ManifestError:
            raise
        except Exception as error:
            raise ManifestError(
                f"cannot read manifest file {shown!r}: {type(error).__name__}: {error}"
            ) from None
        file_ids = _id_strings(id_column, name, metadata.num_rows)
        for value in file_ids:
            if value in ids:
                duplicates[value] = duplicates.get(value, 1) + 1
            ids.add(value)
        file_uri = _file_uri(fs, path)
        files.append(ManifestFile(file_uri, name, _parent(file_uri), metadata.num_rows, columns, row_groups))
    if duplicates:
        shown = ", ".join(f"{k!r} ({n}x)" for k, n in list(duplicates.items())[:5])
        more = f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
        raise ManifestError(
            f"manifest ids must be unique: {len(duplicates)} id(s) appear more than once: {shown}{more}. "
            "Fix the id column, or drop it to derive ids from row positions."
        )
    return Manifest(uri, files, ids)


def read_rows(
    file: ManifestFile, start: int, stop: int, storage_options: Mapping[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """Rows ``start..stop-1`` of one manifest file as dicts of the columns the job uses, plus ``_row``."""
    fs, path = open_filesystem(file.uri, storage_options)
    columns = [c for c in READ_COLUMNS if c in file.columns]
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        offset = 0
        for group, count in enumerate(file.row_groups):
            begin, end = offset, offset + count
            offset = end
            if end <= start or begin >= stop:
                continue
            table = parquet.read_row_group(group, columns=columns)
            lo, hi = max(start, begin) - begin, min(stop, end) - begin
            for index, row in enumerate(table.slice(lo, hi - lo).to_pylist()):
                row["_row"] = begin + lo + index
                yield row


# --------------------------------------------------------------------------------------------------
# One row -> one record
# --------------------------------------------------------------------------------------------------


def grounding_id(model: str | None, box_threshold: float, text_threshold: float) -> str:
    """What a ``use_grounding_dino`` row's result depends on besides the request and the EVF model:
    the GroundingDINO checkpoint and the job's thresholds (mixed into those rows' keys)."""
    return json.dumps(
        {"model": model, "box_threshold": float(box_threshold), "text_threshold": float(text_threshold)},
        sort_keys=True,
    )


def request_key(
    image_url: str, prompt: Any, options: Mapping[str, Any], model_id: str, grounding: str | None = None
) -> str:
    """Deterministic 32-hex-digit key of (image_url, prompt, options, model id[, grounding setup]).

    ``grounding`` (``grounding_id(...)``) is given for ``use_grounding_dino`` rows only, so EVF rows'
    keys do not depend on the GroundingDINO settings.
    """
    fields: dict[str, Any] = {
        "image_url": image_url,
        "prompt": prompt,
        "options": dict(sorted(options.items())),
        "model": model_id,
    }
    if grounding is not None:
        fields["grounding"] = grounding
    payload = json.dumps(
        fields,
        sort_keys=True,
        default=repr,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def _clean(name: str, value: Any) -> Any:
    """Arrow/pandas artefacts -> what the request model expects (NaN -> None, 3.0 -> 3 for ints)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if name in INT_OPTIONS and value.is_integer():
            return int(value)
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy scalars
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def record_from_row(
    row: Mapping[str, Any],
    *,
    file: ManifestFile,
    defaults: Mapping[str, Any],
    model_id: str,
    committed: Mapping[str, str] | None = None,
    grounding: str | None = None,
) -> dict[str, Any]:
    """Validate one manifest row into a record (see the module docstring). Never raises for bad rows.

    ``grounding``: the job's ``grounding_id(...)``, part of the key of ``use_grounding_dino`` rows.
    """
    index = int(row["_row"])
    record_id = row_id(row.get(ID_COLUMN), file.name, index)
    raw_url = _clean("image_url", row.get("image_url"))
    prompt = _clean("prompt", row.get("prompt"))
    options = dict(defaults)
    for name in OPTION_NAMES:
        value = _clean(name, row.get(name))
        if value is not None:
            options[name] = value
    error = None
    image_url = raw_url
    if not isinstance(raw_url, str) or not raw_url.strip():
        error = f"invalid request: image_url={raw_url!r}: must be a non-empty path or URI"
    else:
        image_url = resolve_image_url(raw_url.strip(), file.base)
    request: dict[str, Any] | None = None
    if error is None:
        try:
            parsed = parse_request({"prompt": prompt, "image_url": image_url, **options})
            request = parsed.model_dump()
            options = parsed.options()
        except InvalidRequestError as exc:
            error = str(exc)
    key = request_key(
        image_url if isinstance(image_url, str) else repr(image_url),
        prompt,
        options,
        model_id,
        grounding if request is not None and request.get("use_grounding_dino") else None,
    )
    status = "error" if error else ""
    stale = False
    if committed is not None and record_id in committed:
        status, stale = "skip", committed[record_id] != key
    return {
        "id": record_id,
        "key": key,
        "image_url": image_url if isinstance(image_url, str) else None,
        "prompt": prompt if isinstance(prompt, str) else None,
        "request": request,
        "status": status,
        "error": error,
        "stale": stale,
        "file": file.name,
        "row": index,
    }
