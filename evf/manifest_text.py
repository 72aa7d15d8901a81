"""CSV and JSON Lines manifest files: read in chunks of whole lines, whose byte ranges the scan
records (``scan_text``), so a read task seeks to its rows (``read_text_rows``); parse errors name the
file and the line; a CSV cell of a request option becomes the option's type (``text_value``)."""

from __future__ import annotations

import contextlib
import csv
import json
import re
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json

from evf.manifest_file import (
    ID_COLUMN,
    ROW_ERROR,
    ManifestError,
    ManifestFile,
    decoded_rows,
    id_strings,
    job_columns,
    parent_folder,
    row_id,
)
from evf.request import OPTION_NAMES, SegmentRequest
from evf.storage import open_filesystem

__all__ = ["TEXT_CHUNK_BYTES", "read_text_rows", "scan_text", "text_value"]

TEXT_CHUNK_BYTES = 1 << 20
"""About how many bytes of a CSV or JSON Lines file one chunk holds: what a read task parses to
reach its rows, as a row group is for Parquet (a read task seeks to its chunks, never rereads the
file from its start)."""
_BOM = b"\xef\xbb\xbf"
_CSV_RETRIES = 8  # times a CSV chunk's end is moved when it may lie inside a quoted value
_CSV_ROW = re.compile(r"CSV parse error: Row #(\d+): ")
_JSON_TYPES = (
    pa.types.is_null,
    pa.types.is_boolean,
    pa.types.is_int64,
    pa.types.is_float64,
    pa.types.is_string,
)

_Parsed = pa.Table | list[dict[str, Any]]
"""A parsed chunk: an Arrow table, or (JSON Lines Arrow does not take as typed) one dict per line."""


class _LineError(Exception):
    """Line ``index`` (from 0 within its chunk) of a text file cannot be read."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def scan_text(
    handle: Any, kind: str, uri: str, name: str, mapping: Mapping[str, str], shown: str
) -> tuple[ManifestFile, pa.Array]:
    """One pass over a CSV or JSON Lines file: its columns, its chunks (bytes, first line, rows) and
    its ids. No more than one chunk's rows are held at a time."""
    pending = handle.read(TEXT_CHUNK_BYTES)
    offset = len(_BOM) if pending.startswith(_BOM) else 0
    pending, line, header = pending[offset:], 1, ()
    candidates = tuple(dict.fromkeys((mapping.get(ID_COLUMN, ID_COLUMN), ID_COLUMN)))
    if kind == "csv":
        while b"\n" not in pending and (more := handle.read(TEXT_CHUNK_BYTES)):
            pending += more
        cut = pending.find(b"\n") + 1 or len(pending)
        header = _csv_header(pending[:cut], shown)
        columns, renamed, _ = job_columns(header, mapping, shown)  # before reading the rows
        candidates = (dict(renamed).get(ID_COLUMN, ID_COLUMN),) if ID_COLUMN in columns else ()
        pending, offset, line = pending[cut:], offset + cut, 2
    own: dict[str, None] = dict.fromkeys(header)
    ids: dict[str, list[pa.Array]] = {c: [] for c in candidates}
    offsets, lines, rows = [offset], [], []
    first = 0  # the chunk's first row
    for end, first_line, parsed in _chunks(handle, kind, header, pending, offset, line, shown):
        for column in candidates:
            ids[column].append(_chunk_ids(parsed, column, name, first))
        if isinstance(parsed, pa.Table):
            own.update(dict.fromkeys(parsed.column_names))
        else:
            for row in parsed:
                own.update(dict.fromkeys(row))
        offsets.append(end)
        lines.append(first_line)
        rows.append(_count(parsed))
        first += rows[-1]
    num_rows = first
    if kind == "csv" or num_rows:
        columns, renamed, _ = job_columns(tuple(own), mapping, shown)
    else:  # a JSON Lines file without rows: no columns to check
        columns, renamed = (), ()
    id_name = dict(renamed).get(ID_COLUMN, ID_COLUMN) if ID_COLUMN in columns else None
    if id_name is None:
        file_ids = id_strings(None, name, num_rows)
    else:
        file_ids = pa.concat_arrays(ids[id_name]) if ids[id_name] else pa.array([], pa.string())
    file = ManifestFile(
        uri,
        name,
        parent_folder(uri),
        num_rows,
        columns,
        tuple(rows),
        renamed,
        kind,
        tuple(offsets),
        tuple(lines),
        header,
    )
    return file, file_ids


