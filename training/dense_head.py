"""A training-only head that teaches SAM 2's image encoder what shape, colour and size each pixel
is on.

Trained from scratch through the mask loss alone, the demo model's Hiera collapses to colour-blind
objectness: nothing in "the circle" versus "the hexagon", or even "the red shape" versus "the blue
shape", reaches the encoder strongly enough. The synthetic generator knows which shape and colour
cover every pixel, and ``benchmarks/shape_probe.py`` shows that such dense labels teach Hiera shape
(with ``evf train``'s optimiser). ``DenseHead`` reads the features the mask decoder reads and
classifies every low-res cell by the kinds ``loss.dense_labels`` lists (shape, colour, size word);
its cross-entropies, weighted by ``loss.dense``, are added to the mask loss. It lives only in the
trainer: it is not part of ``EvfSam2Model`` and never enters a checkpoint's ``model.safetensors``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evf.model.evf_sam2 import ImageEmbeddings
from evf.synthetic import COLOURS, SHAPES, SIZES, Scene
from evf.training.losses import cell_coverage

# Label 0 is the background in every map; the loss ignores it (the question is which shape,
# colour and size an object has, not where objects are: the mask loss teaches that).
COLOUR_NAMES = list(COLOURS)
SIZE_NAMES = list(SIZES)
LABEL_CLASSES = {"shape": 1 + len(SHAPES), "colour": 1 + len(COLOURS), "size": 1 + len(SIZES)}
"""The label maps, in the order of ``label_maps``, and their class counts (background included)."""
LABEL_KINDS = tuple(LABEL_CLASSES)


def label_maps(scene: Scene) -> np.ndarray:
    """(3, H, W) uint8, one map per ``LABEL_KINDS``: [0] ``1 + SHAPES.index(shape)``, [1] ``1 +``
    the colour's position in ``COLOURS``, [2] ``1 +`` the size word's position in ``SIZES``, on each
    object's visible pixels; 0 on the background."""
    labels = np.zeros((len(LABEL_KINDS), *scene.image.shape[:2]), np.uint8)
    for obj in scene.objects:  # visible masks: where objects overlap, the one on top owns the pixel
        labels[0][obj.mask] = SHAPES.index(obj.shape) + 1
        labels[1][obj.mask] = COLOUR_NAMES.index(obj.colour) + 1
        labels[2][obj.mask] = SIZE_NAMES.index(obj.size_word) + 1
    return labels


def _cells(labels: np.ndarray, classes: int, size: int) -> Tensor:
    one_hot = torch.from_numpy(labels).long()[None] == torch.arange(classes)[:, None, None]
    return cell_coverage(one_hot, size).argmax(dim=0)


def cell_labels(maps: np.ndarray, size: int) -> Tensor:
    """(3, H, W) ``label_maps`` -> (3, size, size) int64: the class covering most of each low-res
    cell, on the same cells as the mask targets (``cell_coverage``)."""
    return torch.stack(
        [_cells(m, LABEL_CLASSES[kind], size) for m, kind in zip(maps, LABEL_KINDS, strict=True)]
    )


class DenseHead(nn.Module):
    """A 1x1 convolution over the three feature levels of ``EvfSam2Model.encode_images``, each
    upsampled (bilinear) to the finest one (S/4): ``d_model`` + ``d_model/8`` + ``d_model/4``
    channels in, the logits of each of ``kinds`` (a subset of ``LABEL_KINDS``) out."""

    def __init__(self, d_model: int, kinds: Sequence[str]) -> None:
        super().__init__()
        self.rows = self._rows(kinds)
        self.kinds = list(self.rows)  # in LABEL_KINDS order, whatever order ``kinds`` has
        classes = sum(LABEL_CLASSES[kind] for kind in self.kinds)
        self.classify = nn.Conv2d(d_model + d_model // 8 + d_model // 4, classes, 1)

    def load_kinds(self, state: dict[str, Tensor], kinds: Sequence[str]) -> list[str]:
        """Copy the weights of every kind this head and another (its ``state_dict`` and ``kinds``)
        both classify; the others keep their fresh initialisation. Returns the kinds copied."""
        ours, theirs = self.rows, self._rows(kinds)
        shared = [kind for kind in self.kinds if kind in theirs]
        with torch.no_grad():
            for kind in shared:
                for name, param in self.classify.named_parameters():
                    param[ours[kind]] = state[f"classify.{name}"][theirs[kind]]
        return shared

    @staticmethod
    def _rows(kinds: Sequence[str]) -> dict[str, slice]:
        """The output rows of each kind in a head that classifies ``kinds`` (in LABEL_KINDS order)."""
        rows, start = {}, 0
        for kind in (k for k in LABEL_KINDS if k in kinds):
            rows[kind] = slice(start, start + LABEL_CLASSES[kind])
            start += LABEL_CLASSES[kind]
        return rows

    def forward(self, embeddings: ImageEmbeddings) -> list[Tensor]:
        """-> per kind, logits (N, LABEL_CLASSES[kind], S/4, S/4)."""
        size = embeddings.high_res[0].shape[-2:]
        levels = [embeddings.image_embed, *embeddings.high_res]
        upsampled = [F.interpolate(x.float(), size, mode="bilinear") for x in levels]
        logits = self.classify(torch.cat(upsampled, dim=1))
        return [logits[:, rows] for rows in self.rows.values()]

    def loss(self, embeddings: ImageEmbeddings, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The sum of each kind's cross-entropy on the object cells of ``labels`` (N, 3, S/4, S/4;
        ``cell_labels``), and the loss and accuracy of each there (for the training log)."""
        total = torch.zeros((), device=labels.device)
        metrics: dict[str, float] = {}
        for kind, logits in zip(self.kinds, self.forward(embeddings), strict=True):
            target = labels[:, LABEL_KINDS.index(kind)]
            loss = F.cross_entropy(logits, target, ignore_index=0)
            total = total + loss
            on_object = target > 0
            metrics[kind] = float(loss.detach())
            metrics[f"{kind}_acc"] = float((logits.argmax(1)[on_object] == target[on_object]).float().mean())
        return total, metrics
