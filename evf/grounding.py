"""GroundingDINO: boxes for a text query, which the EVF checkpoint's own SAM 2 then segments.

Requests with ``use_grounding_dino: true`` take this path instead of BEiT-3 (see
``docs/grounding.md``):

1. ``GroundingDetector.detect``: the detector (``transformers``' ``GroundingDinoForObjectDetection``)
   finds boxes for each (image, text) query; boxes with a score above ``box_threshold`` are kept.
2. ``EvfSam2Predictor.predict_boxes``: every box of a batch goes through SAM 2's prompt encoder and
   mask decoder in one call, against the image embeddings the EVF path computed (``embed_images``).
   SAM 2 is frozen in EVF-SAM2, so the checkpoint's SAM 2 weights are the stock ones; the box path
   is exactly ``SAM2ImagePredictor.predict(box=..., multimask_output=False)``.

Coordinates: boxes are ``(x0, y0, x1, y1)`` float pixels in the original image (x right, y down).

The detector is built inside each worker with ``GroundingDetector.from_pretrained``: it is never
pickled. ``transformers`` is imported only there (it is the ``grounding`` extra).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from evf.checkpoints import CheckpointError, CheckpointLayout, resolve_checkpoint
from evf.errors import UserError
from evf.settings import DEFAULT_BOX_THRESHOLD, DEFAULT_TEXT_THRESHOLD

DEFAULT_MAX_DETECTIONS = 100

GROUNDING_LAYOUT = CheckpointLayout(
    "GroundingDINO",
    (
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "preprocessor_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "added_tokens.json",
    ),
    (
        ("config.json",),
        ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
        ("preprocessor_config.json", "processor_config.json"),
        ("tokenizer.json", "vocab.txt"),
    ),
    option="--grounding-model",
)


MISSING_DETECTOR = (
    "use_grounding_dino=true needs a GroundingDINO model: a folder, an fsspec URI or a Hub id such as "
    "IDEA-Research/grounding-dino-tiny (grounding.model in a job config, --grounding-model on the "
    "command line, detector= in evf.segment)"
)


class MissingDetectorError(UserError, ValueError):
    """A request asks for GroundingDINO but no detector was given (message: ``MISSING_DETECTOR``)."""


@dataclass
class Detections:
    """GroundingDINO output for one (image, text) query, highest score first.

    boxes: (K, 4) float32 ``(x0, y0, x1, y1)`` in original-image pixels, clipped to the image.
    scores: (K,) float32, the box's highest token probability (the value ``box_threshold`` tests).
    labels: K phrases: the query's tokens whose probability exceeds ``text_threshold`` (may be "").
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.boxes)


@dataclass
class DetectorImage:
    """CPU-side GroundingDINO input of one image (``GroundingDetector.prepare_image``).

    pixels: (3, h, w) float32, resized and normalised by the checkpoint's image processor.
    size: original (H, W).
    """

    pixels: Tensor
    size: tuple[int, int]


def normalize_caption(text: str) -> str:
    """GroundingDINO's caption convention: lower case, stripped, ending with a period."""
    caption = text.strip().lower()
    return caption if caption.endswith(".") else caption + "."


def _check_options(
    box_threshold: float, text_threshold: float, max_detections: int | None, batch_size: int
) -> None:
    for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
        if isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name}={value!r}: must be a number in [0, 1]")
    if max_detections is not None and max_detections < 1:
        raise ValueError(f"max_detections={max_detections!r}: must be >= 1 or None")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be >= 1")


