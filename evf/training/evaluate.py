"""Mean IoU of a predictor on synthetic scenes, per expression kind (the demo model's quality bar).

- ``referring``: ``predict(prompt)`` vs the expression's mask;
- ``semantic``: ``predict(prompt, semantic=True)`` vs the mask;
- ``negative``: ``mask(prompt) & ~mask(negative_prompt)`` vs the mask, the prompt with the
  expression's ``semantic`` flag and the negative prompt (one object) without.

An empty prediction of an empty mask counts as IoU 1. Run as
``python -m evf.training.evaluate CHECKPOINT --seed 9999 --count 500``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator

import numpy as np

from evf.predictor import EvfSam2Predictor, Prompt
from evf.synthetic import KINDS, Scene, generate_scene


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """IoU of two bool (H, W) masks; 1.0 when both are empty."""
    union = np.count_nonzero(pred | truth)
    return 1.0 if union == 0 else np.count_nonzero(pred & truth) / union


def _scene_prompts(scene: Scene) -> list[Prompt]:
    prompts: dict[Prompt, None] = {}
    for expr in scene.expressions:
        prompts[Prompt(expr.prompt, expr.semantic)] = None
        if expr.negative_prompt is not None:
            prompts[Prompt(expr.negative_prompt)] = None
    return list(prompts)


def _chunks(seed: int, count: int, size: int) -> Iterator[list[Scene]]:
    for first in range(0, count, size):
        yield [generate_scene(seed, i) for i in range(first, min(first + size, count))]


def evaluate_synthetic(
    predictor: EvfSam2Predictor, seed: int, count: int, scenes_per_batch: int = 8
) -> dict[str, dict[str, float]]:
    """``{kind: {"miou": mean IoU, "n": number of expressions}}`` over scenes ``0..count-1`` of ``seed``."""
    scores: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for scenes in _chunks(seed, count, scenes_per_batch):
        requests = [_scene_prompts(scene) for scene in scenes]
        results = predictor.predict_batch([scene.image for scene in scenes], requests)
        for scene, prompts, predictions in zip(scenes, requests, results, strict=True):
            masks = {p: r.mask for p, r in zip(prompts, predictions, strict=True)}
            for expr in scene.expressions:
                pred = masks[Prompt(expr.prompt, expr.semantic)]
                if expr.negative_prompt is not None:
                    pred = pred & ~masks[Prompt(expr.negative_prompt)]
                scores[expr.kind].append(iou(pred, expr.mask))
    return {
        kind: {"miou": float(np.mean(v)) if v else float("nan"), "n": len(v)} for kind, v in scores.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint folder, URI, Hub id or evf-sam2-demo")
    parser.add_argument("--seed", type=int, default=9999, help="generator seed (never used in training)")
    parser.add_argument("--count", type=int, default=500, help="number of scenes")
    args = parser.parse_args()
    predictor = EvfSam2Predictor.from_pretrained(args.checkpoint)
    print(json.dumps(evaluate_synthetic(predictor, args.seed, args.count), indent=2))


if __name__ == "__main__":
    main()
