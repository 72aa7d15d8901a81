"""EVF-SAM2 as a model family: text prompts through BEiT-3, GroundingDINO boxes through SAM 2.

The only module outside ``evf.model`` / ``evf.predictor`` / ``evf.transforms`` that knows EVF-SAM2's
inputs (SAM 2 and BEiT-3 pixels). Per ``infer`` call (N distinct images, P text prompts, B boxes):

- one SAM 2 image-encoder batch of the N images;
- text requests: one BEiT-3 batch and one decoder call for every prompt and negative prompt;
- ``use_grounding_dino`` requests: one detector pass per ``detector.batch_size`` queries (prompt and
  negative prompt each count one), then one decoder call for all B boxes on the same embeddings; the
  mask is the union of the prompt's boxes' masks, each box an ``Instance``.

The negative prompt is always encoded as a plain (non-semantic) prompt: it names the areas to
exclude, which are instances or parts, whatever ``semantic_type`` says about the main prompt.
GroundingDINO requests ignore ``semantic_type``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evf.checkpoints import EVF_LAYOUT
from evf.registry import FamilyInfo, Item, ModelFamily, register_family
from evf.request import SegmentRequest
from evf.result import Instance, RawMasks
from evf.settings import ModelOptions

if TYPE_CHECKING:
    from evf.grounding import Grounding
    from evf.predictor import EmbeddedImages, EvfSam2Predictor
    from evf.transforms import PreparedImage

log = logging.getLogger(__name__)

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


@register_family
class EvfSam2Family(ModelFamily):
    name = "evf-sam2"
    architectures = ("EvfSam2Model", "evf")
    layout = EVF_LAYOUT
    prompt_kinds = frozenset({"text", "boxes"})

    @classmethod
    def owns(cls, model: Any) -> bool:
        from evf.predictor import EvfSam2Predictor

        return isinstance(model, EvfSam2Predictor)

    @classmethod
    def describe(cls, folder: Path, options: ModelOptions) -> FamilyInfo:
        from evf.model.config import EvfSam2Config, resolve_mode
        from evf.tokenizer import EvfTokenizer
        from evf.transforms import Preprocessor

        config = EvfSam2Config.from_file(folder / "config.json")
        tokenizer = EvfTokenizer.from_folder(folder)
        mode = resolve_mode(options.mode, config.inference_mode, tokenizer.supports_semantic)
        preprocessor = Preprocessor(mode, config.sam_image_size, config.beit3.img_size)
        facts = {"mode": mode, "sam_size": preprocessor.sam_size, "beit3_size": preprocessor.beit3_size}
        return FamilyInfo(preprocessor, tokenizer.supports_semantic, facts)

    @classmethod
    def load(cls, folder: Path, options: ModelOptions, model_id: str) -> EvfSam2Predictor:
        from evf.predictor import EvfSam2Predictor

        return EvfSam2Predictor.from_pretrained(
            folder, options.device, options.dtype, options.mode, compile=options.compile, model_id=model_id
        )

    @classmethod
    def prepared_from_arrays(cls, arrays: Mapping[str, np.ndarray], size: tuple[int, int]) -> PreparedImage:
        from evf.transforms import PreparedImage

        return PreparedImage.from_arrays(arrays, size)

    @classmethod
    def infer(
        cls,
        model: EvfSam2Predictor,
        images: Sequence[Any],
        items: Sequence[Item],
        grounding: Grounding | None = None,
    ) -> list[RawMasks]:
        text_items = [(k, i, r) for k, (i, r) in enumerate(items) if not r.use_grounding_dino]
        box_items = [(k, i, r) for k, (i, r) in enumerate(items) if r.use_grounding_dino]
        warn_if_semantic_unsupported(model, [r for _, _, r in text_items])
        embedded = model.embed_images(images)
        out: list[RawMasks | None] = [None] * len(items)
        for k, raw in _text_masks(model, embedded, text_items):
            out[k] = raw
        if box_items:
            if grounding is None:
                raise ValueError("use_grounding_dino requests need a detector (evf.grounding.Grounding)")
            for k, raw in _box_masks(model, embedded, box_items, grounding):
                out[k] = raw
        return out  # type: ignore[return-value]


# (position in the batch, image index, request) of the requests one path answers
_Items = list[tuple[int, int, SegmentRequest]]


def _text_masks(
    predictor: EvfSam2Predictor, embedded: EmbeddedImages, items: _Items
) -> list[tuple[int, RawMasks]]:
    """Text requests: one BEiT-3 + decoder pass for every prompt and negative prompt of the batch."""
    from evf.predictor import Prompt

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
    predictor: EvfSam2Predictor, embedded: EmbeddedImages, items: _Items, grounding: Grounding
) -> list[tuple[int, RawMasks]]:
    """GroundingDINO requests: boxes for the prompt (and negative prompt), segmented by SAM 2 on the
    same embeddings; the mask is the union of the prompt's boxes' masks."""
    queries: list[tuple[int, str]] = []
    for _, image_index, request in items:
        queries.append((image_index, request.prompt))
        if request.negative_prompt:
            queries.append((image_index, request.negative_prompt))
    detections = grounding.detect(queries, len(embedded.images))
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
