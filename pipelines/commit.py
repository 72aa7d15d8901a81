"""Output layout and writing the commit record (``evf.pipelines.metadata`` reads it back).

Under the output URI::

    masks/<name>.png                 the mask (or the RGBA image when mask_only is false)
    overlays/<name>.jpg              the mask drawn over its image (``overlays: true`` only)
    metadata/part-<hash>.parquet     one file per committed batch (the commit record)
    metadata/compact-<hash>.parquet  many part files merged by ``evf.pipelines.compact``
    _job.json                        config used, counts and timings of the last run
    runs/<run_id>.json               the same record for every run

``<name>`` is the row's ``key`` (``mask_name: key``, the default) or its id made safe as a path
(``mask_name: id``, :func:`id_name`); :meth:`OutputLayout.mask_uri` is the one rule, and the
metadata's ``mask_url`` records where each mask went.

A row is *committed* once its metadata row exists. A batch's masks are written first and its
metadata file after them, in one object (atomic on object stores; temp file + rename locally), so a
metadata row never points at a missing mask. The file name is a hash of the batch's ids: a retried
task rewrites the same file instead of adding a second one. A row committed again (a retried error
row, or a row a crashed run's orphaned workers committed while the next run redid it) is a second
row for its id; readers keep the newest (``evf.pipelines.metadata``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import string
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from evf.errors import UserError
from evf.io import ImageWriteError, write_bytes
from evf.pipelines.rows import INSTANCE_TYPE, OPTION_TYPES, RLE_TYPE, JobRow
from evf.request import OPTION_NAMES
from evf.result import SegmentResult
from evf.retry import RetryPolicy
from evf.storage import Storage, describe_error, display_url, join_uri, open_filesystem, shown_uri

log = logging.getLogger(__name__)

__all__ = [
    "METADATA_SCHEMA",
    "JobOutput",
    "OutputError",
    "OutputLayout",
    "check_output_writable",
    "clear_outputs",
    "id_name",
    "metadata_table",
    "write_metadata",
]

METADATA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("key", pa.string()),
        ("image_url", pa.string()),
        ("prompt", pa.string()),
        *[(name, OPTION_TYPES[name]) for name in OPTION_NAMES],
        ("status", pa.string()),
        ("error", pa.string()),
        ("retryable", pa.bool_()),
        ("reason", pa.string()),
        ("mask_url", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("area", pa.int64()),
        ("bbox", pa.list_(pa.int32(), 4)),
        ("score", pa.float32()),
        ("presence_logit", pa.float32()),
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
(null on rows whose options were invalid). ``retryable``: an ``error`` row whose cause was transient
(storage down, throttled): a re-run retries it. ``reason``: why an ``empty`` row is empty when a bar
made it so (``min_score``/``min_area``). ``presence_logit``: SAM 2's object-presence logit."""


_SAFE_CHARACTERS = frozenset(string.ascii_letters + string.digits + "._-")
_WINDOWS_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))]
)
_OUTPUT_SUFFIXES = (".png", ".jpg")  # a file's suffix never ends a folder's name
MAX_NAME_SEGMENT = 150
"""Longest path segment :func:`id_name` keeps (file systems allow 255 bytes, with the suffixes)."""
MAX_NAME = 600
"""Longest name :func:`id_name` keeps (S3 keys hold 1024 bytes, the output's prefix included)."""
_CLIPPED_NAME = 100  # the readable part kept of a name that is too long
_HASH_MARK = "~"  # never in an encoded id (escaped as %7E), so a hashed name never equals a plain one


def _escape(text: str) -> str:
    """``text`` with every character outside ``[A-Za-z0-9._-]`` percent-encoded (its UTF-8 bytes)."""
    return "".join(
        c if c in _SAFE_CHARACTERS else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for c in text
    )


def _safe_segment(text: str, last: bool) -> str:
    """One ``/``-separated part of an id as a path segment any file system or object store takes."""
    segment = _escape(text)
    if segment in (".", ".."):
        return segment.replace(".", "%2E")
    if segment.endswith("."):  # Windows drops a trailing dot
        segment = segment[:-1] + "%2E"
    if segment.split(".", 1)[0].upper() in _WINDOWS_DEVICES:  # CON, NUL.txt, com1...: device names
        segment = f"%{ord(segment[0]):02X}{segment[1:]}"
    if not last and segment.lower().endswith(_OUTPUT_SUFFIXES):  # folder "a.png/" beside file "a.png"
        segment = f"{segment[:-4]}%2E{segment[-3:]}"
    return segment


