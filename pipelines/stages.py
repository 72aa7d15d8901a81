"""The job's stages as plain callables (testable without Ray; Ray Data runs them in tasks and actors).

Data between stages is Arrow with a fixed schema:

- after the read (``ManifestSource``): one row per manifest row, ``image_url``, ``status`` and the
  JSON ``record`` (see ``pipelines.manifest``);
- after ``decode_batch`` (CPU tasks): one row per *unit*: a distinct image of the batch with all
  the records that name it (read, decoded and resized once), or a single image-less unit carrying
  the batch's records that need no model (invalid rows, decode failures, committed rows);
- after ``InferenceStage`` (actors): the same units with the model's masks (packed bits) instead
  of the resized model inputs;
- after ``FinishStage`` (CPU tasks): one row per manifest row (``id``, ``status``, ``stale``) for the
  driver's counts. That stage post-processes, writes the masks and then the batch's metadata file.

Every failure of a row becomes that row's ``error`` status; only a failure to commit (write the
metadata file) fails the task, and with it the job.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from evf.io import decode_image, encode_png, read_bytes, storage_options_for, write_bytes
from evf.request import parse_request
from pipelines.commit import OutputLayout, metadata_row, write_metadata
from pipelines.manifest import ManifestFile, display_url, read_rows, record_from_row

log = logging.getLogger(__name__)

RECORD_SCHEMA = pa.schema([("image_url", pa.string()), ("status", pa.string()), ("record", pa.string())])
UNIT_SCHEMA = pa.schema(
    [
        ("unit", pa.string()),  # JSON: {"records": [...], "width", "height", "sam_shape", "beit3_shape", ...}
        ("image", pa.large_binary()),  # HxWx3 uint8, only when a record needs it (RGBA output, GroundingDINO)
        ("sam", pa.large_binary()),  # PreparedImage.sam_pixels (uint8)
        ("beit3", pa.large_binary()),  # PreparedImage.beit3_pixels (float32)
        ("masks", pa.large_binary()),  # after inference: packed bool (M, H, W)
    ]
)
RESULT_SCHEMA = pa.schema([("id", pa.string()), ("status", pa.string()), ("stale", pa.bool_())])


# --------------------------------------------------------------------------------------------------
# Shared settings (picklable, shipped to every task)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Storage:
    """fsspec options for every URI the job touches, resolved once in the driver.

    ``explicit`` are the config's options; ``s3`` the same completed from the driver's AWS
    environment (so workers started before the variables were set still reach the right endpoint).
    Never logged.
    """

    explicit: dict[str, Any] = field(default_factory=dict)
    s3: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_environment(cls, explicit: Mapping[str, Any] | None) -> Storage:
        explicit = dict(explicit or {})
        return cls(explicit, storage_options_for("s3://bucket", explicit))

    def options(self, uri: str) -> dict[str, Any]:
        if uri[:5].lower() in ("s3://", "s3a:/"):
            return dict(self.s3)
        return storage_options_for(uri, self.explicit)

    def __repr__(self) -> str:  # never print credentials
        return "Storage(<redacted>)"


@dataclass(frozen=True)
class ModelInfo:
    """What the CPU stages need to know about the model (found without loading its weights)."""

    model_id: str
    mode: str
    sam_image_size: int
    beit3_image_size: int
    is_demo_model: bool
    supports_semantic: bool

    def prepare(self, image: np.ndarray) -> tuple[Any, Any]:
        """(sam_pixels, beit3_pixels) exactly as ``EvfSam2Predictor.prepare_image``."""
        from evf.transforms import prepare_beit3, prepare_sam_legacy, prepare_sam_multitask

        prepare_sam = prepare_sam_multitask if self.mode == "multitask" else prepare_sam_legacy
        return prepare_sam(image, self.sam_image_size), prepare_beit3(image, self.beit3_image_size)


def probe_model(model: str, mode: str | None, storage: Storage) -> ModelInfo:
    """Find the model's preprocessing sizes and mode from its config and tokenizer (no weights).

    Falls back to loading the model when the light path fails for any reason.
    """
    from evf.model.checkpoint import DEMO_MODEL_ID, resolve_checkpoint

    folder = resolve_checkpoint(model, storage.options(model))
    try:
        import sam2  # noqa: F401  (initialises Hydra's config module, as build_sam2 needs)
        from hydra import compose

        from evf.model.config import EvfSam2Config
        from evf.tokenizer import EvfTokenizer

        config = EvfSam2Config.from_file(folder / "config.json")
        tokenizer = EvfTokenizer.from_folder(folder)
        sam_config = compose(config_name=config.sam2.config, overrides=list(config.sam2.overrides))
        sam_size = int(sam_config.model.image_size)
        chosen = mode or config.inference_mode or ("multitask" if tokenizer.supports_semantic else "legacy")
        return ModelInfo(
            model,
            chosen,
            sam_size,
            config.beit3.img_size,
            model == DEMO_MODEL_ID,
            tokenizer.supports_semantic,
        )
    except Exception:  # pragma: no cover - depends on checkpoint internals
        log.debug("light model probe failed; loading the model", exc_info=True)
        from evf.predictor import EvfSam2Predictor

        predictor = EvfSam2Predictor.from_pretrained(folder, "cpu", mode=mode)
        return ModelInfo(
            model,
            predictor.mode,
            predictor.model.sam_image_size,
            predictor.model.beit3_image_size,
            model == DEMO_MODEL_ID,
            predictor.supports_semantic,
        )


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc only; a no-op elsewhere).

    Batches of varying image sizes fragment glibc's heap; without this a long-running actor's
    resident memory creeps up with the number of batches it has seen.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _timed_threads(function: Callable[[Any], Any], items: Sequence[Any], threads: int) -> list[Any]:
    """``[function(item)]`` with up to ``threads`` at once; an exception is returned, not raised."""

    def safe(item: Any) -> Any:
        try:
            return function(item)
        except Exception as error:  # reported per row by the caller
            return error

    if threads <= 1 or len(items) <= 1:
        return [safe(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(safe, items))


def _error_text(error: BaseException, where: str) -> str:
    text = str(error) or type(error).__name__
    if not isinstance(error, OSError | ValueError) or type(error).__name__ not in text:
        text = f"{type(error).__name__}: {text}" if str(error) else type(error).__name__
    return f"{where}: {text}"


# --------------------------------------------------------------------------------------------------
# Stage 0: read the manifest (a Ray Data datasource with row positions)
# --------------------------------------------------------------------------------------------------


def read_records(
    file: ManifestFile,
    start: int,
    stop: int,
    *,
    storage: Storage,
    defaults: Mapping[str, Any],
    model_id: str,
    committed: Any = None,
    grounding: str | None = None,
) -> pa.Table:
    """Rows ``start..stop-1`` of a manifest file as validated records (``RECORD_SCHEMA``).

    ``grounding``: ``pipelines.manifest.grounding_id(...)`` of the job (part of GroundingDINO rows' keys).
    """
    if committed is not None and not isinstance(committed, Mapping):
        import ray

        committed = _get_cached(committed, ray.get)
    urls, statuses, payloads = [], [], []
    for row in read_rows(file, start, stop, storage.options(file.uri)):
        record = record_from_row(
            row, file=file, defaults=defaults, model_id=model_id, committed=committed, grounding=grounding
        )
        urls.append(record["image_url"])
        statuses.append(record["status"])
        payloads.append(json.dumps(record))
    return pa.table([urls, statuses, payloads], schema=RECORD_SCHEMA)


_CACHE: dict[Any, Any] = {}


def _get_cached(ref: Any, getter: Callable[[Any], Any]) -> Any:
    """The committed-id map behind an object ref, fetched once per worker process."""
    key = ref.hex() if hasattr(ref, "hex") else id(ref)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = getter(ref)
    return _CACHE[key]


def make_datasource(
    files: Sequence[ManifestFile], *, rows_per_task: int, **read_kwargs: Any
) -> Any:  # a ray.data Datasource
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ManifestSource(Datasource):
        """Each read task reads a row range of one manifest file (row positions give derived ids)."""

        def get_name(self) -> str:
            return "ReadManifest"

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
            tasks = []
            for file in files:
                for start in range(0, file.num_rows, rows_per_task):
                    stop = min(start + rows_per_task, file.num_rows)
                    metadata = BlockMetadata(
                        num_rows=stop - start, size_bytes=None, exec_stats=None, input_files=(file.uri,)
                    )
                    read = functools.partial(_read_task, file, start, stop, read_kwargs)
                    tasks.append(ReadTask(read, metadata, schema=RECORD_SCHEMA))
            return tasks

    return ManifestSource()


def _read_task(file: ManifestFile, start: int, stop: int, kwargs: dict[str, Any]) -> Iterable[pa.Table]:
    return [read_records(file, start, stop, **kwargs)]


# --------------------------------------------------------------------------------------------------
# Stage 1: fetch + decode + resize, once per distinct image of the batch (CPU tasks)
# --------------------------------------------------------------------------------------------------


def _needs_image(record: Mapping[str, Any]) -> bool:
    request = record.get("request") or {}
    return request.get("mask_only") is False or bool(request.get("use_grounding_dino"))


def decode_batch(table: pa.Table, *, model: ModelInfo, storage: Storage, io_threads: int = 8) -> pa.Table:
    """Group the batch's rows by image, read/decode/resize each image once (``UNIT_SCHEMA`` out)."""
    records = [json.loads(text) for text in table.column("record").to_pylist()]
    passthrough = [r for r in records if r["status"]]
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if not record["status"]:
            groups.setdefault(record["image_url"], []).append(record)
    urls = list(groups)
    started = time.perf_counter()
    fetched = _timed_threads(lambda url: read_bytes(url, storage.options(url)), urls, io_threads)
    fetch_ms = (time.perf_counter() - started) * 1000 / max(1, len(urls))
    columns: dict[str, list[Any]] = {name: [] for name in UNIT_SCHEMA.names}
    for url, data in zip(urls, fetched, strict=True):
        group = groups[url]
        t0 = time.perf_counter()
        try:
            if isinstance(data, BaseException):
                raise data
            image = decode_image(data, url)
            sam, beit3 = model.prepare(image)
        except Exception as error:
            where = "read" if isinstance(data, BaseException) else "decode"
            for record in group:
                record.update(status="error", error=_error_text(error, f"image {where} failed"))
            passthrough.extend(group)
            continue
        share = (fetch_ms + (time.perf_counter() - t0) * 1000) / len(group)
        for record in group:
            record["elapsed_ms"] = share
        sam_np, beit3_np = sam.numpy(), beit3.numpy()
        unit = {
            "records": group,
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "sam_shape": list(sam_np.shape),
            "sam_dtype": str(sam_np.dtype),
            "beit3_shape": list(beit3_np.shape),
        }
        columns["unit"].append(json.dumps(unit))
        columns["image"].append(image.tobytes() if any(_needs_image(r) for r in group) else None)
        columns["sam"].append(sam_np.tobytes())
        columns["beit3"].append(np.ascontiguousarray(beit3_np, dtype=np.float32).tobytes())
        columns["masks"].append(None)
    if passthrough:
        columns["unit"].append(json.dumps({"records": passthrough}))
        for name in ("image", "sam", "beit3", "masks"):
            columns[name].append(None)
    result = pa.table(columns, schema=UNIT_SCHEMA)
    del columns, fetched
    release_memory()
    return result


# --------------------------------------------------------------------------------------------------
# Stage 2: the model (an actor pool; each actor loads the model once)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceSettings:
    model: str
    device: str = "cpu"
    dtype: str = "float32"
    mode: str | None = None
    torch_threads: int | None = None
    compile: bool = False
    grounding_model: str | None = None
    box_threshold: float = 0.35
    text_threshold: float = 0.25


def _pack(masks: Sequence[np.ndarray]) -> bytes:
    return np.packbits(np.stack(masks).astype(bool, copy=False), axis=None).tobytes()


def _unpack(data: bytes, count: int, height: int, width: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, np.uint8), count=count * height * width)
    return bits.reshape(count, height, width).astype(bool)


