"""``evf.segment``: one fal-style request on one image, and the batched pieces the pipeline reuses.

A request runs in two halves so that a job can put them on different workers:

1. ``infer_masks`` (accelerator): embed each distinct image once; one BEiT-3 + decoder pass per
   prompt, plus one per negative prompt on the same image embedding.
2. ``finish`` (CPU): post-processing in the documented order (subtract negative -> fill holes
   -> expand -> blur -> revert), statistics, COCO RLE and the output image.

The negative prompt is always encoded as a plain (non-semantic) prompt: it names the areas to
exclude, which are instances or parts, whatever ``semantic_type`` says about the main prompt.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evf.postprocess import binarize, compose_rgba, encode_rle, mask_stats, postprocess
from evf.predictor import EvfSam2Predictor, PreparedImage, Prompt
from evf.request import SegmentRequest, parse_request

log = logging.getLogger(__name__)


@dataclass
class RawMasks:
    """Model output for one request, before post-processing: bool (H, W) masks and the score."""

    mask: np.ndarray
    score: float
    negative: np.ndarray | None = None


@dataclass
class SegmentResult:
    """The answer to one request.

    mask: uint8 (H, W) final mask, 0/255 (soft 0..255 when ``blur_mask`` is on).
    image: the output image: ``mask`` when ``mask_only``, else the input as RGBA (H, W, 4) with
        the mask as alpha.
    score: the model's predicted IoU of the prompt's mask.
    area, bbox (x, y, w, h), empty, rle: of the final mask binarised at 128; ``rle`` is COCO
        compressed RLE (``{"size": [H, W], "counts": str}``), decodable by pycocotools.
    """

    mask: np.ndarray
    image: np.ndarray
    score: float
    area: int
    bbox: tuple[int, int, int, int]
    empty: bool
    rle: dict[str, Any]


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
) -> list[RawMasks]:
    """Model masks for several requests in one batch.

    Args:
        images: the distinct images of the batch (each is embedded once).
        items: ``(index into images, request)``; several items may share an image.

    Returns:
        one ``RawMasks`` per item, in order.
    """
    warn_if_semantic_unsupported(predictor, [r for _, r in items])
    grounded = [r for _, r in items if r.use_grounding_dino]
    if grounded:
        raise NotImplementedError("use_grounding_dino=true needs a GroundingDINO model (not available yet)")
    prompts: list[tuple[int, Prompt]] = []
    for image_index, request in items:
        prompts.append((image_index, Prompt(request.prompt, request.semantic_type)))
        if request.negative_prompt:
            prompts.append((image_index, Prompt(request.negative_prompt)))
    predictions = iter(predictor.predict_embedded(predictor.embed_images(images), prompts))
    out = []
    for _, request in items:
        positive = next(predictions)
        negative = next(predictions).mask if request.negative_prompt else None
        out.append(RawMasks(positive.mask, positive.score, negative))
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
    return SegmentResult(mask, output, raw.score, stats.area, stats.bbox, stats.empty, encode_rle(binary))


@functools.lru_cache(maxsize=1)
def default_predictor() -> EvfSam2Predictor:
    """The project's default model (the shipped synthetic demo model), loaded once per process."""
    predictor = EvfSam2Predictor.from_pretrained()
    log.warning(
        "using the synthetic demo model (evf-sam2-demo): it knows coloured shapes only. "
        "For real images pass a real checkpoint, e.g. YxZhang/evf-sam2-multitask (Hub), a folder or s3://..."
    )
    return predictor


def segment(
    image: np.ndarray | None,
    request: Mapping[str, Any] | SegmentRequest,
    predictor: EvfSam2Predictor | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> SegmentResult:
    """Segment one image from a fal-style request (see ``evf.request.SegmentRequest``).

    Args:
        image: (H, W, 3) uint8 RGB, or None to read ``request["image_url"]`` (any fsspec URI,
            local path or ``data:`` URI).
        request: a mapping with the fal option names, or a ``SegmentRequest``.
        predictor: defaults to the shipped demo model.

    Raises:
        InvalidRequestError: an option is invalid (the message names field, value and range).
    """
    req = parse_request(request)
    if image is None:
        if not req.image_url:
            raise ValueError("no image given: pass an image array or set image_url in the request")
        from evf.io import load_image

        image = load_image(req.image_url, storage_options)
    predictor = predictor or default_predictor()
    raw = infer_masks(predictor, [image], [(0, req)])[0]
    return finish(req, raw, image)
