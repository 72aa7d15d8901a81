"""``EvfSam2Predictor``: embed each image once, answer many text prompts, in batches.

Coordinates and shapes: images are HxWx3 uint8 RGB numpy arrays (PIL images, paths and URIs are
converted with ``evf.io.as_rgb_array``); every mask returned is HxW
at the original image size, row-major (y, x). Mask logits are float32; the mask is ``logits > 0``.

Work per ``predict_batch`` call (N distinct images, P prompts in all):
- SAM 2 image encoder: one batch of N images;
- BEiT-3: one batch of P (image, prompt) pairs, texts right-padded with a key-padding mask;
- mask decoder: one call for all P prompts, each row paired with its image's features.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from evf.checkpoints import DEMO_MODEL_ID, resolve_checkpoint
from evf.errors import DeviceError
from evf.io import ImageLike, as_rgb_array
from evf.model.checkpoint import load_model
from evf.model.config import resolve_mode
from evf.model.evf_sam2 import EvfSam2Model, ImageEmbeddings
from evf.model.hardware import compile_encoders, resolve_dtype
from evf.tokenizer import EvfTokenizer
from evf.transforms import PreparedImage, Preprocessor, normalize_sam

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """One text prompt; ``semantic`` adds the ``[semantic]`` prefix (multitask checkpoints)."""

    text: str
    semantic: bool = False


@dataclass
class Prediction:
    """The mask for one prompt at the image's original size.

    mask_logits: (H, W) float32; mask: (H, W) bool (= logits > 0); score: predicted IoU;
    presence_logit: SAM 2's object-presence logit (what it means for text prompts is not
    established: EVF-SAM never used it).
    """

    mask_logits: np.ndarray
    mask: np.ndarray
    score: float
    presence_logit: float = float("nan")


@dataclass
class BoxMasks:
    """SAM 2 masks for the K boxes of one image (``predict_boxes``), at the original image size.

    mask_logits: (K, H, W) float32; masks: (K, H, W) bool (= logits > 0); scores: (K,) float32
    predicted IoU.
    """

    mask_logits: np.ndarray
    masks: np.ndarray
    scores: np.ndarray


def check_device(device: torch.device | str) -> None:
    """Raise ``DeviceError`` (one line, with the way out) when ``device`` does not exist here."""
    kind = torch.device(device)
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device {str(device)!r} was asked for but this machine has no CUDA GPU; use --device cpu"
        )
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise DeviceError(
            f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
        )


@dataclass
class EmbeddedImages:
    """SAM 2 features of a list of images, to answer any number of prompts about them."""

    embeddings: ImageEmbeddings
    images: list[PreparedImage] = field(repr=False)


PromptLike = str | Prompt

# SAM 2 point labels of a box prompt's two corners (top-left, bottom-right).
_BOX_CORNER_LABELS = (2, 3)


class EvfSam2Predictor:
    def __init__(
        self,
        model: EvfSam2Model,
        tokenizer: EvfTokenizer,
        *,
        mode: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        autocast: bool = True,
        model_id: str = "",
    ) -> None:
        """Wrap a loaded model; most users want ``from_pretrained``.

        Args:
            mode: ``"multitask"`` (the authors' current path: 3 masks, highest predicted IoU) or
                ``"legacy"`` (the path of the non-multitask checkpoints: single mask with SAM 2's
                stability fallback, ResizeLongestSide preprocessing). None follows the checkpoint:
                ``config.json``'s ``inference_mode`` if set, else multitask when the tokenizer has
                ``[semantic]`` (the ``-multitask`` checkpoints) and legacy otherwise.
            dtype: float32, or bfloat16/float16 for the weights and activations. With
                ``autocast`` (default) precision-sensitive ops run in float32 under
                ``torch.autocast``, as the authors' inference.py; without it everything runs in
                ``dtype`` (pure half precision, as their demo.py).
        """
        self.mode = resolve_mode(mode, model.config.inference_mode, tokenizer.supports_semantic)
        self.preprocessor = Preprocessor(self.mode, model.sam_image_size, model.beit3_image_size)
        self.device = torch.device(device)
        self.dtype = dtype
        self.use_autocast = autocast and dtype != torch.float32
        # Half-precision weights either way (memory, bandwidth); autocast then keeps LayerNorm,
        # softmax and the like in float32, as the authors' inference.py did.
        self.model = model.to(self.device, dtype).eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.is_demo_model = model_id == DEMO_MODEL_ID
        # Compiled BEiT-3 sees one graph per input structure: always passing the padding mask for
        # several prompts (an all-False mask changes nothing) leaves two, both compiled by warm_up.
        self.always_pad_mask = False

    @classmethod
    def from_pretrained(
        cls,
        path_or_uri: str | Path = DEMO_MODEL_ID,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        mode: str | None = None,
        *,
        autocast: bool = True,
        compile: bool = False,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        model_id: str | None = None,
    ) -> EvfSam2Predictor:
        """Load a checkpoint: a folder, an fsspec URI, a Hub id, or ``"evf-sam2-demo"``.

        ``model_id``: the name to report (default ``path_or_uri``), when a caller passes the
        folder it already resolved.

        ``dtype``: a ``torch.dtype``, a name (``"bfloat16"``) or ``"auto"`` (bfloat16 where the
        hardware runs it natively, float32 elsewhere; see ``evf.model.hardware``). The default
        float32 is the exact reference path.

        ``compile`` wraps the image encoder and BEiT-3 in ``torch.compile`` (inductor, CPU or CUDA)
        with the compiled graphs cached on disk (``evf.model.hardware.compile_cache_dir``), and
        compiles them here with ``warm_up`` so that the first real batch runs at full speed.
        """
        check_device(device)
        compute_dtype = resolve_dtype(dtype, device)
        folder = resolve_checkpoint(path_or_uri, storage_options, cache_dir)
        model = load_model(folder, device)
        if compile:
            compile_encoders(model)
        predictor = cls(
            model,
            EvfTokenizer.from_folder(folder),
            mode=mode,
            device=device,
            dtype=compute_dtype,
            autocast=autocast,
            model_id=model_id or str(path_or_uri),
        )
        if compile:
            predictor.always_pad_mask = True
            predictor.warm_up()
        return predictor

    def warm_up(self, images: int = 1, prompts_per_image: tuple[int, ...] = (2, 1)) -> None:
        """Run dummy batches so that ``torch.compile`` compiles (or loads from its cache) now.

        Covers ``images`` images per call and each count of prompts per image in
        ``prompts_per_image`` (BEiT-3 is compiled with dynamic shapes, so any larger count and any
        text length reuse the graph; a single prompt is a specialised shape of its own). Other
        image counts compile on first use.
        """
        blank = np.zeros((64, 64, 3), np.uint8)
        prepared = [self.prepare_image(blank)] * images
        texts = ["warm up", "warm up with a longer prompt"]  # different lengths: a padded batch
        for count in prompts_per_image:
            self.predict_batch(prepared, [[texts[i % 2] for i in range(count)]] * images)

    @property
    def supports_semantic(self) -> bool:
        return self.tokenizer.supports_semantic

    # -- CPU side ---------------------------------------------------------------------------
    def prepare_image(self, image: ImageLike) -> PreparedImage:
        """Resize one image (array, PIL image, path or URI) for both encoders (CPU only; safe to run
        in a separate worker)."""
        return self.preprocessor(as_rgb_array(image))

    # -- device side ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=self.dtype, enabled=self.use_autocast),
        ):
            yield

    def embed_images(self, images: Sequence[ImageLike | PreparedImage]) -> EmbeddedImages:
        """Run the SAM 2 image encoder once over all ``images`` (one batch)."""
        prepared = [im if isinstance(im, PreparedImage) else self.prepare_image(im) for im in images]
        size = self.model.sam_image_size
        with self._inference():
            pixels = torch.stack(
                [
                    normalize_sam(p.sam_pixels.to(self.device, non_blocking=True), size, self.dtype)
                    for p in prepared
                ]
            )
            return EmbeddedImages(self.model.encode_images(pixels), prepared)

    def predict_embedded(
        self, embedded: EmbeddedImages, prompts: Sequence[tuple[int, PromptLike]]
    ) -> list[Prediction]:
        """Answer prompts about already embedded images.

        Args:
            prompts: ``(image index into embedded.images, prompt)`` pairs, in any order.

        Returns:
            one ``Prediction`` per prompt, in the same order.
        """
        if not prompts:
            return []
        specs = [(i, p if isinstance(p, Prompt) else Prompt(p)) for i, p in prompts]
        image_index = [i for i, _ in specs]
        input_ids, padding = self.tokenizer.batch(
            [(p.text, p.semantic) for _, p in specs], self.model.config.beit3.max_text_tokens
        )
        if padding is None and self.always_pad_mask and len(specs) > 1:
            padding = torch.zeros(input_ids.shape, dtype=torch.bool)
        with self._inference():
            beit3_pixels = torch.stack([embedded.images[i].beit3_pixels for i in image_index])
            beit3_pixels = beit3_pixels.to(self.device, self.dtype, non_blocking=True)
            prompt_embeds = self.model.encode_prompts(
                beit3_pixels,
                input_ids.to(self.device, non_blocking=True),
                None if padding is None else padding.to(self.device, non_blocking=True),
            )
            index = torch.tensor(image_index, device=self.device)
            low_res, iou, presence = self.model.decode_masks(
                embedded.embeddings.select(index),
                prompt_embeds.to(embedded.embeddings.image_embed.dtype),
                multimask=self.mode == "multitask",
            )
            best = iou.argmax(dim=1)  # multitask: the highest predicted IoU of 3; legacy: the one mask
            rows = torch.arange(len(specs), device=self.device)
            low_res, score = low_res[rows, best].float(), iou[rows, best].float()
            logits = self._upsample(low_res, [embedded.images[i].size for i in image_index])
        scores, presences = score.cpu().tolist(), presence.float().cpu().tolist()
        return [Prediction(lg, lg > 0, s, p) for lg, s, p in zip(logits, scores, presences, strict=True)]

    def predict_boxes(
        self, embedded: EmbeddedImages, boxes: Sequence[tuple[int, np.ndarray]]
    ) -> list[BoxMasks]:
        """SAM 2 masks for box prompts on already embedded images: one decoder call for all boxes.

        Args:
            boxes: ``(image index into embedded.images, (K, 4) boxes)`` pairs; boxes are
                ``(x0, y0, x1, y1)`` float pixels of that image's original size (x right, y down);
                K may be 0.

        Each box is a prompt of its own (``multimask_output=False``, SAM 2's standard box path with
        its stability fallback). Coordinates are divided by the original width/height and scaled
        to the S x S SAM 2 input, as ``SAM2ImagePredictor`` does (both stretch the image to S x S).

        Returns:
            one ``BoxMasks`` per pair, in order.
        """
        arrays = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for _, b in boxes]
        counts = [len(a) for a in arrays]
        sizes = [embedded.images[i].size for i, _ in boxes]
        rows = [i for (i, _), k in zip(boxes, counts, strict=True) for _ in range(k)]
        row_sizes = [s for s, k in zip(sizes, counts, strict=True) for _ in range(k)]
        logits: list[np.ndarray] = []
        scores = np.zeros(0, np.float32)
        if rows:
            with self._inference():
                low_res, iou = self._decode_boxes(embedded, np.concatenate(arrays), rows, row_sizes)
                logits = self._upsample(low_res, row_sizes)
                scores = iou.cpu().numpy()
        out, start = [], 0
        for k, size in zip(counts, sizes, strict=True):
            if k == 0:
                empty = np.zeros((0, *size), np.float32)
                out.append(BoxMasks(empty, empty > 0, np.zeros(0, np.float32)))
                continue
            stacked = np.stack(logits[start : start + k])
            out.append(BoxMasks(stacked, stacked > 0, scores[start : start + k].copy()))
            start += k
        return out

    def _decode_boxes(
        self, embedded: EmbeddedImages, boxes: np.ndarray, rows: list[int], sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """(N, 4) xyxy boxes, one per decoder row -> low-res logits (N, h, w) and IoU (N,) in float32."""
        size = self.model.sam_image_size
        coords = torch.as_tensor(boxes, dtype=torch.float, device=self.device).reshape(-1, 2, 2)
        hw = torch.tensor(sizes, dtype=torch.float, device=self.device)  # (N, 2) = (H, W)
        coords = torch.stack([coords[..., 0] / hw[:, 1:2], coords[..., 1] / hw[:, 0:1]], dim=-1) * size
        labels = torch.tensor([_BOX_CORNER_LABELS], dtype=torch.int, device=self.device).repeat(len(rows), 1)
        # Half-precision weights (with autocast or without) give a half Fourier matrix that the prompt
        # encoder multiplies with float32 coordinates: that step runs under autocast either way (an
        # inner autocast(enabled=False) would switch the caller's off).
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            encoder = self.model.visual_model.sam_prompt_encoder
            sparse, _ = encoder(points=(coords, labels), boxes=None, masks=None)
        embeddings = embedded.embeddings
        low_res, iou, _ = self.model.decode_masks(
            embeddings.select(torch.tensor(rows, device=self.device)),
            sparse.to(embeddings.image_embed.dtype),
            multimask=False,
        )
        return low_res[:, 0].float(), iou[:, 0].float()

    @staticmethod
    def _upsample(low_res: Tensor, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """(P, h, w) low-res logits -> per prompt (H_p, W_p) float32 numpy (bilinear, no crop)."""
        out: list[np.ndarray | None] = [None] * len(sizes)
        for size in dict.fromkeys(sizes):  # one interpolate per distinct output size
            rows = [i for i, s in enumerate(sizes) if s == size]
            up = F.interpolate(low_res[rows].unsqueeze(1), size, mode="bilinear", align_corners=False)[:, 0]
            for row, arr in zip(rows, up.cpu().numpy(), strict=True):
                out[row] = arr
        return out  # type: ignore[return-value]

    def predict_batch(
        self, images: Sequence[ImageLike | PreparedImage], requests: Sequence[Sequence[PromptLike]]
    ) -> list[list[Prediction]]:
        """Masks for several images, each with one or more prompts.

        ``requests[i]`` are the prompts for ``images[i]``. Each image is encoded once.
        Returns ``result[i][j]`` for prompt j of image i.
        """
        if len(images) != len(requests):
            raise ValueError(f"{len(images)} images but {len(requests)} prompt lists")
        pairs = [(i, p) for i, plist in enumerate(requests) for p in plist]
        flat = iter(self.predict_embedded(self.embed_images(images), pairs)) if pairs else iter(())
        return [[next(flat) for _ in plist] for plist in requests]

    def predict(self, image: ImageLike, prompt: str, semantic: bool = False) -> Prediction:
        """The mask for one prompt on one image (array, PIL image, path or URI)."""
        return self.predict_batch([image], [[Prompt(prompt, semantic)]])[0][0]