class GroundingDetector:
    """A GroundingDINO model from ``transformers`` with its processor and default thresholds."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        device: torch.device | str = "cpu",
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
        max_detections: int | None = DEFAULT_MAX_DETECTIONS,
        batch_size: int = 8,
        model_id: str = "",
    ) -> None:
        """Wrap a loaded model; most users want ``from_pretrained``.

        Args:
            box_threshold: keep boxes whose score is above this (GroundingDINO's default 0.35).
            text_threshold: a query token belongs to a box's label when its probability is above
                this (default 0.25). It names boxes; it does not drop them.
            max_detections: keep at most this many boxes per query (highest scores; None: all).
                Each box costs one mask-decoder row, so this bounds memory at low thresholds.
            batch_size: queries per detector forward pass. Only queries whose images have the
                same input shape share a pass (images are never padded), so results do not
                depend on how rows are batched.
        """
        _check_options(box_threshold, text_threshold, max_detections, batch_size)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.max_detections = max_detections
        self.batch_size = batch_size
        self.model_id = model_id
        self.max_text_len = int(getattr(model.config, "max_text_len", 256))

    @classmethod
    def from_pretrained(
        cls,
        path_or_uri: str | os.PathLike[str],
        device: torch.device | str = "cpu",
        *,
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
        max_detections: int | None = DEFAULT_MAX_DETECTIONS,
        batch_size: int = 8,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | Path | None = None,
    ) -> GroundingDetector:
        """Load a GroundingDINO checkpoint in the Hugging Face layout.

        ``path_or_uri``: a local folder, any fsspec URI (copied once into the local cache, as
        EVF checkpoints are), or a Hub id such as ``IDEA-Research/grounding-dino-tiny`` (online
        only; offline this raises ``CheckpointError`` saying how to get the files).
        """
        _check_options(box_threshold, text_threshold, max_detections, batch_size)  # before any download
        folder = resolve_checkpoint(path_or_uri, storage_options, cache_dir, layout=GROUNDING_LAYOUT)
        try:
            from transformers import AutoConfig, GroundingDinoForObjectDetection, GroundingDinoProcessor
        except ImportError as err:  # the optional extra
            raise ImportError(
                "use_grounding_dino needs the transformers package: pip install 'evf-sam[grounding]'"
            ) from err
        config = AutoConfig.from_pretrained(folder)
        if config.model_type != "grounding-dino":
            raise CheckpointError(
                f"{os.fspath(path_or_uri)!r} is not a GroundingDINO checkpoint "
                f"(config.json model_type={config.model_type!r})"
            )
        model = GroundingDinoForObjectDetection.from_pretrained(folder)
        processor = GroundingDinoProcessor.from_pretrained(folder)
        return cls(
            model,
            processor,
            device=device,
            box_threshold=box_threshold,
            text_threshold=text_threshold,
            max_detections=max_detections,
            batch_size=batch_size,
            model_id=os.fspath(path_or_uri),
        )

    # -- CPU side ---------------------------------------------------------------------------
    def prepare_image(self, image: np.ndarray) -> DetectorImage:
        """Resize and normalise one HxWx3 uint8 RGB image (CPU; safe in a separate worker)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"expected an HxWx3 uint8 RGB array, got dtype {image.dtype} shape {image.shape}"
            )
        out = self.processor.image_processor(images=[image], return_tensors="pt")
        pixels = out["pixel_values"][0]
        if "pixel_mask" in out:  # one image: no padding, but be exact if a processor pads anyway
            mask = out["pixel_mask"][0].bool()
            pixels = pixels[:, : int(mask.any(1).sum()), : int(mask.any(0).sum())]
        return DetectorImage(pixels.float().contiguous(), (int(image.shape[0]), int(image.shape[1])))

    # -- device side ------------------------------------------------------------------------
    def detect(
        self,
        images: Sequence[np.ndarray | DetectorImage],
        queries: Sequence[tuple[int, str]],
        *,
        box_threshold: float | None = None,
        text_threshold: float | None = None,
    ) -> list[Detections]:
        """Boxes for each ``(image index, text)`` query (thresholds default to the detector's)."""
        box_threshold = self.box_threshold if box_threshold is None else float(box_threshold)
        text_threshold = self.text_threshold if text_threshold is None else float(text_threshold)
        prepared: dict[int, DetectorImage] = {}
        for index, _ in queries:
            if index not in prepared:
                image = images[index]
                prepared[index] = image if isinstance(image, DetectorImage) else self.prepare_image(image)
        # Queries are batched only with queries whose detector input has the same shape: padding
        # changes what the Swin backbone sees, so a box would depend on the rest of its batch.
        groups: dict[tuple[int, ...], list[int]] = {}
        for q, (index, _) in enumerate(queries):
            groups.setdefault(tuple(prepared[index].pixels.shape), []).append(q)
        out: list[Detections | None] = [None] * len(queries)
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                found = self._detect_chunk(
                    [prepared[queries[q][0]] for q in chunk],
                    [queries[q][1] for q in chunk],
                    box_threshold,
                    text_threshold,
                )
                for q, detections in zip(chunk, found, strict=True):
                    out[q] = detections
        return out  # type: ignore[return-value]

    def _detect_chunk(
        self, images: list[DetectorImage], texts: list[str], box_threshold: float, text_threshold: float
    ) -> list[Detections]:
        pixels = torch.stack([im.pixels for im in images])  # one shape: no padding
        pixel_mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.long)
        tokens = self.processor.tokenizer(
            [normalize_caption(t) for t in texts],
            padding="longest",
            truncation=True,
            max_length=self.max_text_len,
            return_tensors="pt",
        )
        inputs = {k: v.to(self.device) for k, v in tokens.items()}
        with torch.inference_mode():
            outputs = self.model(
                pixel_values=pixels.to(self.device), pixel_mask=pixel_mask.to(self.device), **inputs
            )
            probs = outputs.logits.float().sigmoid()  # (B, queries, max_text_len); -inf past the text
            scores, _ = probs.max(dim=-1)
            boxes = outputs.pred_boxes.float()  # (B, queries, 4) cx, cy, w, h in [0, 1] of the image
            corners = torch.cat(
                [boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1
            )
            probs, scores, corners = probs.cpu(), scores.cpu(), corners.cpu()  # small: B x queries
        input_ids = tokens["input_ids"]
        special = torch.tensor(sorted(set(self.processor.tokenizer.all_special_ids)), dtype=input_ids.dtype)
        result = []
        for row, im in enumerate(images):
            h, w = im.size
            keep = torch.nonzero(scores[row] > box_threshold).flatten()
            keep = keep[scores[row, keep].argsort(descending=True, stable=True)]
            if self.max_detections is not None:
                keep = keep[: self.max_detections]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            xyxy = corners[row, keep] * scale
            xyxy = torch.stack(
                [
                    xyxy[:, 0].clamp(0, w),
                    xyxy[:, 1].clamp(0, h),
                    xyxy[:, 2].clamp(0, w),
                    xyxy[:, 3].clamp(0, h),
                ],
                1,
            )
            ids = input_ids[row]
            n_tokens = len(ids)
            token_ok = ~torch.isin(ids, special)
            labels = []
            for query in keep.tolist():
                chosen = (probs[row, query, :n_tokens] > text_threshold) & token_ok
                phrase = self.processor.tokenizer.decode(ids[chosen].tolist(), skip_special_tokens=True)
                labels.append(phrase.replace(" .", "").strip(" ."))
            result.append(Detections(xyxy.numpy().astype(np.float32), scores[row, keep].numpy(), labels))
        return result


@dataclass
class Grounding:
    """A detector and its input for each image of a batch (the original HxWx3 uint8 array, or a
    ``DetectorImage`` prepared on a CPU worker; None for images that no grounding request names)."""

    detector: GroundingDetector
    images: Sequence[np.ndarray | DetectorImage | None]

    def detect(self, queries: Sequence[tuple[int, str]], image_count: int) -> list[Detections]:
        """``GroundingDetector.detect`` over ``(image index, text)`` queries of a batch of images."""
        if len(self.images) != image_count:
            raise ValueError(f"{image_count} images but {len(self.images)} detector images")
        for image_index, _ in queries:
            if not isinstance(self.images[image_index], np.ndarray | DetectorImage):
                raise ValueError(
                    f"image {image_index}: GroundingDINO needs the original array or a DetectorImage"
                )
        return self.detector.detect(self.images, queries)  # type: ignore[arg-type]


_detectors: dict[tuple[Any, ...], GroundingDetector] = {}


def load_detector(
    name: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    *,
    box_threshold: float = DEFAULT_BOX_THRESHOLD,
    text_threshold: float = DEFAULT_TEXT_THRESHOLD,
    storage_options: Mapping[str, Any] | None = None,
) -> GroundingDetector:
    """``GroundingDetector.from_pretrained``, loaded once per process for each checkpoint, device
    and thresholds: the one detector cache (the engine and ``evf.segment`` both load through it)."""
    options = json.dumps(dict(storage_options or {}), sort_keys=True, default=str)
    key = (os.fspath(name), str(device), float(box_threshold), float(text_threshold), options)
    if key not in _detectors:
        _detectors[key] = GroundingDetector.from_pretrained(
            name,
            device,
            box_threshold=box_threshold,
            text_threshold=text_threshold,
            storage_options=storage_options,
        )
    return _detectors[key]