def _csv_header(data: bytes, shown: str) -> tuple[str, ...]:
    """The column names of a CSV file's first line."""
    if not data.strip():
        raise ManifestError(f"manifest file {shown!r} line 1: no header line (the column names)")
    try:
        table = pa_csv.read_csv(
            pa.BufferReader(_arrow_buffer(data)), read_options=pa_csv.ReadOptions(use_threads=False)
        )
    except pa.ArrowInvalid as error:
        raise ManifestError(f"manifest file {shown!r} line 1: cannot read the header ({error})") from None
    names = tuple(table.column_names)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ManifestError(f"manifest file {shown!r} line 1: column(s) {', '.join(twice)} named twice")
    return names


def _chunks(
    handle: Any, kind: str, header: Sequence[str], pending: bytes, offset: int, line: int, shown: str
) -> Iterator[tuple[int, int, _Parsed]]:
    """(end offset, first line, rows) of each chunk of whole lines from byte ``offset`` (line
    ``line``) on; ``pending`` holds the bytes already read from there."""
    eof = False
    while True:
        while not eof and len(pending) < TEXT_CHUNK_BYTES:
            more = handle.read(TEXT_CHUNK_BYTES)
            eof, pending = not more, pending + more
        if not pending:
            return
        tries, forced = 0, 0
        while True:
            cut, forced = forced or (len(pending) if eof else _cut(pending, kind)), 0
            if not cut:  # no line ends in what is held: read on
                more = handle.read(TEXT_CHUNK_BYTES)
                eof, pending = not more, pending + more
                continue
            data = pending[:cut]
            parsed: _Parsed = []
            error: Exception | None = None
            try:
                parsed = _parse_chunk(kind, data, header)
            except (pa.ArrowInvalid, _LineError) as caught:
                error = caught
            # A CSV chunk's end may lie inside a quoted value (a stray quote upsets the count of
            # quotes): then its last row fails or ends in that newline. End it before its last
            # record instead, or where none is whole, read on.
            if kind == "csv" and not (eof and cut == len(pending)) and (error or _ends_open(parsed)):
                if tries < _CSV_RETRIES:
                    tries += 1
                    forced = _record_end(data)
                    if not 0 < forced < cut:
                        more = handle.read(TEXT_CHUNK_BYTES)
                        eof, pending, forced = not more, pending + more, 0
                    continue
                error = error or ValueError("a quoted value does not end (a stray or missing quote?)")
            if error is not None:
                raise _text_error(error, data, line, shown) from None
            break
        yield offset + cut, line, parsed
        offset, line, pending = offset + cut, line + data.count(b"\n"), pending[cut:]


def _cut(data: bytes, kind: str) -> int:
    """Where a chunk of ``data`` (which starts with a record) ends: after its last newline; for CSV
    the last one after an even number of quotes, when there is one. 0: no newline."""
    if kind != "csv" or b'"' not in data:
        return data.rfind(b"\n") + 1
    raw = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(raw == 10) + 1
    if not len(ends):
        return 0
    quotes = np.cumsum(raw == 34, dtype=np.uint8)  # parity survives the wrap-around
    outside = ends[quotes[ends - 1] % 2 == 0]
    return int(outside[-1] if len(outside) else ends[-1])


def _record_end(data: bytes) -> int:
    """Where the last CSV record of ``data`` before the one its end may cut ends, as Python's ``csv``
    reads the records (0: none)."""
    lines = data.split(b"\n")
    ends = np.cumsum([len(text) + 1 for text in lines])
    records: list[int] = []
    with contextlib.suppress(csv.Error):
        reader = csv.reader(text.decode("utf-8", "replace") + "\n" for text in lines)
        for fields in reader:
            if fields:
                records.append(int(ends[reader.line_num - 1]))
    return records[-2] if len(records) > 1 else 0


