"""Stage 2 (actor pool): the model. Each actor holds one ``evf.engine.InferenceEngine``.

This module is Arrow in and out around the engine, plus the job's bookkeeping: the rows of a
batch of image units become (image, request) items; the engine answers them (each image embedded
once, every request of the batch in one model call, failures isolated to the request); a row gets
its ``score`` and mask indices, or its ``error``, which the finish stage commits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from evf.engine import InferenceEngine, RequestFailed
from evf.pipelines.rows import ImageUnit, JobRow, units_from_table, units_table
from evf.pipelines.workers import release_memory
from evf.registry import CheckpointInfo, Item, PreparedInputs
from evf.settings import GroundingSettings
from evf.storage import Storage

__all__ = ["MODEL_ROWS", "NODE_PREFIX", "InferenceSettings", "InferenceStage"]

MODEL_ROWS = "model_rows"
"""Counter of the rows that reached a model actor (committed and invalid rows never do)."""
NODE_PREFIX = "node:"
"""Counters ``node:<Ray node id>``: rows answered by the actors on that node."""


def _node_id() -> str:
    """The Ray node this process runs on ("local" outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


@dataclass(frozen=True)
class InferenceSettings:
    checkpoint: CheckpointInfo  # the model, its family and the options it runs with
    storage: Storage
    torch_threads: int | None = None
    grounding: GroundingSettings = GroundingSettings()  # with the storage options of its URI
    counters: Any = None  # the run's RunCounters: told how many rows each node's actors answered


class InferenceStage:
    """Ray Data callable class: the engine is loaded in ``__init__``; ``__call__`` maps a batch."""

    def __init__(self, settings: InferenceSettings) -> None:
        import torch

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        checkpoint = settings.checkpoint
        self.settings = settings
        self.engine = InferenceEngine.from_checkpoint(
            checkpoint,
            grounding=settings.grounding,
            storage_options=settings.storage.options(checkpoint.model_id),
        )
        self._node = _node_id()

    def _gather(
        self, units: list[ImageUnit]
    ) -> tuple[list[PreparedInputs], list[np.ndarray | None], list[Item], list[tuple[int, JobRow]]]:
        """The batch's model inputs: each unit's image, its original pixels, the (image, request)
        items and the (unit index, row) owning each item."""
        family = self.engine.family
        images = [unit.prepared_inputs(family) for unit in units]
        arrays = [unit.image_array() for unit in units]
        items: list[Item] = []
        owners: list[tuple[int, JobRow]] = []
        for u, unit in enumerate(units):
            for row in unit.rows:
                items.append((u, row.request))
                owners.append((u, row))
        return images, arrays, items, owners

    def __call__(self, table: pa.Table) -> pa.Table:
        units = units_from_table(table)
        images, arrays, items, owners = self._gather(units)
        if self.settings.counters is not None:
            rows = len(items)
            self.settings.counters.add.remote({MODEL_ROWS: rows, f"{NODE_PREFIX}{self._node}": rows})
        started = time.perf_counter()
        results = self.engine.infer(images, items, arrays)
        share = (time.perf_counter() - started) * 1000 / max(1, len(items))
        masks: list[list[np.ndarray]] = [[] for _ in units]
        for (u, row), result in zip(owners, results, strict=True):
            row.elapsed_ms += share
            if isinstance(result, RequestFailed):
                row.error = str(result)
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
