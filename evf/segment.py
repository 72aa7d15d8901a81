"""``evf.segment``: one fal-style request on one image, and the batched pieces the pipeline reuses.

A request runs in two halves so that a job can put them on different workers:

1. ``infer_masks`` (accelerator): embed each distinct image once; one BEiT-3 + decoder pass per
   prompt, plus one per negative prompt on the same image embedding. Requests with
   ``use_grounding_dino`` instead get GroundingDINO boxes for the prompt (and the negative
   prompt), segmented by SAM 2 with box prompts on the same image embeddings (``evf.grounding``);
   the mask is the union of the boxes' masks.
2. ``finish`` (CPU): post-processing in the documented order (subtract negative -> fill holes
   -> expand -> blur -> revert), statistics, COCO RLE and the output image.

The negative prompt is always encoded as a plain (non-semantic) prompt: it names the areas to
exclude, which are instances or parts, whatever ``semantic_type`` says about the main prompt.
GroundingDINO requests ignore ``semantic_type``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evf.checkpoints import DEMO_MODEL_WARNING
from evf.grounding import DetectorImage, GroundingDetector, MissingDetectorError
from evf.io import ImageLike, as_rgb_array
from evf.postprocess import binarize, compose_rgba, encode_rle, mask_stats, postprocess
from evf.predictor import EmbeddedImages, EvfSam2Predictor, PreparedImage, Prompt
from evf.request import SegmentRequest, parse_request

log = logging.getLogger(__name__)


@dataclass
class Instance:
    """One GroundingDINO box and its SAM 2 mask (before any post-processing).

    box: ``(x0, y0, x1, y1)`` float pixels of the original image; mask: bool (H, W).
    """

    box: tuple[float, float, float, float]
    detector_score: float
    mask_score: float
    mask: np.ndarray
    label: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The metadata form: ``box`` as COCO ``[x, y, w, h]`` floats and the mask as COCO RLE."""
        x0, y0, x1, y1 = (float(v) for v in self.box)
        return {
            "box": [x0, y0, x1 - x0, y1 - y0],
            "detector_score": float(self.detector_score),
            "mask_score": float(self.mask_score),
            "label": self.label,
            "rle": encode_rle(self.mask),
        }


@dataclass
class RawMasks:
    """Model output for one request, before post-processing: bool (H, W) masks and the score.

    instances: GroundingDINO requests only (else None): one per box of the prompt, highest
    detector score first (empty when no box passed the threshold); ``mask`` is their union.
    """

    mask: np.ndarray
    score: float
    negative: np.ndarray | None = None
    instances: list[Instance] | None = None
    presence_logit: float | None = None


@dataclass
class SegmentResult:
    """The answer to one request.

    mask: uint8 (H, W) final mask, 0/255 (soft 0..255 when ``blur_mask`` is on).
    image: the output image: ``mask`` when ``mask_only``, else the input as RGBA (H, W, 4) with
        the mask as alpha.
    score: the model's predicted IoU of the prompt's mask.
    area, bbox (x, y, w, h), empty, rle: of the final mask binarised at 128; ``rle`` is COCO
        compressed RLE (``{"size": [H, W], "counts": str}``), decodable by pycocotools.
    presence_logit: SAM 2's object-presence logit for the prompt (None for GroundingDINO requests);
        its meaning for text prompts is not established (EVF-SAM never used it).
    reason: why the result is ``empty`` although the mask is not, when a ``min_score`` or
        ``min_area`` bar made it so (the mask is kept, for review); None otherwise.
    instances: GroundingDINO requests only (None otherwise; ``[]`` when no box was found): one
        dict per box, highest detector score first: ``box`` ``[x, y, w, h]`` (COCO order, float
        pixels of the original image), ``detector_score``, ``mask_score`` (SAM 2's predicted
        IoU), ``label`` (the prompt words GroundingDINO matched; may be "") and ``rle`` (COCO
        RLE of that box's SAM 2 mask, before post-processing and negative subtraction). ``score``
        is then the highest ``mask_score`` (0.0 without boxes).
    """

    mask: np.ndarray
    image: np.ndarray
    score: float
    area: int
    bbox: tuple[int, int, int, int]
    empty: bool
    rle: dict[str, Any]
    instances: list[dict[str, Any]] | None = None
    presence_logit: float | None = None
    reason: str | None = None


_warned_semantic: set[str] = set()


def warn_if_semantic_unsupported(predictor: EvfSam2Predictor, requests: Sequence[SegmentRequest]) -> bool:
    """Log once per process and model when a semantic request meets a non-multitask checkpoint."""
    if predictor.supports_semantic or predictor.model_id in _warned_semantic:
        return False
    if not any(r.semantic_type for r in requests):
        return False
    _warned_semantic.add(predictor.model_id)
    log.warning(
        "semantic_type=true but checkpoint %r has no [semantic] token: the prefix is read as plain "
        "text. Semantic-level segmentation needs a -multitask checkpoint (e.g. YxZhang/evf-sam2-multitask).",
        predictor.model_id,
    )
    return True