def _ends_open(parsed: _Parsed) -> bool:
    """Whether a CSV chunk's last row has a value ending in a newline (the chunk's own last byte, when
    the chunk ended inside a quoted value)."""
    if not isinstance(parsed, pa.Table) or not parsed.num_rows:
        return False
    last = parsed.slice(parsed.num_rows - 1)
    values = [pc.cast(column, pa.binary())[0].as_py() for column in last.columns]
    return any(value is not None and value.endswith(b"\n") for value in values)


def _parse_chunk(
    kind: str, data: bytes, header: Sequence[str], include: Sequence[str] | None = None
) -> _Parsed:
    return _read_csv_chunk(data, header, include) if kind == "csv" else _read_jsonl_chunk(data)


def _read_csv_chunk(data: bytes, header: Sequence[str], include: Sequence[str] | None = None) -> pa.Table:
    """CSV lines (no header) as text columns (``include``: only those), an empty cell null."""
    names = list(header)
    if not data.strip():
        return pa.table({n: pa.array([], pa.string()) for n in (include if include is not None else names)})
    convert = pa_csv.ConvertOptions(
        column_types={n: pa.string() for n in names},
        check_utf8=False,  # bad bytes fail their rows (decoded_rows), not the file
        strings_can_be_null=True,
        null_values=[""],
    )
    if include is not None:
        convert.include_columns = list(include)
    return pa_csv.read_csv(
        pa.BufferReader(_arrow_buffer(data)),
        read_options=pa_csv.ReadOptions(use_threads=False, column_names=names, block_size=_block_size(data)),
        parse_options=pa_csv.ParseOptions(newlines_in_values=True),
        convert_options=convert,
    )


def _read_jsonl_chunk(data: bytes) -> _Parsed:
    """JSON Lines: Arrow's reader where the types it gives are the values' own (null, boolean,
    integer, number, text); else (a column whose type changes from line to line, text Arrow takes
    for a timestamp, nested values) Python's ``json``, line by line, values as given. A line that is
    not a JSON object raises ``_LineError``."""
    if not data.strip():
        return []
    with contextlib.suppress(pa.ArrowInvalid):
        table = pa_json.read_json(
            pa.BufferReader(_arrow_buffer(data)),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=_block_size(data)),
        )
        if all(any(check(t) for check in _JSON_TYPES) for t in table.schema.types):
            return table
    rows: list[dict[str, Any]] = []
    for index, text in enumerate(data.split(b"\n")):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise _LineError(index, f"not valid JSON ({error.msg} at column {error.colno})") from None
        except UnicodeDecodeError as error:
            raise _LineError(index, f"not valid UTF-8 ({error.reason} at column {error.start + 1})") from None
        if not isinstance(value, dict):
            shown = text[:60].decode("utf-8", "replace").strip()
            raise _LineError(index, f"not a JSON object: {shown!r}")
        rows.append(value)
    return rows


def _text_error(error: Exception, data: bytes, line: int, shown: str) -> ManifestError:
    """A ``ManifestError`` naming the file and the line that a chunk's parse error points at."""
    detail, where = str(error), f"near line {line}"
    if isinstance(error, _LineError):
        where = f"line {line + error.index}"
    elif match := _CSV_ROW.search(detail):  # Arrow counts the chunk's records
        where, detail = f"line {line + _record_line(data, int(match[1]))}", detail[match.end() :]
    return ManifestError(f"manifest file {shown!r} {where}: {detail}")


def _record_line(data: bytes, record: int) -> int:
    """The line (from 0) on which CSV record ``record`` (from 1, empty lines left out, as Arrow counts
    them) of ``data`` starts; Python's ``csv`` finds where records span lines."""
    previous = 0
    with contextlib.suppress(csv.Error):
        reader = csv.reader(part + "\n" for part in data.decode("utf-8", "replace").split("\n"))
        seen = 0
        for fields in reader:
            seen += bool(fields)
            if seen == record:
                return previous
            previous = reader.line_num
    return previous


def _block_size(data: bytes) -> int:
    return min(max(len(data) + 1, 1 << 16), 1 << 30)  # the chunk in one block


def _arrow_buffer(data: bytes) -> pa.Buffer:
    """``data`` copied into Arrow's own memory. Arrow's readers pass their input to pool threads, and
    a buffer wrapping a Python object could be released there as the interpreter exits (the abort
    ``evf.parquet`` avoids for Parquet)."""
    buffer = pa.allocate_buffer(len(data))
    np.frombuffer(buffer, np.uint8)[:] = np.frombuffer(data, np.uint8)
    return buffer


