"""``evf.segment``: one fal-style request on one image, and the CPU half the job reuses.

A request runs in two halves so that a job can put them on different workers:

1. inference (accelerator): ``evf.engine.InferenceEngine.infer`` embeds each distinct image once
   and answers every request of a batch through the model's family (``evf.registry``);
2. ``finish`` (CPU): post-processing in the documented order (subtract negative -> fill holes
   -> expand -> blur -> revert), statistics, COCO RLE and the output image.

``segment`` runs both for one request, on an engine it is given or the shipped demo model's.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from evf.checkpoints import DEMO_MODEL_WARNING
from evf.engine import InferenceEngine
from evf.grounding import MISSING_DETECTOR, GroundingDetector, MissingDetectorError
from evf.io import ImageLike, as_rgb_array
from evf.postprocess import binarize, compose_rgba, encode_rle, mask_stats, postprocess
from evf.request import SegmentRequest, parse_request
from evf.result import RawMasks, SegmentResult, below_bar
from evf.settings import GroundingSettings

__all__ = ["default_engine", "finish", "segment"]

log = logging.getLogger(__name__)


def finish(request: SegmentRequest, raw: RawMasks, image: np.ndarray | None = None) -> SegmentResult:
    """Post-process one request's masks (CPU). ``image`` is needed only when ``mask_only`` is false."""
    mask = postprocess(
        raw.mask,
        negative=raw.negative,
        fill_holes=request.fill_holes,
        expand_mask=request.expand_mask,
        blur_mask=request.blur_mask,
        revert_mask=request.revert_mask,
    )
    binary = binarize(mask)
    stats = mask_stats(binary)
    if request.mask_only:
        output = mask
    elif image is None:
        raise ValueError("mask_only=false needs the input image to build the RGBA output")
    else:
        output = compose_rgba(image, mask)
    instances = None if raw.instances is None else [i.to_dict() for i in raw.instances]
    reason = below_bar(request, raw.score, stats.area) if not stats.empty else None
    return SegmentResult(
        mask,
        output,
        raw.score,
        stats.area,
        stats.bbox,
        stats.empty or reason is not None,
        encode_rle(binary),
        instances,
        raw.presence_logit,
        reason,
    )


@functools.lru_cache(maxsize=1)
def default_engine() -> InferenceEngine:
    """The project's default model (the shipped synthetic demo model), loaded once per process."""
    return InferenceEngine.load()


@functools.cache
def _warn_demo_model(model_id: str) -> None:
    """Once per process: the demo model is answering (its masks on photos are meaningless)."""
    log.warning("%s", DEMO_MODEL_WARNING)


def segment(
    image: ImageLike | None,
    request: Mapping[str, Any] | SegmentRequest,
    model: Any = None,
    *,
    detector: GroundingDetector | str | os.PathLike[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> SegmentResult:
    """Segment one image from a fal-style request (see ``evf.request.SegmentRequest``).

    Args:
        image: (H, W, 3) uint8 RGB array, a PIL image, a path or URI (local, ``s3://...``,
            ``data:...``), or None to read ``request["image_url"]``.
        request: a mapping with the fal option names, or a ``SegmentRequest``.
        model: an ``InferenceEngine``, or a loaded model of a registered family (an
            ``EvfSam2Predictor``, ...); defaults to the shipped demo model.
        detector: GroundingDINO for ``use_grounding_dino`` requests: a ``GroundingDetector``
            (its thresholds apply) or a checkpoint (folder, fsspec URI, or Hub id such as
            ``IDEA-Research/grounding-dino-tiny``), loaded once per process with the default
            thresholds (``evf.grounding.DEFAULT_*_THRESHOLD``) on the model's device. Not loaded
            otherwise. Without it, an engine's own ``GroundingSettings`` apply.
        storage_options: for ``image_url`` and a ``detector`` URI.

    Raises:
        InvalidRequestError: an option is invalid (the message names field, value and range).
        MissingDetectorError: ``use_grounding_dino`` without a detector.
        the model's own exception when it fails on this request.
    """
    req = parse_request(request)
    if image is None:
        if not req.image_url:
            raise ValueError("no image given: pass an image (array, PIL image, path) or set image_url")
        image = req.image_url
    image = as_rgb_array(image, storage_options)
    engine = _engine(model, req, detector, storage_options)
    if engine.is_demo_model:
        _warn_demo_model(engine.model_id)
    result = engine.infer([engine.prepare(image)], [(0, req)], [image])[0]
    if not isinstance(result, RawMasks):
        raise result.cause
    return finish(req, result, image)


def _engine(
    model: Any,
    request: SegmentRequest,
    detector: GroundingDetector | str | os.PathLike[str] | None,
    storage_options: Mapping[str, Any] | None,
) -> InferenceEngine:
    """The engine that answers: ``model``'s (a fresh wrapper when a detector is given for this
    call), else the demo model's. A missing detector fails before any model loads."""
    has_detector = detector is not None or (
        isinstance(model, InferenceEngine) and model.grounding.model is not None
    )
    if request.use_grounding_dino and not has_detector:
        raise MissingDetectorError(MISSING_DETECTOR)
    engine = model if isinstance(model, InferenceEngine) else None
    if engine is None or detector is not None:
        loaded = default_engine().model if model is None else (model.model if engine else model)
        grounding = None
        if detector is not None and not isinstance(detector, GroundingDetector):
            grounding = GroundingSettings(os.fspath(detector), storage_options=storage_options)
        engine = InferenceEngine.wrap(loaded, grounding=grounding)
        if isinstance(detector, GroundingDetector):
            engine.use_detector(detector)
    return engine