class InferenceStage:
    """Ray Data callable class: loads the model in ``__init__``; one ``infer_masks`` call per batch.

    A batch that fails inside the model is retried image by image, then row by row, so that one
    bad item costs only its own row.
    """

    def __init__(self, settings: InferenceSettings, storage: Storage) -> None:
        import torch

        from evf.predictor import EvfSam2Predictor

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.storage = storage
        self.predictor = EvfSam2Predictor.from_pretrained(
            settings.model,
            settings.device,
            getattr(torch, settings.dtype),
            settings.mode,
            compile=settings.compile,
            storage_options=storage.options(settings.model),
        )
        if self.predictor.is_demo_model:
            log.warning(
                "model %s is the shipped synthetic demo model: it knows coloured shapes only. For real "
                "images use --model YxZhang/evf-sam2-multitask (Hub), a checkpoint folder or s3://...",
                settings.model,
            )
        self._detector: Any = None
        self._detector_error: str | None = None
        self.batches = 0

    # -- GroundingDINO (loaded only when a batch needs it) ------------------------------------
    def _get_detector(self) -> Any:
        if self._detector is not None or self._detector_error is not None:
            return self._detector
        if not self.settings.grounding_model:
            self._detector_error = (
                "use_grounding_dino=true needs a GroundingDINO model: set grounding.model in the job "
                "config or pass --grounding-model"
            )
            return None
        try:
            from evf.grounding import GroundingDetector

            self._detector = GroundingDetector.from_pretrained(
                self.settings.grounding_model,
                self.settings.device,
                box_threshold=self.settings.box_threshold,
                text_threshold=self.settings.text_threshold,
                storage_options=self.storage.options(self.settings.grounding_model),
            )
        except Exception as error:
            self._detector_error = _error_text(error, "GroundingDINO model could not be loaded")
        return self._detector

    def _infer(self, images: list[Any], arrays: list[Any], items: list[tuple[int, Any]]) -> list[Any]:
        from evf.segment import infer_masks

        needed = {index for index, request in items if request.use_grounding_dino}
        if not needed:
            return infer_masks(self.predictor, images, items)
        # The detector's input: the original arrays of the GroundingDINO rows' images (copied: the
        # arrays are read-only views of Arrow buffers, which the image processor's torch tensors dislike).
        detector_images = [
            None if array is None or index not in needed else np.array(array)
            for index, array in enumerate(arrays)
        ]
        return infer_masks(
            self.predictor, images, items, detector=self._detector, detector_images=detector_images
        )

    def _infer_isolating(
        self, images: list[Any], arrays: list[Any], items: list[tuple[int, Any]]
    ) -> list[Any]:
        """Results per item (``RawMasks`` or an exception): whole batch, else per image, else per row."""
        try:
            return list(self._infer(images, arrays, items))
        except Exception as error:
            if len(items) == 1:
                return [error]
        results: list[Any] = [None] * len(items)
        by_image: dict[int, list[int]] = {}
        for position, (image_index, _) in enumerate(items):
            by_image.setdefault(image_index, []).append(position)
        for image_index, positions in by_image.items():
            sub_items = [(0, items[p][1]) for p in positions]
            try:
                outputs = self._infer([images[image_index]], [arrays[image_index]], sub_items)
            except Exception:
                outputs = []
                for _, request in sub_items:
                    try:
                        outputs.append(
                            self._infer([images[image_index]], [arrays[image_index]], [(0, request)])[0]
                        )
                    except Exception as error:
                        outputs.append(error)
            for position, output in zip(positions, outputs, strict=True):
                results[position] = output
        return results

    def __call__(self, table: pa.Table) -> pa.Table:
        import torch

        from evf.predictor import PreparedImage

        units = [json.loads(text) for text in table.column("unit").to_pylist()]
        sams, beit3s, raw_images = (table.column(n).to_pylist() for n in ("sam", "beit3", "image"))
        images: list[Any] = []
        arrays: list[Any] = []
        items: list[tuple[int, Any]] = []
        owners: list[tuple[int, dict[str, Any]]] = []  # (unit index, record) per item
        for u, unit in enumerate(units):
            if sams[u] is None:
                continue
            image_index = -1
            for record in unit["records"]:
                try:
                    request = parse_request(record["request"])
                except Exception as error:  # cannot happen for records built by the read stage
                    record.update(status="error", error=_error_text(error, "invalid request"))
                    continue
                if request.use_grounding_dino and self._get_detector() is None:
                    record.update(status="error", error=self._detector_error)
                    continue
                if image_index < 0:
                    image_index = len(images)
                    sam = torch.from_numpy(
                        np.frombuffer(sams[u], dtype=unit["sam_dtype"]).reshape(unit["sam_shape"]).copy()
                    )
                    beit3 = torch.from_numpy(
                        np.frombuffer(beit3s[u], dtype=np.float32).reshape(unit["beit3_shape"]).copy()
                    )
                    images.append(PreparedImage(sam, beit3, (unit["height"], unit["width"])))
                    arrays.append(
                        None
                        if raw_images[u] is None
                        else np.frombuffer(raw_images[u], np.uint8).reshape(unit["height"], unit["width"], 3)
                    )
                items.append((image_index, request))
                owners.append((u, record))
        started = time.perf_counter()
        results = self._infer_isolating(images, arrays, items) if items else []
        share = (time.perf_counter() - started) * 1000 / max(1, len(items))
        self.batches += 1

        per_unit_masks: dict[int, list[np.ndarray]] = {}
        for (u, record), result in zip(owners, results, strict=True):
            record["elapsed_ms"] = record.get("elapsed_ms", 0.0) + share
            if isinstance(result, BaseException):
                record.update(status="error", error=_error_text(result, "model failed"))
                continue
            masks = per_unit_masks.setdefault(u, [])
            record["mask_index"] = len(masks)
            masks.append(result.mask)
            if result.negative is not None:
                record["negative_index"] = len(masks)
                masks.append(result.negative)
            record["score"] = float(result.score)
            instances = getattr(result, "instances", None)
            if instances is not None:
                record["instances"] = [i.to_dict() for i in instances]
        out: dict[str, list[Any]] = {name: [] for name in UNIT_SCHEMA.names}
        for u, unit in enumerate(units):
            masks = per_unit_masks.get(u)
            if masks:
                unit["mask_count"] = len(masks)
            out["unit"].append(json.dumps(unit))
            out["image"].append(raw_images[u])
            out["sam"].append(None)
            out["beit3"].append(None)
            out["masks"].append(_pack(masks) if masks else None)
        result = pa.table(out, schema=UNIT_SCHEMA)
        del images, arrays, items, results, sams, beit3s, table
        release_memory()
        return result