def _count(parsed: _Parsed) -> int:
    return parsed.num_rows if isinstance(parsed, pa.Table) else len(parsed)


def _chunk_ids(parsed: _Parsed, column: str, name: str, first: int) -> pa.Array:
    """The ids of a chunk's rows, rows ``first..`` of the file, from ``column`` (``row_id``'s rule)."""
    if isinstance(parsed, pa.Table):
        values = parsed.column(column) if column in parsed.column_names else None
        return id_strings(values, name, parsed.num_rows, first)
    return pa.array([row_id(row.get(column), name, first + i) for i, row in enumerate(parsed)], pa.string())


def read_text_rows(
    file: ManifestFile,
    start: int,
    stop: int,
    columns: Sequence[str],
    storage_options: Mapping[str, Any] | None,
) -> Iterator[dict[str, Any]]:
    """``read_rows`` of a CSV or JSON Lines file: the chunks that hold rows ``start..stop-1``."""
    fs, path = open_filesystem(file.uri, storage_options)
    columns = [c for c in columns if c in file.columns]
    sources = [file.source_column(c) for c in columns]
    with fs.open(path, "rb") as handle:
        offset = 0
        for chunk, count in enumerate(file.row_groups):
            begin, end = offset, offset + count
            offset = end
            if end <= start or begin >= stop:
                continue
            lo, hi = max(start, begin), min(stop, end)
            try:
                handle.seek(file.offsets[chunk])
                data = handle.read(file.offsets[chunk + 1] - file.offsets[chunk])
                include = list(dict.fromkeys(sources)) if file.format == "csv" else None
                parsed = _parse_chunk(file.format, data, file.header, include)
                if _count(parsed) != count:
                    raise ValueError(f"{_count(parsed)} rows where the manifest's scan found {count}")
            except Exception as error:  # e.g. the file changed since the scan
                message = (
                    f"manifest file {file.name!r} rows {lo}..{hi - 1} (from line {file.lines[chunk]}) "
                    f"cannot be read ({type(error).__name__}: {error})"
                )
                for index in range(lo, hi):
                    yield {ID_COLUMN: None, "_row": index, ROW_ERROR: message}
                continue
            if isinstance(parsed, pa.Table):
                part = parsed.slice(lo - begin, hi - lo)
                have = set(part.column_names)
                table = pa.table(
                    {
                        c: part.column(s) if s in have else pa.nulls(hi - lo)
                        for c, s in zip(columns, sources, strict=True)
                    }
                )
                rows = decoded_rows(table, file.name, lo) if columns else [{} for _ in range(hi - lo)]
            else:
                rows = [
                    {c: row.get(s) for c, s in zip(columns, sources, strict=True)}
                    for row in parsed[lo - begin : hi - begin]
                ]
            for index, row in enumerate(rows):
                if file.format == "csv":
                    for column in columns:
                        if column in _OPTION_KINDS:
                            row[column] = text_value(column, row[column])
                row["_row"] = lo + index
                yield row


def _option_kind(name: str) -> type:
    annotation = SegmentRequest.model_fields[name].annotation
    kinds = typing.get_args(annotation) or (annotation,)
    return next((kind for kind in (bool, int, float) if kind in kinds), str)


_OPTION_KINDS: dict[str, type] = {name: _option_kind(name) for name in OPTION_NAMES}
_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def text_value(name: str, value: Any) -> Any:
    """A CSV cell of request option ``name`` as the option's type: ``true``/``false``/``1``/``0`` (any
    case) for a boolean, ``3`` (or ``3.0``) for an integer, ``0.5`` for a number; blank: None (the
    job's default). Text that is none of these comes back as it is, for validation to reject naming
    the field; so does a value of any other column."""
    kind = _OPTION_KINDS.get(name)
    if kind is None or not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return None
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "1"):
            return True
        return False if lowered in ("false", "0") else value
    if kind is int and _INTEGER.fullmatch(text):
        return int(text)
    if kind in (int, float) and _NUMBER.fullmatch(text):
        number = float(text)
        if kind is float:
            return number
        return int(number) if number.is_integer() else value
    return value
