"""``InferenceEngine``: a loaded model family answering batches of requests, one result each.

Every entrance holds one: ``evf.segment`` (one request), the job's model actor
(``evf.pipelines.infer``: Arrow in and out around it) and a server replica. The engine owns what
they would otherwise each write:

- the model, loaded once through the family registry (``evf.registry``);
- GroundingDINO, loaded on the first request that needs it (``evf.grounding.load_detector``, the
  one detector cache); when it cannot be loaded, the error is kept and every such request gets it;
- fault isolation: a batch that fails is retried image by image, then request by request, so that
  one bad request costs only its own result;
- requests that cannot run (a prompt kind the family lacks, no detector) get their error without
  running, and their image is not embedded for them.

Shapes: images are the family's prepared inputs (``engine.prepare(array)``, or the job's decode
stage), each with its original (H, W); masks come back as bool (H, W) at that size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evf.checkpoints import DEMO_MODEL_ID
from evf.errors import UserError, error_text
from evf.grounding import (
    MISSING_DETECTOR,
    MissingDetectorError,
)
from evf.registry import CheckpointInfo, Item, ModelFamily, PreparedInputs, describe_checkpoint, families
from evf.request import SegmentRequest
from evf.result import RawMasks
from evf.settings import GroundingSettings, ModelOptions, ModelSettings, resolve_device

__all__ = ["InferenceEngine", "RequestFailed", "UnsupportedRequestError"]

log = logging.getLogger(__name__)


class UnsupportedRequestError(UserError, ValueError):
    """The model family cannot answer this kind of request (``ModelFamily.unsupported``)."""


class RequestFailed(Exception):
    """One request's failure as the engine reports it: ``str()`` is the request's error text
    (``evf.errors.error_text``); ``cause`` the exception behind it (``evf.segment`` raises that)."""

    def __init__(self, text: str, cause: BaseException) -> None:
        super().__init__(text)
        self.cause = cause


class InferenceEngine:
    """A loaded model family (see the module docstring). Build with :meth:`load`."""

    def __init__(
        self,
        family: type[ModelFamily],
        model: Any,
        *,
        model_id: str = "",
        device: str = "cpu",
        grounding: GroundingSettings | None = None,
    ) -> None:
        self.family = family
        self.model = model
        self.model_id = model_id
        self.device = device
        self.grounding = grounding or GroundingSettings()
        self._detector: Any = None
        self._detector_failure: RequestFailed | None = None

    @classmethod
    def load(
        cls,
        settings: ModelSettings | None = None,
        *,
        grounding: GroundingSettings | None = None,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: Any = None,
    ) -> InferenceEngine:
        """Load ``settings.model`` (a folder, fsspec URI, Hub id or ``evf-sam2-demo``) with its family.

        ``storage_options``: for the model's URI (``evf.storage.Storage.options``)."""
        settings = settings or ModelSettings()
        options = ModelOptions(**settings.model_dump(exclude={"model"}))
        checkpoint = describe_checkpoint(settings.model, options, storage_options, cache_dir)
        return cls.from_checkpoint(checkpoint, grounding=grounding, storage_options=storage_options)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: CheckpointInfo,
        *,
        grounding: GroundingSettings | None = None,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: Any = None,
    ) -> InferenceEngine:
        """Load a described checkpoint (as a job's actor does, with the driver's ``CheckpointInfo``)."""
        device = resolve_device(checkpoint.options.device)
        options = checkpoint.options.model_copy(update={"device": device})
        return cls(
            checkpoint.family,
            checkpoint.load(options, storage_options, cache_dir),
            model_id=checkpoint.model_id,
            device=device,
            grounding=grounding,
        )

    @classmethod
    def wrap(cls, model: Any, *, grounding: GroundingSettings | None = None) -> InferenceEngine:
        """An engine around a model already loaded (e.g. an ``EvfSam2Predictor``), its family found
        by ``ModelFamily.owns``."""
        for family in set(families().values()):
            if family.owns(model):
                model_id = str(getattr(model, "model_id", ""))
                device = str(getattr(model, "device", "cpu"))
                return cls(family, model, model_id=model_id, device=device, grounding=grounding)
        raise TypeError(f"{type(model).__name__} is no registered model family's model")

    @property
    def is_demo_model(self) -> bool:
        return self.model_id == DEMO_MODEL_ID

    def prepare(self, image: np.ndarray) -> PreparedInputs:
        """The family's CPU preprocessing of one HxWx3 uint8 RGB image (the loaded model's
        ``preprocessor``, the same callable ``ModelFamily.describe`` gives CPU workers)."""
        return self.model.preprocessor(image)

    # -- GroundingDINO ----------------------------------------------------------------------
    def use_detector(self, detector: Any) -> None:
        """Answer ``use_grounding_dino`` requests with this ``GroundingDetector`` (its thresholds)."""
        self._detector, self._detector_failure = detector, None

    def detector(self) -> Any:
        """GroundingDINO, loaded on first need; None when it is unavailable (the failure is kept and
        given to every request that needs it)."""
        if self._detector is not None or self._detector_failure is not None:
            return self._detector
        if not self.grounding.model:
            self._detector_failure = RequestFailed(MISSING_DETECTOR, MissingDetectorError(MISSING_DETECTOR))
            return None
        try:
            from evf.grounding import load_detector

            self._detector = load_detector(
                self.grounding.model,
                self.device,
                box_threshold=self.grounding.box_threshold,
                text_threshold=self.grounding.text_threshold,
                storage_options=self.grounding.storage_options,
            )
        except Exception as error:
            text = error_text(error, "GroundingDINO model could not be loaded")
            self._detector_failure = RequestFailed(text, error)
        return self._detector

    def unrunnable(self, request: SegmentRequest) -> RequestFailed | None:
        """Why ``request`` cannot run on this engine, or None."""
        reason = self.family.unsupported(request)
        if reason is not None:
            return RequestFailed(reason, UnsupportedRequestError(reason))
        if request.use_grounding_dino and self.detector() is None:
            return self._detector_failure
        return None

    # -- inference --------------------------------------------------------------------------
    def infer(
        self,
        images: Sequence[PreparedInputs],
        items: Sequence[Item],
        originals: Sequence[np.ndarray | None] | None = None,
    ) -> list[RawMasks | RequestFailed]:
        """Answer ``items`` (``(index into images, request)``), isolated: one result per item, in
        order, a ``RequestFailed`` for each item that could not be answered.

        ``originals``: each image's HxWx3 uint8 pixels, needed only for GroundingDINO requests
        (the detector's input); index-aligned with ``images``.
        """
        results: list[RawMasks | RequestFailed | None] = [None] * len(items)
        runnable: list[int] = []
        for position, (_, request) in enumerate(items):
            failure = self.unrunnable(request)
            if failure is None:
                runnable.append(position)
            else:
                results[position] = failure
        # Only the images that a runnable request names are embedded.
        used = sorted({items[p][0] for p in runnable})
        renumber = {old: new for new, old in enumerate(used)}
        batch_images = [images[i] for i in used]
        batch_originals = [None if originals is None else originals[i] for i in used]
        batch = [(renumber[items[p][0]], items[p][1]) for p in runnable]
        for position, output in zip(
            runnable, self._isolated(batch_images, batch_originals, batch), strict=True
        ):
            results[position] = output
        return results  # type: ignore[return-value]

    def _run(self, images: Sequence[Any], originals: Sequence[Any], items: Sequence[Item]) -> list[RawMasks]:
        grounding = None
        if any(request.use_grounding_dino for _, request in items):
            from evf.grounding import Grounding

            needed = {index for index, request in items if request.use_grounding_dino}
            # Copies: the job hands read-only views of Arrow buffers, which the image processor dislikes.
            sources = [None if a is None or i not in needed else np.array(a) for i, a in enumerate(originals)]
            grounding = Grounding(self.detector(), sources)
        return self.family.infer(self.model, images, items, grounding)

    def _isolated(
        self, images: Sequence[Any], originals: Sequence[Any], items: Sequence[Item]
    ) -> list[RawMasks | RequestFailed]:
        """The whole batch, else per image, else per request."""
        if not items:
            return []
        try:
            return list(self._run(images, originals, items))
        except Exception as error:
            if len(items) == 1:
                return [_failed(error)]
        results: list[RawMasks | RequestFailed | None] = [None] * len(items)
        by_image: dict[int, list[int]] = {}
        for position, (image_index, _) in enumerate(items):
            by_image.setdefault(image_index, []).append(position)
        for image_index, positions in by_image.items():
            one = ([images[image_index]], [originals[image_index]])
            sub_items = [(0, items[p][1]) for p in positions]
            try:
                outputs: list[RawMasks | RequestFailed] = list(self._run(*one, sub_items))
            except Exception:
                outputs = []
                for item in sub_items:
                    try:
                        outputs.append(self._run(*one, [item])[0])
                    except Exception as error:
                        outputs.append(_failed(error))
            for position, output in zip(positions, outputs, strict=True):
                results[position] = output
        return results  # type: ignore[return-value]


def _failed(error: BaseException) -> RequestFailed:
    log.debug("request failed in the model", exc_info=error)
    return RequestFailed(error_text(error, "model failed"), error)
