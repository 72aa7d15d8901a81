"""Stage 2 (actor pool): the model. Each actor loads the model once; one call per batch of images.

The actor embeds every image of a batch once and answers all of its rows' prompts (and negative
prompts) in one decoder call (``evf.segment.infer_masks``). A batch that fails inside the model is
retried image by image, then row by row, so that one bad item costs only its own row; the row's
``error`` is set here and committed by the finish stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from evf.grounding import DEFAULT_BOX_THRESHOLD, DEFAULT_TEXT_THRESHOLD
from evf.pipelines.rows import ImageUnit, JobRow, units_from_table, units_table
from evf.pipelines.workers import error_text, release_memory
from evf.request import SegmentRequest
from evf.storage import Storage
from evf.transforms import PreparedImage

__all__ = ["MODEL_ROWS", "NODE_PREFIX", "InferenceSettings", "InferenceStage"]

MODEL_ROWS = "model_rows"
"""Counter of the rows that reached a model actor (committed and invalid rows never do)."""
NODE_PREFIX = "node:"
"""Counters ``node:<Ray node id>``: rows answered by the actors on that node."""


def _node_id() -> str:
    """The Ray node this process runs on ("local" outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


# (index into the batch's images, request) pairs, as ``evf.segment.infer_masks`` takes them.
Items = list[tuple[int, SegmentRequest]]


@dataclass(frozen=True)
class InferenceSettings:
    model: str
    storage: Storage
    device: str = "cpu"
    dtype: str = "float32"
    mode: str | None = None
    torch_threads: int | None = None
    compile: bool = False
    grounding_model: str | None = None
    box_threshold: float = DEFAULT_BOX_THRESHOLD
    text_threshold: float = DEFAULT_TEXT_THRESHOLD
    counters: Any = None  # the run's RunCounters: told how many rows each node's actors answered


class InferenceStage:
    """Ray Data callable class: the predictor is loaded in ``__init__``; ``__call__`` maps a batch."""

    def __init__(self, settings: InferenceSettings) -> None:
        import torch

        from evf.predictor import EvfSam2Predictor

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.predictor = EvfSam2Predictor.from_pretrained(
            settings.model,
            settings.device,
            settings.dtype,
            settings.mode,
            compile=settings.compile,
            storage_options=settings.storage.options(settings.model),
        )
        self._detector: Any = None
        self._detector_error: str | None = None
        self._node = _node_id()

    def _get_detector(self) -> Any:
        """GroundingDINO, loaded on first need; None (and ``_detector_error`` set) when unavailable."""
        if self._detector is not None or self._detector_error is not None:
            return self._detector
        settings = self.settings
        if not settings.grounding_model:
            self._detector_error = (
                "use_grounding_dino=true needs a GroundingDINO model: set grounding.model in the job "
                "config or pass --grounding-model"
            )
            return None
        try:
            from evf.grounding import GroundingDetector

            self._detector = GroundingDetector.from_pretrained(
                settings.grounding_model,
                settings.device,
                box_threshold=settings.box_threshold,
                text_threshold=settings.text_threshold,
                storage_options=settings.storage.options(settings.grounding_model),
            )
        except Exception as error:
            self._detector_error = error_text(error, "GroundingDINO model could not be loaded")
        return self._detector

    def _infer(self, images: list[PreparedImage], arrays: list[np.ndarray | None], items: Items) -> list[Any]:
        from evf.segment import infer_masks

        needed = {index for index, request in items if request.use_grounding_dino}
        if not needed:
            return infer_masks(self.predictor, images, items)
        # The detector's input: the original arrays of the GroundingDINO rows' images (copied: the
        # arrays are read-only views of Arrow buffers, which the image processor's tensors dislike).
        detector_images = [
            None if array is None or index not in needed else np.array(array)
            for index, array in enumerate(arrays)
        ]
        return infer_masks(
            self.predictor, images, items, detector=self._detector, detector_images=detector_images
        )

    def _infer_isolating(
        self, images: list[PreparedImage], arrays: list[np.ndarray | None], items: Items
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
            one_image = ([images[image_index]], [arrays[image_index]])
            sub_items = [(0, items[p][1]) for p in positions]
            try:
                outputs = self._infer(*one_image, sub_items)
            except Exception:
                outputs = []
                for item in sub_items:
                    try:
                        outputs.append(self._infer(*one_image, [item])[0])
                    except Exception as error:
                        outputs.append(error)
            for position, output in zip(positions, outputs, strict=True):
                results[position] = output
        return results

    def _gather(
        self, units: list[ImageUnit]
    ) -> tuple[list[PreparedImage], list[Any], Items, list[tuple[int, JobRow]]]:
        """The batch's model inputs: distinct images, their pixels, (image, request) items and the
        (unit index, row) owning each item. Rows that cannot run get their ``error`` here."""
        images: list[PreparedImage] = []
        arrays: list[np.ndarray | None] = []
        items: Items = []
        owners: list[tuple[int, JobRow]] = []
        for u, unit in enumerate(units):
            image_index = -1
            for row in unit.rows:
                if row.request.use_grounding_dino and self._get_detector() is None:
                    row.error = self._detector_error
                    continue
                if image_index < 0:
                    image_index = len(images)
                    images.append(unit.prepared_image())
                    arrays.append(unit.image_array())
                items.append((image_index, row.request))
                owners.append((u, row))
        return images, arrays, items, owners

    def __call__(self, table: pa.Table) -> pa.Table:
        units = units_from_table(table)
        images, arrays, items, owners = self._gather(units)
        if self.settings.counters is not None:
            rows = len(items)
            self.settings.counters.add.remote({MODEL_ROWS: rows, f"{NODE_PREFIX}{self._node}": rows})
        started = time.perf_counter()
        results = self._infer_isolating(images, arrays, items) if items else []
        share = (time.perf_counter() - started) * 1000 / max(1, len(items))
        masks: list[list[np.ndarray]] = [[] for _ in units]
        for (u, row), result in zip(owners, results, strict=True):
            row.elapsed_ms += share
            if isinstance(result, BaseException):
                row.error = error_text(result, "model failed")
                continue
            row.mask_index = len(masks[u])
            masks[u].append(result.mask)
            if result.negative is not None:
                row.negative_index = len(masks[u])
                masks[u].append(result.negative)
            row.score = float(result.score)
            row.presence_logit = result.presence_logit
            if result.instances is not None:
                row.instances = [instance.to_dict() for instance in result.instances]
        for unit, unit_masks in zip(units, masks, strict=True):
            unit.set_masks(unit_masks)
        out = units_table(units)
        del images, arrays, items, results, units, table
        release_memory()
        return out
