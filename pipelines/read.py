"""Stage 0: read the manifest, validate each row once, and keep only the rows that need the model.

Each read task reads a row range of one manifest file (row positions give derived ids, see
``evf.manifest``). Every row is validated here, once, into a :class:`evf.pipelines.rows.JobRow`:

- a row already committed under the output is dropped (resume; counted as ``stale`` when its key
  changed since it was committed);
- an invalid row (bad option, missing prompt or URL) is committed as an ``error`` row by the read
  task itself and dropped;
- every other row goes on to the decode stage.

So committed and invalid rows never reach a decode task or a model actor.

A row's ``key`` is a deterministic hash of (image_url, prompt, options, model id, and for
``use_grounding_dino`` rows the GroundingDINO model and thresholds); it names the mask file and
tells whether a committed row is still what the manifest asks for.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from evf.errors import error_text
from evf.manifest import read_embedded_images, read_rows, resolve_url
from evf.manifest_file import ID_COLUMN, IMAGE_COLUMN, REQUIRED_COLUMNS, ROW_ERROR, ManifestFile, row_id
from evf.pipelines.commit import JobOutput
from evf.pipelines.rows import ROW_SCHEMA, JobRow, rows_table
from evf.request import (
    EXTENSION_OPTIONS,
    OPTION_DEFAULTS,
    OPTION_NAMES,
    InvalidRequestError,
    clean_value,
    merge_options,
    parse_request,
    short_repr,
)
from evf.retry import is_retryable

__all__ = [
    "READ_COLUMNS",
    "ReadSettings",
    "grounding_id",
    "make_datasource",
    "parse_row",
    "read_task",
    "request_key",
    "task_ranges",
]

READ_COLUMNS = (ID_COLUMN, *REQUIRED_COLUMNS, *OPTION_NAMES)
_KEY_JSON = json.JSONEncoder(sort_keys=True, default=repr, ensure_ascii=False)
# Rows per read task over committed rows only: such a task only keys its rows (a few us each) to
# tell stale ones, so few large tasks beat many small ones.
COMMITTED_ROWS_PER_TASK = 65_536


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
    return _key(image_url, prompt, _options_json(options), model_id, grounding)


def _options_json(options: Mapping[str, Any]) -> str:
    # Unset extension options are left out, so that they change no existing row's key.
    return _KEY_JSON.encode({k: v for k, v in options.items() if not (k in EXTENSION_OPTIONS and v is None)})


def _key(image_url: str, prompt: Any, options_json: str, model_id: str, grounding: str | None) -> str:
    """sha256 of the JSON of {image_url, model, options, prompt[, grounding]} with sorted keys,
    assembled from its parts so that a read task encodes the options of its rows that set none (the
    job's defaults) once: a resumed run keys millions of committed rows."""
    encode = _KEY_JSON.encode
    head = f'{{"grounding": {encode(grounding)}, ' if grounding is not None else "{"  # keys in sorted order
    payload = (
        f'{head}"image_url": {encode(image_url)}, "model": {encode(model_id)}, '
        f'"options": {options_json}, "prompt": {encode(prompt)}}}'
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


class KeyOptions(NamedTuple):
    """A row's options over the request's defaults, and their JSON as keys hold it. A read task
    makes one for its rows that set no option of their own (the job's defaults)."""

    options: dict[str, Any]
    json: str

    @classmethod
    def of(cls, given: Mapping[str, Any]) -> KeyOptions:
        options = {**OPTION_DEFAULTS, **given}
        return cls(options, _options_json(options))


@dataclass(frozen=True)
class InvalidRow:
    """A manifest row whose request did not validate: what its ``error`` metadata row records."""

    id: str
    key: str
    image_url: Any
    prompt: Any
    error: str
    file: str
    index: int


class RowFields(NamedTuple):
    """A manifest row's values, cleaned but not validated: what its id and key are made of."""

    index: int
    id: str
    image_url: Any
    prompt: Any
    options: Mapping[str, Any]
    own_options: bool  # the row sets an option itself (else ``options`` are the job's defaults)


def row_fields(raw: Mapping[str, Any], file: ManifestFile, defaults: Mapping[str, Any]) -> RowFields:
    """The id and cleaned values of a manifest row; per-row options over the job's ``defaults``."""
    index = int(raw["_row"])
    options, own = merge_options(raw, defaults)  # shared defaults when own is False: never changed
    rid = row_id(raw.get(ID_COLUMN), file.name, index)
    url, prompt = clean_value("image_url", raw.get("image_url")), clean_value("prompt", raw.get("prompt"))
    return RowFields(index, rid, url, prompt, options, own)


def likely_key(
    fields: RowFields, file: ManifestFile, model_id: str, grounding: str | None, defaults: KeyOptions
) -> str | None:
    """The key ``parse_row`` gives this row when it is valid, computed without validating it (a
    resumed run checks millions of committed rows this way). None when the row cannot be keyed so."""
    if not isinstance(fields.image_url, str) or not fields.image_url.strip():
        return None
    options, options_json = KeyOptions.of(fields.options) if fields.own_options else defaults
    image_url = resolve_url(fields.image_url.strip(), file.base)
    return _key(
        image_url, fields.prompt, options_json, model_id, grounding if options["use_grounding_dino"] else None
    )


def parse_row(
    raw: Mapping[str, Any],
    *,
    file: ManifestFile,
    defaults: Mapping[str, Any],
    model_id: str,
    grounding: str | None = None,
) -> JobRow | InvalidRow:
    """Validate one manifest row (as ``evf.manifest.read_rows`` gives it) into a ``JobRow``, or an
    ``InvalidRow`` whose error names every bad field. Never raises for bad rows.

    Per-row options override the job's ``defaults``; null means "the job default".
    ``grounding``: the job's ``grounding_id(...)``, part of the key of ``use_grounding_dino`` rows.
    """
    index, rid, raw_url, prompt, options, _ = row_fields(raw, file, defaults)
    if raw.get(ROW_ERROR):
        key = request_key(repr(raw_url), prompt, options, model_id)
        return InvalidRow(rid, key, raw_url, prompt, raw[ROW_ERROR], file.name, index)
    if not isinstance(raw_url, str) or not raw_url.strip():
        error = f"invalid request: image_url={short_repr(raw_url)}: must be a non-empty path or URI"
        if isinstance(raw_url, (bytes, dict)):  # the image itself: the column the job reads as such
            error += f" (a column of images maps to {IMAGE_COLUMN}: --columns {IMAGE_COLUMN}=COLUMN)"
        key = request_key(repr(raw_url), prompt, options, model_id)
        return InvalidRow(rid, key, raw_url, prompt, error, file.name, index)
    image_url = resolve_url(raw_url.strip(), file.base)
    try:
        request = parse_request({"prompt": prompt, "image_url": image_url, **options})
    except InvalidRequestError as error:
        key = request_key(image_url, prompt, options, model_id)
        return InvalidRow(rid, key, image_url, prompt, str(error), file.name, index)
    key = request_key(
        image_url, prompt, request.options(), model_id, grounding if request.use_grounding_dino else None
    )
    return JobRow(rid, key, image_url, file.name, index, request)


def digests(values: Sequence[str]) -> np.ndarray:
    """64-bit BLAKE2 digests of strings, as uint64."""
    joined = b"".join(hashlib.blake2b(v.encode("utf-8"), digest_size=8).digest() for v in values)
    return np.frombuffer(joined, dtype="<u8")


@dataclass(frozen=True)
class CommittedIndex:
    """The committed rows as sorted 64-bit digests of their ids, with their keys' digests: what read
    tasks look rows up in. 16 bytes a row, shared zero-copy through Ray's object store.

    Why digests: a dict of every committed id would cost each read worker hundreds of MB at millions
    of rows. A digest collision (odds ~1e-5 at ten million rows) would make a new row look committed;
    it would then have no metadata row, and the run's accounting fails it by name, never silently.
    """

    ids: np.ndarray
    keys: np.ndarray

    @classmethod
    def build(cls, table: pa.Table) -> CommittedIndex:
        """From a table with ``id`` and ``key`` columns, read a slice at a time (no Python list of
        every id is ever held)."""
        batches = table.select(["id", "key"]).to_batches(max_chunksize=1 << 16)
        ids = [digests(b.column(0).to_pylist()) for b in batches]
        keys = [digests(b.column(1).to_pylist()) for b in batches]
        id_digests = np.concatenate(ids) if ids else np.zeros(0, "<u8")
        key_digests = np.concatenate(keys) if keys else np.zeros(0, "<u8")
        order = np.argsort(id_digests, kind="stable")
        return cls(id_digests[order], key_digests[order])

    def lookup(self, ids: Sequence[str], keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(committed, stale) bool arrays for these rows: stale = committed with another key."""
        if len(self.ids) == 0 or len(ids) == 0:
            nothing = np.zeros(len(ids), bool)
            return nothing, nothing
        wanted = digests(ids)
        where = np.minimum(np.searchsorted(self.ids, wanted), len(self.ids) - 1)
        committed = self.ids[where] == wanted
        return committed, committed & (self.keys[where] != digests(keys))


@dataclass(frozen=True)
class ReadSettings:
    """What every read task needs: the commit target, the job's defaults and grounding setup, and
    the committed rows: a ``CommittedIndex`` (or an object reference to one), None when none are."""

    output: JobOutput
    defaults: dict[str, Any] = field(default_factory=dict)
    grounding: str | None = None
    committed: Any = None


@functools.lru_cache(maxsize=1)
def _committed_index(reference: Any) -> CommittedIndex:
    """The committed index behind an object reference, fetched once per worker process."""
    import ray

    return ray.get(reference)


@contextmanager
def _cycle_collector_paused() -> Iterator[None]:
    """Python's cycle collector off for a while: a read task makes a few objects per row and no
    cycles, and the collector's full passes over the worker's heap (torch's objects included) cost
    more than the rows' own work on a resume (about 2 of 6 us a row)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_task(file: ManifestFile, start: int, stop: int, settings: ReadSettings) -> pa.Table:
    """Rows ``start..stop-1`` of ``file``: commit the invalid ones, drop the committed ones, return
    the rest as ``ROW_SCHEMA``.

    A committed row is recognised by its id and checked for staleness by a key computed without
    validation (``likely_key``); only rows whose key then differs are validated to be sure.
    """
    with _cycle_collector_paused():
        return _read_task(file, start, stop, settings)


def _read_task(file: ManifestFile, start: int, stop: int, settings: ReadSettings) -> pa.Table:
    output, defaults, model_id = settings.output, settings.defaults, settings.output.model_id
    raws = list(read_rows(file, start, stop, READ_COLUMNS, output.storage.options(file.uri)))
    fields = [row_fields(raw, file, defaults) for raw in raws]
    index = settings.committed
    if index is not None and not isinstance(index, CommittedIndex):
        index = _committed_index(index)
    committed = differs = np.zeros(len(raws), bool)
    if index is not None:
        plain = KeyOptions.of(defaults)
        quick = [likely_key(f, file, model_id, settings.grounding, plain) or "" for f in fields]
        committed, differs = index.lookup([f.id for f in fields], quick)
    todo: list[JobRow] = []
    invalid: list[dict[str, Any]] = []
    stale = 0
    for raw, done, maybe_stale in zip(raws, committed, differs, strict=True):
        if done and not maybe_stale:
            continue
        row = parse_row(raw, file=file, defaults=defaults, model_id=model_id, grounding=settings.grounding)
        if done:
            stale += int(index.lookup([row.id], [row.key])[1][0])  # type: ignore[union-attr]
        elif isinstance(row, InvalidRow):
            invalid.append(
                output.invalid_row(
                    id=row.id,
                    key=row.key,
                    image_url=row.image_url,
                    prompt=row.prompt,
                    error=row.error,
                    file=row.file,
                    index=row.index,
                )
            )
        else:
            todo.append(row)
    if file.embedded and todo:
        todo = _with_embedded_images(file, todo, output, invalid)
    output.commit(invalid, stale=stale)
    return rows_table(todo)


def _with_embedded_images(
    file: ManifestFile, rows: list[JobRow], output: JobOutput, failed: list[dict[str, Any]]
) -> list[JobRow]:
    """``rows`` of a file that embeds its images, each given its image's bytes (or, for an image
    stored as a path, that path as its ``image_url``: the key stays the embedded one's); a row whose
    image cannot be read goes to ``failed`` as an error row (retryable when the cause was transient)."""
    try:
        images = read_embedded_images(file, [r.manifest_row for r in rows], output.storage.options(file.uri))
    except Exception as error:
        images = [error] * len(rows)
    kept = []
    for row, image in zip(rows, images, strict=True):
        if isinstance(image, Exception):
            failed.append(output.error_row(row, error_text(image, "image read failed"), is_retryable(image)))
        else:
            if isinstance(image, str):
                row.image_url = image
            else:
                row.image_bytes = image
            kept.append(row)
    return kept


def task_ranges(
    files: Sequence[ManifestFile], rows_per_task: int, committed: np.ndarray | None = None
) -> list[tuple[ManifestFile, int, int]]:
    """(file, start, stop) of each read task: ``rows_per_task`` rows of a file. ``committed`` (one
    bool per manifest row, files in order) puts the ranges that hold rows to do first: a resumed run
    starts its new rows at once and checks its committed ones while the model works on them."""
    ranges: list[tuple[ManifestFile, int, int]] = []
    firsts: list[int] = []  # each range's first row in the whole manifest
    offset = 0
    for file in files:
        for start in range(0, file.num_rows, rows_per_task):
            ranges.append((file, start, min(start + rows_per_task, file.num_rows)))
            firsts.append(offset + start)
        offset += file.num_rows
    if committed is None or not ranges:
        return ranges
    to_do = np.add.reduceat(~committed, firsts)  # the ranges are contiguous: rows to do in each
    pending = [r for r, n in zip(ranges, to_do, strict=True) if n]
    settled: list[tuple[ManifestFile, int, int]] = []
    for (file, start, stop), n in zip(ranges, to_do, strict=True):
        if n:
            continue
        last = settled[-1] if settled else None
        if last and last[0] is file and last[2] == start and stop - last[1] <= COMMITTED_ROWS_PER_TASK:
            settled[-1] = (file, last[1], stop)
        else:
            settled.append((file, start, stop))
    return pending + settled


def make_datasource(
    ranges: Sequence[tuple[ManifestFile, int, int]], rows_per_block: int, settings: ReadSettings
) -> Any:
    """A Ray Data datasource of the manifest: one read task per range (``task_ranges``), yielding
    its rows to do in blocks of ``rows_per_block`` (so that decode tasks run in parallel)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ManifestSource(Datasource):
        def get_name(self) -> str:
            return "ReadManifest"

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(
            self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
        ) -> list[ReadTask]:
            tasks = []
            for file, start, stop in ranges:
                metadata = BlockMetadata(
                    num_rows=None, size_bytes=None, exec_stats=None, input_files=(file.uri,)
                )
                read = functools.partial(_blocks, file, start, stop, settings, rows_per_block)
                tasks.append(ReadTask(read, metadata, schema=ROW_SCHEMA))
            return tasks

    return ManifestSource()


def _blocks(
    file: ManifestFile, start: int, stop: int, settings: ReadSettings, rows_per_block: int
) -> Iterable[pa.Table]:
    table = read_task(file, start, stop, settings)
    return [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)] or [table]
