"""Scoring masks against ground truth: IoU, mIoU, cIoU and the per-kind report.

* a row's IoU is ``|P & G| / |P | G|``; **an empty prediction of an empty ground truth scores 1**
  (the right answer to "the cross" in a scene without one);
* ``error`` rows (no mask was produced) score 0 and are counted apart;
* mIoU is the mean of the rows' IoUs; cIoU, as the EVF-SAM paper reports it, is the cumulative
  intersection over the cumulative union of all rows (an error row adds its ground truth's area to
  the union). cIoU is 1 when the union of every row is empty.

Rows are grouped by prompt kind: a manifest's ``kind`` column where a row has one, else
``semantic`` (``semantic_type`` true), ``negative`` (``negative_prompt`` set) or ``referring``.

Two evaluators produce an :class:`EvalReport`: ``evf.pipelines.evaluate.evaluate`` (through the batch
job, ``evf eval``) and :func:`evaluate_synthetic` (in process, on generated scenes).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from evf.synthetic import Scene, generate_scene

if TYPE_CHECKING:
    from evf.predictor import EvfSam2Predictor, Prompt

__all__ = [
    "KIND_ORDER",
    "EvalReport",
    "RowResult",
    "Scores",
    "derive_kind",
    "evaluate_synthetic",
    "iou_of",
    "mask_counts",
]

KIND_ORDER = ("referring", "semantic", "negative")


def mask_counts(prediction: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """``(|P & G|, |P | G|)`` of two boolean (H, W) masks of the same shape."""
    if prediction.shape != truth.shape:
        raise ValueError(f"mask shape {prediction.shape} differs from ground truth shape {truth.shape}")
    return int(np.count_nonzero(prediction & truth)), int(np.count_nonzero(prediction | truth))


def iou_of(intersection: int, union: int) -> float:
    """``intersection / union``; 1.0 when both masks are empty (the right answer to nothing)."""
    return intersection / union if union else 1.0


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) and value == value  # NaN is not true


def derive_kind(kind: Any, semantic_type: Any, negative_prompt: Any) -> str:
    """The row's ``kind`` if set, else semantic / negative / referring from its options."""
    if isinstance(kind, str) and kind.strip():
        return kind.strip()
    if _truthy(semantic_type):
        return "semantic"
    if isinstance(negative_prompt, str) and negative_prompt.strip():
        return "negative"
    return "referring"


@dataclass(frozen=True)
class RowResult:
    """One scored row: its kind, status, and the intersection/union (pixels) behind its IoU."""

    id: str
    kind: str
    status: str
    intersection: int
    union: int
    mask_url: str | None
    gt_url: str

    @property
    def iou(self) -> float:
        """``intersection / union``; 1.0 when both masks are empty; 0.0 for error rows."""
        if self.status == "error":
            return 0.0
        return iou_of(self.intersection, self.union)


@dataclass(frozen=True)
class Scores:
    """Aggregate of some rows: count, error rows, mIoU and cIoU."""

    rows: int
    errors: int
    miou: float
    ciou: float

    @classmethod
    def of(cls, rows: Sequence[RowResult]) -> Scores:
        intersection = sum(r.intersection for r in rows)
        union = sum(r.union for r in rows)
        return cls(
            rows=len(rows),
            errors=sum(r.status == "error" for r in rows),
            miou=float(np.mean([r.iou for r in rows])) if rows else 0.0,
            ciou=intersection / union if union else 1.0,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "errors": self.errors, "mIoU": self.miou, "cIoU": self.ciou}