# --------------------------------------------------------------------------------------------------
# Stage 3: post-process, encode, write masks, then commit the batch's metadata (CPU tasks)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinishSettings:
    output: str
    model_id: str
    run_id: str
    io_threads: int = 8


def _finish_record(
    record: dict[str, Any], masks: np.ndarray | None, image: np.ndarray | None, layout: OutputLayout
) -> bytes | None:
    """Post-process one model result into ``record["result"]``; returns the PNG to write."""
    from evf.segment import RawMasks, finish

    t0 = time.perf_counter()
    try:
        request = parse_request(record["request"])
        negative = masks[record["negative_index"]] if "negative_index" in record else None
        raw = RawMasks(masks[record["mask_index"]], record["score"], negative)
        result = finish(request, raw, image)
        png = encode_png(result.image)
    except Exception as error:
        record.update(status="error", error=_error_text(error, "post-processing failed"))
        return None
    finally:
        record["elapsed_ms"] = record.get("elapsed_ms", 0.0) + (time.perf_counter() - t0) * 1000
    record["status"] = "empty" if result.empty else "ok"
    record["result"] = {
        "mask_url": layout.mask_uri(record["key"]),
        "area": int(result.area),
        "bbox": [int(v) for v in result.bbox],
        "score": float(result.score),
        "rle": {"size": [int(v) for v in result.rle["size"]], "counts": str(result.rle["counts"])},
        # GroundingDINO rows: the boxes and their masks (RLE) as the actor encoded them; None for EVF rows.
        "instances": record.get("instances") if request.use_grounding_dino else None,
    }
    return png


