"""Training samples: an image, prepared exactly as the predictor prepares it, and its prompt targets.

Two sources give an ``Example`` (an image and its targets) per index:

- ``SyntheticScenes``: ``evf.synthetic.generate_scene`` on the fly. Referring and semantic
  expressions are used as they are (semantic ones with ``semantic=True``, i.e. the
  ``[semantic] `` prefix). A negative expression becomes two targets: its ``prompt`` against that
  prompt's own mask and its ``negative_prompt`` against the negative object's mask. The model
  learns positive targets only; the subtraction happens at inference.
- ``ManifestImages``: a Parquet manifest (image_url, prompt, mask_url, optional
  negative_prompt / semantic_type), grouped by image so each image is encoded once per step.

``StepBatches`` decides which images (and which subset of their prompts) each step sees, as a
pure function of ``(seed, step)``, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from evf.synthetic import ARTICLE, PLURALS, Scene, generate_scene, referring_candidates, vocabulary_corpus
from evf.training.dense_head import cell_labels, label_maps
from evf.training.losses import cell_coverage
from evf.transforms import Preprocessor

log = logging.getLogger(__name__)

BACKGROUND = "background"
# Third word of the per-image rng key of no_article_share (``[generator seed, index, 2]``), apart
# from the per-step subset rng ``[seed, index, step]`` whenever the two seeds differ.
NO_ARTICLE_STREAM = 2


@dataclass
class Target:
    """One prompt and the mask it must give: ``mask`` is bool (H, W) at the image's size."""

    prompt: str
    semantic: bool
    mask: np.ndarray


@dataclass
class Example:
    """What a source gives for one image: the (H, W, 3) uint8 RGB image, its targets (at least
    one) and, where the source knows them, per-pixel shape, colour and size labels
    (``dense_head.label_maps``)."""

    image: np.ndarray
    targets: list[Target]
    labels: np.ndarray | None = None


@dataclass
class TrainSample:
    """One image as the predictor prepares it, with the P targets chosen for this step.

    sam_pixels: (3, S, S) uint8 (multitask) or (3, h, w) uint8 with max(h, w) = S (legacy).
    beit3_pixels: (3, s, s) float32.
    prompts: P (text, semantic) pairs, 1 <= P <= prompts_per_image.
    coverage: (P, S/4, S/4) float32, the target masks as low-res cell coverage (``cell_coverage``).
    dense_labels: (3, S/4, S/4) int64 shape, colour and size class of each cell
        (``dense_head.cell_labels``), or None when the source has no such labels.
    """

    sam_pixels: Tensor
    beit3_pixels: Tensor
    prompts: list[tuple[str, bool]]
    coverage: Tensor
    dense_labels: Tensor | None = None