def infer_masks(
    predictor: EvfSam2Predictor,
    images: Sequence[np.ndarray | PreparedImage],
    items: Sequence[tuple[int, SegmentRequest]],
    detector: GroundingDetector | None = None,
    *,
    detector_images: Sequence[np.ndarray | DetectorImage | None] | None = None,
) -> list[RawMasks]:
    """Model masks for several requests in one batch.

    Args:
        images: the distinct images of the batch (each is embedded once by SAM 2).
        items: ``(index into images, request)``; several items may share an image.
        detector: needed when some request has ``use_grounding_dino``.
        detector_images: the detector's input for each image (the original array, or
            ``detector.prepare_image(array)`` from a CPU worker), index-aligned with ``images``;
            only the images of GroundingDINO requests are read. Defaults to ``images`` (which
            must then be arrays for those requests).

    Work: one SAM 2 image-encoder batch; one BEiT-3 batch and one decoder call for the EVF
    prompts; one detector pass per ``detector.batch_size`` GroundingDINO queries (prompt and
    negative prompt each count one) and one decoder call for all their boxes.

    Returns:
        one ``RawMasks`` per item, in order.

    Raises:
        MissingDetectorError: a request has ``use_grounding_dino`` and ``detector`` is None.
    """
    evf_items = [(k, i, r) for k, (i, r) in enumerate(items) if not r.use_grounding_dino]
    dino_items = [(k, i, r) for k, (i, r) in enumerate(items) if r.use_grounding_dino]
    if dino_items and detector is None:
        raise MissingDetectorError(
            "use_grounding_dino=true needs a GroundingDINO model: pass a detector "
            "(evf.grounding.GroundingDetector.from_pretrained(...), a folder, an fsspec URI or a Hub id "
            "such as IDEA-Research/grounding-dino-tiny; --grounding-model on the command line)"
        )
    warn_if_semantic_unsupported(predictor, [r for _, _, r in evf_items])
    embedded = predictor.embed_images(images)
    out: list[RawMasks | None] = [None] * len(items)
    for k, raw in _text_masks(predictor, embedded, evf_items):
        out[k] = raw
    if dino_items:
        assert detector is not None
        sources = list(images if detector_images is None else detector_images)
        for k, raw in _box_masks(predictor, embedded, dino_items, detector, sources):
            out[k] = raw
    return out  # type: ignore[return-value]


# (position in the batch, image index, request) of the requests one path answers
_Items = list[tuple[int, int, SegmentRequest]]


def _text_masks(
    predictor: EvfSam2Predictor, embedded: EmbeddedImages, items: _Items
) -> list[tuple[int, RawMasks]]:
    """EVF requests: one BEiT-3 + decoder pass for every prompt and negative prompt of the batch."""
    prompts: list[tuple[int, Prompt]] = []
    for _, image_index, request in items:
        prompts.append((image_index, Prompt(request.prompt, request.semantic_type)))
        if request.negative_prompt:
            prompts.append((image_index, Prompt(request.negative_prompt)))
    predictions = iter(predictor.predict_embedded(embedded, prompts))
    out = []
    for k, _, request in items:
        positive = next(predictions)
        negative = next(predictions).mask if request.negative_prompt else None
        out.append((k, RawMasks(positive.mask, positive.score, negative, None, positive.presence_logit)))
    return out


def _box_masks(
    predictor: EvfSam2Predictor,
    embedded: EmbeddedImages,
    items: _Items,
    detector: GroundingDetector,
    sources: Sequence[np.ndarray | DetectorImage | PreparedImage | None],
) -> list[tuple[int, RawMasks]]:
    """GroundingDINO requests: boxes for the prompt (and negative prompt), segmented by SAM 2 on the
    same embeddings; the mask is the union of the prompt's boxes' masks."""
    if len(sources) != len(embedded.images):
        raise ValueError(f"{len(embedded.images)} images but {len(sources)} detector_images")
    for _, image_index, _ in items:
        if not isinstance(sources[image_index], np.ndarray | DetectorImage):
            raise ValueError(
                f"image {image_index}: GroundingDINO needs the original array or a DetectorImage "
                "(pass detector_images when images are PreparedImage)"
            )
    queries: list[tuple[int, str]] = []
    for _, image_index, request in items:
        queries.append((image_index, request.prompt))
        if request.negative_prompt:
            queries.append((image_index, request.negative_prompt))
    detections = detector.detect(sources, queries)  # type: ignore[arg-type]
    boxes = [(i, d.boxes) for (i, _), d in zip(queries, detections, strict=True)]
    masks, found = iter(predictor.predict_boxes(embedded, boxes)), iter(detections)
    out = []
    for k, image_index, request in items:
        positive, positive_masks = next(found), next(masks)
        instances = [
            Instance(tuple(box.tolist()), float(score), float(mask_score), mask, label)
            for box, score, mask_score, mask, label in zip(
                positive.boxes,
                positive.scores,
                positive_masks.scores,
                positive_masks.masks,
                positive.labels,
                strict=True,
            )
        ]
        negative = None
        if request.negative_prompt:
            next(found)
            negative_masks = next(masks).masks
            negative = negative_masks.any(axis=0) if len(negative_masks) else None
        size = embedded.images[image_index].size
        union = positive_masks.masks.any(axis=0) if instances else np.zeros(size, bool)
        score = float(positive_masks.scores.max()) if instances else 0.0
        out.append((k, RawMasks(union, score, negative, instances)))
    return out


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


