"""A training-only head that teaches SAM 2's image encoder what shape and colour each pixel is on.

Trained from scratch through the mask loss alone, the demo model's Hiera collapses to colour-blind
objectness: nothing in "the circle" versus "the hexagon", or even "the red shape" versus "the blue
shape", reaches the encoder strongly enough. The synthetic generator knows which shape and colour
cover every pixel, and ``benchmarks/shape_probe.py`` shows that such dense labels teach Hiera shape
(with ``evf train``'s optimiser). ``DenseHead`` reads the features the mask decoder reads and
classifies every low-res cell twice (shape, colour); its cross-entropies, weighted by ``loss.dense``,
are added to the mask loss. It lives only in the trainer: it is not part of ``EvfSam2Model`` and
never enters a checkpoint's ``model.safetensors``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evf.model.evf_sam2 import ImageEmbeddings
from evf.synthetic import COLOURS, SHAPES, Scene
from evf.training.losses import cell_coverage

# Label 0 is the background in both maps; the loss ignores it (the question is which shape and
# colour an object has, not where objects are: the mask loss teaches that).
SHAPE_CLASSES = 1 + len(SHAPES)
COLOUR_CLASSES = 1 + len(COLOURS)
COLOUR_NAMES = list(COLOURS)


def label_maps(scene: Scene) -> np.ndarray:
    """(2, H, W) uint8: [0] ``1 + SHAPES.index(shape)``, [1] ``1 + COLOURS`` position of the colour,
    on each object's visible pixels; 0 on the background."""
    labels = np.zeros((2, *scene.image.shape[:2]), np.uint8)
    for obj in scene.objects:  # visible masks: where objects overlap, the one on top owns the pixel
        labels[0][obj.mask] = SHAPES.index(obj.shape) + 1
        labels[1][obj.mask] = COLOUR_NAMES.index(obj.colour) + 1
    return labels


def _cells(labels: np.ndarray, classes: int, size: int) -> Tensor:
    one_hot = torch.from_numpy(labels).long()[None] == torch.arange(classes)[:, None, None]
    return cell_coverage(one_hot, size).argmax(dim=0)


def cell_labels(maps: np.ndarray, size: int) -> Tensor:
    """(2, H, W) ``label_maps`` -> (2, size, size) int64: the class covering most of each low-res
    cell, on the same cells as the mask targets (``cell_coverage``)."""
    return torch.stack([_cells(maps[0], SHAPE_CLASSES, size), _cells(maps[1], COLOUR_CLASSES, size)])


class DenseHead(nn.Module):
    """A 1x1 convolution over the three feature levels of ``EvfSam2Model.encode_images``, each
    upsampled (bilinear) to the finest one (S/4): ``d_model`` + ``d_model/8`` + ``d_model/4``
    channels in, ``SHAPE_CLASSES`` + ``COLOUR_CLASSES`` logits out."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.classify = nn.Conv2d(d_model + d_model // 8 + d_model // 4, SHAPE_CLASSES + COLOUR_CLASSES, 1)

    def forward(self, embeddings: ImageEmbeddings) -> tuple[Tensor, Tensor]:
        """-> shape logits (N, SHAPE_CLASSES, S/4, S/4), colour logits (N, COLOUR_CLASSES, S/4, S/4)."""
        size = embeddings.high_res[0].shape[-2:]
        levels = [embeddings.image_embed, *embeddings.high_res]
        upsampled = [F.interpolate(x.float(), size, mode="bilinear") for x in levels]
        logits = self.classify(torch.cat(upsampled, dim=1))
        return logits[:, :SHAPE_CLASSES], logits[:, SHAPE_CLASSES:]

    def loss(self, embeddings: ImageEmbeddings, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Shape + colour cross-entropy on the object cells of ``labels`` (N, 2, S/4, S/4), and the
        loss and accuracy of each there (for the training log)."""
        losses: list[Tensor] = []
        metrics: dict[str, float] = {}
        for name, logits, target in zip(
            ("shape", "colour"), self.forward(embeddings), labels.unbind(1), strict=True
        ):
            loss = F.cross_entropy(logits, target, ignore_index=0)
            losses.append(loss)
            on_object = target > 0
            metrics[name] = float(loss.detach())
            metrics[f"{name}_acc"] = float((logits.argmax(1)[on_object] == target[on_object]).float().mean())
        return losses[0] + losses[1], metrics
