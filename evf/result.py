"""The result of one request, whatever the model family: the library's one home for it.

- :class:`Instance`: one object the model found (a GroundingDINO box, a SAM 3 instance...).
- :class:`RawMasks`: a family's answer before post-processing (``evf.engine`` hands these out).
- :class:`SegmentResult`: the finished answer (``evf.segment.finish``); :meth:`SegmentResult.record`
  is its one plain-dict form, from which the job's metadata row (``evf.pipelines.commit``), the
  ``--json`` of ``evf segment`` and a server's response are derived.

The status rule (:data:`STATUSES`): a request ends ``ok`` (a mask), ``empty`` (the final mask is
empty, or a ``min_score`` / ``min_area`` bar made it so: ``reason`` says which) or ``error``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from evf.postprocess import encode_rle
from evf.request import SegmentRequest

__all__ = ["STATUSES", "Instance", "RawMasks", "SegmentResult", "below_bar"]

STATUSES = ("ok", "empty", "error")


@dataclass
class Instance:
    """One object found for a request (before any post-processing).

    box: ``(x0, y0, x1, y1)`` float pixels of the original image; mask: bool (H, W);
    detector_score: the detector's (or the family's) confidence that this is the prompt's object;
    mask_score: the mask's predicted IoU; label: the prompt words matched (may be "").
    """

    box: tuple[float, float, float, float]
    detector_score: float
    mask_score: float
    mask: np.ndarray
    label: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The record form: ``box`` as COCO ``[x, y, w, h]`` floats and the mask as COCO RLE."""
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
    """A model's output for one request, before post-processing: bool (H, W) masks and the score.

    negative: the negative prompt's mask (subtracted by post-processing), None without one.
    instances: for families and modes that find several objects (GroundingDINO rows today): one per
    object, highest detector score first (``[]`` when none was found); ``mask`` is their union.
    None when the request was answered with one mask.
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
    presence_logit: the model's object-presence logit for the prompt, where the family has one
        (SAM 2's for EVF text prompts, whose meaning there is not established).
    reason: why the result is ``empty`` although the mask is not, when a ``min_score`` or
        ``min_area`` bar made it so (the mask is kept, for review); None otherwise.
    instances: None for one-mask answers, else one dict per object (``Instance.to_dict``), highest
        detector score first (``[]`` when none was found): ``box`` ``[x, y, w, h]`` (COCO order,
        float pixels of the original image), ``detector_score``, ``mask_score``, ``label`` and
        ``rle`` (that object's mask before post-processing and negative subtraction). ``score`` is
        then the highest ``mask_score`` (0.0 without objects).
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

    @property
    def status(self) -> str:
        """``ok`` or ``empty`` (see the module docstring)."""
        return "empty" if self.empty else "ok"

    def record(self) -> dict[str, Any]:
        """The plain-dict form (JSON-ready): what the job's metadata row, ``evf segment --json`` and
        a server's response hold of the result. ``width``/``height`` are the mask's (= the image's)."""
        height, width = self.mask.shape[:2]
        return {
            "status": self.status,
            "reason": self.reason,
            "width": int(width),
            "height": int(height),
            "area": int(self.area),
            "bbox": [int(v) for v in self.bbox],
            "score": float(self.score),
            "presence_logit": None if self.presence_logit is None else float(self.presence_logit),
            "rle": self.rle,
            "instances": self.instances,
        }


def below_bar(request: SegmentRequest, score: float, area: int) -> str | None:
    """Why a mask falls below the request's ``min_score`` / ``min_area`` bars, or None."""
    if request.min_score is not None and score < request.min_score:
        return f"score {score:.3f} < min_score {request.min_score:g}"
    if request.min_area is not None and area < request.min_area:
        return f"area {area} px < min_area {request.min_area}"
    return None