class ImageSource(Protocol):
    """Indexable images with their targets."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> Example:
        """Image ``index`` with its targets."""
        ...

    def corpus(self) -> list[str]:
        """Every prompt text of the source, to build a tokenizer from."""
        ...


# ----------------------------------------------------------------------------- synthetic scenes


def phrase_mask(scene: Scene, phrase: str) -> np.ndarray:
    """The bool (H, W) mask that a generator phrase names in ``scene``.

    ``"background"``, ``"all <plural>"``, ``"all <colour> shapes"`` or a referring phrase that
    names exactly one object (``evf.synthetic.referring_candidates``).
    """
    objects = scene.objects
    h, w = scene.image.shape[:2]
    if phrase == BACKGROUND:
        return ~np.logical_or.reduce([o.mask for o in objects])
    members = [o for o in objects if phrase in (f"all {PLURALS[o.shape]}", f"all {o.colour} shapes")] or [
        o for i, o in enumerate(objects) if phrase in referring_candidates(objects, i, h, w)
    ]
    if not members:
        raise ValueError(f"phrase {phrase!r} names nothing in this scene")
    return np.logical_or.reduce([o.mask for o in members])


def scene_targets(scene: Scene) -> list[Target]:
    """Positive targets of all expressions of a scene, without duplicates (see the module docstring)."""
    targets: dict[tuple[str, bool], Target] = {}
    for expr in scene.expressions:
        if expr.kind == "negative":
            pairs = [(expr.prompt, expr.semantic), (expr.negative_prompt, False)]
            for text, semantic in pairs:
                if text is not None and (text, semantic) not in targets:
                    targets[(text, semantic)] = Target(text, semantic, phrase_mask(scene, text))
        else:
            targets.setdefault((expr.prompt, expr.semantic), Target(expr.prompt, expr.semantic, expr.mask))
    return list(targets.values())


def every_phrase_target(scene: Scene, every_position: bool = False) -> list[Target]:
    """Every phrase the generator could have drawn for ``scene``: each referring phrase of each
    object (``referring_candidates``; with ``every_position`` also the position phrases of objects
    that a shorter phrase already names), each group (``all circles``, ``all red shapes``,
    semantic) and ``background`` (semantic). A superset of ``scene_targets``."""
    objects = scene.objects
    h, w = scene.image.shape[:2]
    targets = [
        Target(phrase, False, obj.mask)
        for i, obj in enumerate(objects)
        for phrase in referring_candidates(objects, i, h, w, every_position=every_position)
    ]
    groups = dict.fromkeys(f"all {PLURALS[o.shape]}" for o in objects)
    groups.update(dict.fromkeys(f"all {o.colour} shapes" for o in objects))
    targets += [Target(text, True, phrase_mask(scene, text)) for text in [*groups, BACKGROUND]]
    return targets


def without_article(targets: list[Target], share: float, rng: np.random.Generator) -> list[Target]:
    """``targets`` with the leading article removed from about ``share`` of the referring ones
    ("the red circle" -> "red circle"): the generator always writes it, users often do not."""
    return [
        Target(t.prompt.removeprefix(f"{ARTICLE} "), t.semantic, t.mask)
        if not t.semantic and rng.random() < share
        else t
        for t in targets
    ]


class SyntheticScenes:
    """Scenes ``0..count-1`` of generator seed ``seed`` (about 6 ms each, so made on demand).

    With ``every_phrase`` an image brings all its possible phrases (``every_phrase_target``, with
    ``every_position`` the position phrases of every separable pair too), not only the expressions
    the generator drew: more distinct targets per encoded image. ``no_article_share`` is the share of
    referring phrases trained without their leading article (chosen per image, deterministically).
    """

    def __init__(
        self,
        seed: int,
        count: int,
        every_phrase: bool = False,
        every_position: bool = False,
        no_article_share: float = 0.0,
    ) -> None:
        self.seed = seed
        self.count = count
        self.every_phrase = every_phrase
        self.every_position = every_position
        self.no_article_share = no_article_share

    def __len__(self) -> int:
        return self.count

    def load(self, index: int) -> Example:
        scene = generate_scene(self.seed, index)
        if self.every_phrase:
            targets = every_phrase_target(scene, every_position=self.every_position)
        else:
            targets = scene_targets(scene)
        if self.no_article_share:
            rng = np.random.default_rng([self.seed, index, NO_ARTICLE_STREAM])
            targets = without_article(targets, self.no_article_share, rng)
        return Example(scene.image, targets, label_maps(scene))

    def corpus(self) -> list[str]:
        return vocabulary_corpus()


# ----------------------------------------------------------------------------- Parquet manifests


class ManifestImages:
    """The images of a Parquet manifest (a file or a folder, as ``evf run`` reads it), each with its
    (prompt, mask) rows. ``image_url`` and ``mask_url`` resolve like the job's (``evf.manifest``);
    masks are read with ``evf.io.load_mask``.
    """

    COLUMNS = ("image_url", "prompt", "mask_url", "negative_prompt", "semantic_type")

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        from evf.manifest import read_rows, resolve_url, scan_manifest
        from evf.storage import Storage

        self.storage = Storage.from_environment(storage_options)
        self.images: list[str] = []
        self.rows: list[list[tuple[str, bool, str]]] = []
        by_image: dict[str, int] = {}
        skipped = 0
        for file in scan_manifest(uri, self.storage.options(uri)).files:
            if "mask_url" not in file.columns:
                raise ValueError(f"manifest file {file.uri!r} lacks the column mask_url (ground truth)")
            for row in read_rows(file, 0, file.num_rows, self.COLUMNS, self.storage.options(file.uri)):
                if (row.get("negative_prompt") or "").strip():
                    skipped += 1
                    continue
                image = resolve_url(row["image_url"], file.base)
                if image not in by_image:
                    by_image[image] = len(self.images)
                    self.images.append(image)
                    self.rows.append([])
                mask = resolve_url(row["mask_url"], file.base)
                self.rows[by_image[image]].append((row["prompt"], bool(row.get("semantic_type")), mask))
        if skipped:
            log.warning("%s: skipped %d rows with a negative_prompt (no per-prompt mask)", uri, skipped)
        if not self.images:
            raise ValueError(f"manifest {uri!r} has no usable rows")

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Example:
        from evf.io import load_image, load_mask

        uri = self.images[index]
        image = load_image(uri, self.storage.options(uri))
        targets = []
        for prompt, semantic, mask_url in self.rows[index]:
            mask = load_mask(mask_url, self.storage.options(mask_url))
            if mask.shape != image.shape[:2]:
                raise ValueError(
                    f"mask {mask_url!r} is {mask.shape[1]}x{mask.shape[0]} but its image "
                    f"{uri!r} is {image.shape[1]}x{image.shape[0]}"
                )
            targets.append(Target(prompt, semantic, mask))
        return Example(image, targets)

    def corpus(self) -> list[str]:
        return [prompt for rows in self.rows for prompt, _, _ in rows]


# ----------------------------------------------------------------------------- dataset and sampler


class TrainDataset(Dataset):
    """``dataset[(index, step)]``: image ``index`` prepared for both encoders, with a subset of its
    targets chosen by ``numpy.random.default_rng([seed, index, step])``.

    Images are prepared by ``preprocessor`` exactly as the predictor prepares them; targets become
    cell coverage at the decoder's low-res mask size (S/4).
    """

    def __init__(
        self, source: ImageSource, preprocessor: Preprocessor, prompts_per_image: int, seed: int
    ) -> None:
        self.source = source
        self.preprocessor = preprocessor
        self.mask_size = preprocessor.sam_size // 4
        self.prompts_per_image = prompts_per_image
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> TrainSample:
        index, step = key
        example = self.source.load(index)
        targets = example.targets
        if len(targets) > self.prompts_per_image:
            rng = np.random.default_rng([self.seed, index, step])
            chosen = sorted(rng.choice(len(targets), self.prompts_per_image, replace=False))
            targets = [targets[i] for i in chosen]
        masks = torch.from_numpy(np.stack([t.mask for t in targets]))
        prepared = self.preprocessor(example.image)
        return TrainSample(
            prepared.sam_pixels,
            prepared.beit3_pixels,
            [(t.prompt, t.semantic) for t in targets],
            cell_coverage(masks, self.mask_size),
            None if example.labels is None else cell_labels(example.labels, self.mask_size),
        )


class StepBatches(Sampler[list[tuple[int, int]]]):
    """Batches of ``(image index, step)`` keys for steps ``start..steps-1``.

    Images are visited in epochs, each a permutation drawn from ``default_rng([seed, epoch])``;
    step ``k`` takes positions ``k*batch_size .. (k+1)*batch_size-1`` of that endless sequence.
    """

    def __init__(self, num_images: int, batch_size: int, seed: int, start: int, steps: int) -> None:
        self.num_images = num_images
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.steps = steps
        self._epoch: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_images)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_images))
        return int(self._epoch[1][offset])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.steps):
            first = step * self.batch_size
            yield [(self._index(first + j), step) for j in range(self.batch_size)]