@dataclass
class EvalReport:
    """Scored rows with their totals and per-kind scores. ``output`` is where the masks are (None
    when they went to a deleted temp dir or were never written)."""

    model: str
    manifest: str
    output: str | None
    rows: list[RowResult]
    job_s: float
    score_s: float
    by_kind: dict[str, Scores] = field(init=False)
    total: Scores = field(init=False)

    def __post_init__(self) -> None:
        self.total = Scores.of(self.rows)
        kinds = {r.kind for r in self.rows}
        ordered = [k for k in KIND_ORDER if k in kinds] + sorted(kinds - set(KIND_ORDER))
        self.by_kind = {k: Scores.of([r for r in self.rows if r.kind == k]) for k in ordered}

    @property
    def miou(self) -> float:
        return self.total.miou

    @property
    def ciou(self) -> float:
        return self.total.ciou

    @property
    def errors(self) -> int:
        return self.total.errors

    def to_dict(self) -> dict[str, Any]:
        """The machine-readable summary (the last line ``evf eval`` prints)."""
        return {
            "model": self.model,
            "manifest": self.manifest,
            "rows": self.total.rows,
            "errors": self.total.errors,
            "mIoU": self.total.miou,
            "cIoU": self.total.ciou,
            "by_kind": {k: s.to_dict() for k, s in self.by_kind.items()},
            "job_s": round(self.job_s, 2),
            "score_s": round(self.score_s, 2),
        }

    def format_table(self) -> str:
        """A readable table: one line per kind, then the total."""
        lines = [f"{'kind':<12}{'rows':>7}{'errors':>8}{'mIoU':>9}{'cIoU':>9}"]
        entries = [*self.by_kind.items(), ("all", self.total)]
        for i, (kind, s) in enumerate(entries):
            if i == len(entries) - 1:
                lines.append("-" * len(lines[0]))
            lines.append(f"{kind:<12}{s.rows:>7}{s.errors:>8}{s.miou:>9.4f}{s.ciou:>9.4f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# In process, on generated scenes
# --------------------------------------------------------------------------------------------------


def _scene_prompts(scene: Scene) -> list[Prompt]:
    from evf.predictor import Prompt

    prompts: dict[Prompt, None] = {}
    for expr in scene.expressions:
        prompts[Prompt(expr.prompt, expr.semantic)] = None
        if expr.negative_prompt is not None:
            prompts[Prompt(expr.negative_prompt)] = None
    return list(prompts)


def _chunks(seed: int, count: int, size: int) -> Iterator[tuple[range, list[Scene]]]:
    for first in range(0, count, size):
        indices = range(first, min(first + size, count))
        yield indices, [generate_scene(seed, i) for i in indices]


def evaluate_synthetic(
    predictor: EvfSam2Predictor, seed: int, count: int, scenes_per_batch: int = 8
) -> EvalReport:
    """Score ``predictor`` on scenes ``0..count-1`` of generator ``seed``, one row per expression.

    ``referring``: ``predict(prompt)``; ``semantic``: ``predict(prompt, semantic=True)``;
    ``negative``: ``mask(prompt) & ~mask(negative_prompt)``, the negative prompt (one object)
    without the semantic prefix, exactly as ``evf.segment`` subtracts it.
    """
    from evf.predictor import Prompt

    rows: list[RowResult] = []
    for indices, scenes in _chunks(seed, count, scenes_per_batch):
        requests = [_scene_prompts(scene) for scene in scenes]
        results = predictor.predict_batch([scene.image for scene in scenes], requests)
        for index, scene, prompts, predictions in zip(indices, scenes, requests, results, strict=True):
            masks = {p: r.mask for p, r in zip(prompts, predictions, strict=True)}
            for number, expr in enumerate(scene.expressions):
                predicted = masks[Prompt(expr.prompt, expr.semantic)]
                if expr.negative_prompt is not None:
                    predicted = predicted & ~masks[Prompt(expr.negative_prompt)]
                status = "ok" if predicted.any() else "empty"
                row_id = f"{seed}-{index}-{number}"
                rows.append(
                    RowResult(row_id, expr.kind, status, *mask_counts(predicted, expr.mask), None, "")
                )
    return EvalReport(predictor.model_id, f"synthetic seed {seed} x {count}", None, rows, 0.0, 0.0)
