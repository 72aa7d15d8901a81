"""evf-sam: text-prompted image segmentation with EVF-SAM2, from one image to datasets of millions."""

from evf.predictor import EvfSam2Predictor, Prediction, Prompt

__all__ = ["EvfSam2Predictor", "Prediction", "Prompt"]