def id_name(row_id: str) -> str:
    """A row's id as the relative name of its outputs (``masks/<name>.png``), safe and one-to-one.

    ``/`` separates folders where both sides are non-empty; every character outside
    ``[A-Za-z0-9._-]`` is percent-encoded (so is a ``/`` that would make an absolute path or an empty
    segment), ``.`` and ``..`` segments, trailing dots and Windows device names (``CON``) are encoded
    too: the name always stays under its folder, and percent-decoding it gives the id back. Two ids
    never share a name, also on case-insensitive file systems: an id with an upper-case letter gets
    ``~`` and 16 hex digits of its SHA-256; so does a name too long for file systems (a segment over
    ``MAX_NAME_SEGMENT`` or a name over ``MAX_NAME`` characters), kept to its first 100 characters.
    """
    parts = row_id.split("/")
    pieces: list[str] = []
    for index, part in enumerate(parts):
        if index:
            pieces.append("/" if parts[index - 1] and part else "%2F")
        pieces.append(_safe_segment(part, last=index == len(parts) - 1))
    name = "".join(pieces)
    too_long = len(name) > MAX_NAME or any(len(s) > MAX_NAME_SEGMENT for s in name.split("/"))
    if not too_long and name and not any(c in string.ascii_uppercase for c in row_id):
        return name
    if too_long:
        name = name.replace("/", "%2F")[:_CLIPPED_NAME]
        escape = name.rfind("%", len(name) - 2)
        name = name[:escape] if escape >= 0 else name  # never half an escape
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{name}{_HASH_MARK}{digest}"


@dataclass(frozen=True)
class OutputLayout:
    """Where a job's outputs go under ``root``. ``mask_name``: a row's outputs are named by its
    ``key`` or its ``id`` (:func:`id_name`); ``overlays``: the job also writes ``overlays/``."""

    root: str
    mask_name: Literal["key", "id"] = "key"
    overlays: bool = False

    @property
    def masks(self) -> str:
        return join_uri(self.root, "masks")

    @property
    def overlay_folder(self) -> str:
        return join_uri(self.root, "overlays")

    @property
    def metadata(self) -> str:
        return join_uri(self.root, "metadata")

    @property
    def job_json(self) -> str:
        return join_uri(self.root, "_job.json")

    def run_json(self, run_id: str) -> str:
        return join_uri(self.root, "runs", f"{run_id}.json")

    def output_name(self, key: str, row_id: str) -> str:
        """The relative name of a row's outputs (no suffix): its key, or its id made safe."""
        return key if self.mask_name == "key" else id_name(row_id)

    def mask_uri(self, key: str, row_id: str) -> str:
        """Where a row's mask goes: ``masks/<name>.png`` (the one rule; ``mask_url`` records it)."""
        return join_uri(self.root, "masks", f"{self.output_name(key, row_id)}.png")

    def overlay_uri(self, key: str, row_id: str) -> str:
        """Where a row's overlay goes: ``overlays/<name>.jpg``, the mask's name."""
        return join_uri(self.root, "overlays", f"{self.output_name(key, row_id)}.jpg")

    def metadata_uri(self, ids: Iterable[str]) -> str:
        digest = hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()[:24]
        return join_uri(self.root, "metadata", f"part-{digest}.parquet")