class FinishStage:
    """Post-processing + PNG encoding + writes for a batch of units; commits the batch last."""

    def __init__(self, settings: FinishSettings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        self.layout = OutputLayout(settings.output)

    def __call__(self, table: pa.Table) -> pa.Table:
        units = [json.loads(text) for text in table.column("unit").to_pylist()]
        images = table.column("image").to_pylist()
        packed = table.column("masks").to_pylist()
        finished: list[dict[str, Any]] = []
        writes: list[tuple[dict[str, Any], bytes]] = []
        for u, unit in enumerate(units):
            masks = None
            if packed[u] is not None:
                masks = _unpack(packed[u], unit["mask_count"], unit["height"], unit["width"])
            image = None
            if images[u] is not None:
                image = np.frombuffer(images[u], np.uint8).reshape(unit["height"], unit["width"], 3)
            for record in unit["records"]:
                record.setdefault("width", unit.get("width"))
                record.setdefault("height", unit.get("height"))
                if record["status"] == "" and masks is not None and "mask_index" in record:
                    png = _finish_record(record, masks, image, self.layout)
                    if png is not None:
                        writes.append((record, png))
                elif record["status"] == "":
                    record.update(status="error", error="model gave no mask for this row")
                finished.append(record)

        def write(item: tuple[dict[str, Any], bytes]) -> None:
            record, png = item
            uri = record["result"]["mask_url"]
            write_bytes(uri, png, self.storage.options(uri))

        t0 = time.perf_counter()
        outcomes = _timed_threads(write, writes, self.settings.io_threads)
        write_share = (time.perf_counter() - t0) * 1000 / max(1, len(writes))
        for (record, _), outcome in zip(writes, outcomes, strict=True):
            record["elapsed_ms"] = record.get("elapsed_ms", 0.0) + write_share
            if isinstance(outcome, BaseException):
                record.update(status="error", error=_error_text(outcome, "mask write failed"), result=None)

        to_commit = [r for r in finished if r["status"] != "skip"]
        if to_commit:
            rows = []
            for record in to_commit:
                record["image_url_display"] = (
                    display_url(record["image_url"]) if record.get("image_url") else None
                )
                rows.append(
                    metadata_row(record, model_id=self.settings.model_id, run_id=self.settings.run_id)
                )
            metadata_uri = self.layout.metadata_uri(r["id"] for r in rows)
            # The commit. A failure here fails the task (and the job): the rows stay uncommitted.
            write_metadata(self.layout, rows, self.storage.options(metadata_uri))
        result = pa.table(
            [
                [r["id"] for r in finished],
                [r["status"] for r in finished],
                [bool(r.get("stale")) for r in finished],
            ],
            schema=RESULT_SCHEMA,
        )
        del units, images, packed, writes
        release_memory()
        return result