def below_bar(request: SegmentRequest, score: float, area: int) -> str | None:
    """Why a mask falls below the request's ``min_score`` / ``min_area`` bars, or None."""
    if request.min_score is not None and score < request.min_score:
        return f"score {score:.3f} < min_score {request.min_score:g}"
    if request.min_area is not None and area < request.min_area:
        return f"area {area} px < min_area {request.min_area}"
    return None


@functools.lru_cache(maxsize=1)
def default_predictor() -> EvfSam2Predictor:
    """The project's default model (the shipped synthetic demo model), loaded once per process."""
    return EvfSam2Predictor.from_pretrained()


@functools.cache
def _warn_demo_model(model_id: str) -> None:
    """Once per process: the demo model is answering (its masks on photos are meaningless)."""
    log.warning("%s", DEMO_MODEL_WARNING)


_detectors: dict[tuple[str, str, str], GroundingDetector] = {}


def load_detector(
    name: str | os.PathLike[str],
    device: Any = "cpu",
    storage_options: Mapping[str, Any] | None = None,
) -> GroundingDetector:
    """``GroundingDetector.from_pretrained`` with default thresholds, loaded once per process."""
    key = (os.fspath(name), str(device), json.dumps(dict(storage_options or {}), sort_keys=True, default=str))
    if key not in _detectors:
        _detectors[key] = GroundingDetector.from_pretrained(name, device, storage_options=storage_options)
    return _detectors[key]


def segment(
    image: ImageLike | None,
    request: Mapping[str, Any] | SegmentRequest,
    predictor: EvfSam2Predictor | None = None,
    *,
    detector: GroundingDetector | str | os.PathLike[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> SegmentResult:
    """Segment one image from a fal-style request (see ``evf.request.SegmentRequest``).

    Args:
        image: (H, W, 3) uint8 RGB array, a PIL image, a path or URI (local, ``s3://...``,
            ``data:...``), or None to read ``request["image_url"]``.
        request: a mapping with the fal option names, or a ``SegmentRequest``.
        predictor: defaults to the shipped demo model.
        detector: GroundingDINO for ``use_grounding_dino`` requests: a ``GroundingDetector``
            (its thresholds apply) or a checkpoint (folder, fsspec URI, or Hub id such as
            ``IDEA-Research/grounding-dino-tiny``), loaded once per process with the default
            thresholds (``evf.grounding.DEFAULT_*_THRESHOLD``) on the predictor's device. Not loaded
            otherwise.
        storage_options: for ``image_url`` and a ``detector`` URI.

    Raises:
        InvalidRequestError: an option is invalid (the message names field, value and range).
        MissingDetectorError: ``use_grounding_dino`` without a ``detector``.
    """
    req = parse_request(request)
    if image is None:
        if not req.image_url:
            raise ValueError("no image given: pass an image (array, PIL image, path) or set image_url")
        image = req.image_url
    image = as_rgb_array(image, storage_options)
    if req.use_grounding_dino and detector is None:
        raise MissingDetectorError(
            "use_grounding_dino=true needs a GroundingDINO model: pass detector= (or --grounding-model): "
            "a GroundingDetector, a folder, an fsspec URI or a Hub id (IDEA-Research/grounding-dino-tiny)"
        )
    predictor = predictor or default_predictor()
    if predictor.is_demo_model:
        _warn_demo_model(predictor.model_id)
    if not req.use_grounding_dino:
        detector = None  # never loaded for requests that do not use it
    elif not isinstance(detector, GroundingDetector):
        detector = load_detector(detector, predictor.device, storage_options)  # type: ignore[arg-type]
    raw = infer_masks(predictor, [image], [(0, req)], detector)[0]
    return finish(req, raw, image)
