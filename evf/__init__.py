"""evf-sam: text-prompted image segmentation with EVF-SAM2, from one image to datasets of millions."""

from evf.predictor import EvfSam2Predictor, Prediction, Prompt
from evf.request import InvalidRequestError, SegmentRequest, parse_request
from evf.segment import SegmentResult, segment

__all__ = [
    "EvfSam2Predictor",
    "InvalidRequestError",
    "Prediction",
    "Prompt",
    "SegmentRequest",
    "SegmentResult",
    "parse_request",
    "segment",
]