@dataclass(frozen=True)
class JobOutput:
    """Where and as what a run commits rows: shared by every stage that writes metadata.

    ``counters``: the run's ``evf.pipelines.progress.RunCounters`` actor (None outside a job), told the
    statuses of each commit so the driver can show progress.
    """

    layout: OutputLayout
    storage: Storage
    model_id: str
    run_id: str
    counters: Any = None

    def _row(self, row: JobRow, status: str, error: str | None, retryable: bool = False) -> dict[str, Any]:
        return {
            "id": row.id,
            "key": row.key,
            "image_url": display_url(row.image_url),
            "prompt": row.request.prompt,
            **row.request.options(),
            "status": status,
            "error": error,
            "retryable": retryable if status == "error" else None,
            "model_id": self.model_id,
            "elapsed_ms": row.elapsed_ms,
            "run_id": self.run_id,
            "manifest_file": row.manifest_file,
            "manifest_row": row.manifest_row,
        }

    def error_row(self, row: JobRow, error: str, retryable: bool = False) -> dict[str, Any]:
        """The metadata row of a row that failed after it was read (image, model or write);
        ``retryable`` when the cause was transient (a re-run retries it)."""
        return self._row(row, "error", error, retryable)

    def result_row(self, row: JobRow, result: SegmentResult) -> dict[str, Any]:
        """The metadata row of a finished row: the result's record (``evf.result``) and the job's
        columns. ``instances`` are the model stage's (encoded there, once)."""
        record = result.record()
        return {
            **self._row(row, record.pop("status"), None),
            **record,
            "mask_url": self.layout.mask_uri(row.key, row.id),
            "instances": row.instances,
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
            "retryable": False,
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
            write_metadata(self.layout, rows, self.storage.options(uri), self.storage.commit_retry)
        counts = {**Counter(str(r["status"]) for r in rows), **{k: v for k, v in extra_counts.items() if v}}
        if self.counters is not None and counts:
            self.counters.add.remote(counts)


def metadata_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=METADATA_SCHEMA)


def write_metadata(
    layout: OutputLayout,
    rows: Sequence[Mapping[str, Any]],
    storage_options: Mapping[str, Any] | None,
    retry: RetryPolicy | None = None,
) -> str:
    """Write one batch's metadata rows as one Parquet object (the commit), transient faults retried
    as ``retry`` says. Returns its URI."""
    table = metadata_table(rows)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    uri = layout.metadata_uri(str(r["id"]) for r in rows)
    write_bytes(uri, buffer.getvalue(), storage_options, retry)
    return uri


def clear_outputs(layout: OutputLayout, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete ``metadata/`` (the commit records first), then ``masks/``, ``overlays/``, ``_job.json``
    and ``runs/``."""
    folders = (layout.masks, layout.overlay_folder, layout.job_json, join_uri(layout.root, "runs"))
    for uri in (layout.metadata, *folders):
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


class OutputError(UserError, OSError):
    """The output cannot be written (read-only, a file, no such bucket, access denied): a user error,
    found before Ray starts."""


def _missing_top(path: str) -> str | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet, or None."""
    top = None
    while path and not os.path.lexists(path):
        top, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return top


def check_output_writable(root: str, storage: Storage) -> None:
    """Write and delete a small probe object, ``<root>/_evf-write-check-<uuid>``, so that an output that
    cannot be written fails in seconds, before Ray or the model start (and in ``--dry-run``). A local
    output that is a file is refused; folders the probe had to create are removed again.

    Raises :class:`OutputError` naming the output and the storage's cause, in one line.
    """
    shown = shown_uri(root)
    fs, path = open_filesystem(root, storage.options(root))
    local = isinstance(fs, LocalFileSystem)
    if local and os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"output {shown!r} is a file, not a folder (a folder path is created when missing)")
    created = _missing_top(path) if local else None
    probe = join_uri(root, f"_evf-write-check-{uuid.uuid4().hex[:12]}")
    try:
        write_bytes(probe, b"evf write check\n", storage.options(probe), storage.retry)
    except ImageWriteError as error:
        cause = error.__cause__ or error
        text = describe_error(cause, storage.options(root))
        if isinstance(cause, FileNotFoundError) and not local and str(cause):  # "no such bucket"
            text = describe_error(OSError(str(cause)), storage.options(root)).removeprefix("OSError: ")
        raise OutputError(f"output {shown!r} is not writable: {text}") from None
    try:
        probe_fs, probe_path = open_filesystem(probe, storage.options(probe))
        probe_fs.rm_file(probe_path)
    except Exception as error:  # the job only writes (--overwrite deletes): not a reason to stop
        log.warning("could not delete the write check %s: %s", shown_uri(probe), describe_error(error))
    if created is not None:  # leave no empty folders behind (a dry run writes nothing)
        folder = os.path.dirname(os.path.join(path, "probe"))
        while True:
            try:
                os.rmdir(folder)
            except OSError:
                break
            if folder == created:
                break
            folder = os.path.dirname(folder)
