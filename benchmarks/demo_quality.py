"""How well does a model follow each part of a prompt, and does it work beyond its own generator?

Two tables, in process (``EvfSam2Predictor``; ``evf eval`` gives the per-kind figures through the
Ray job):

1. **By what a referring phrase names**, on held-out scenes of ``evf.synthetic`` (seed 9999, never
   trained on): every referring expression is grouped by the words it uses (colour, size, shape
   name or the word "shape", and a position such as "on the left").
   Beside each mean: the share of prompts whose mask misses (IoU < 0.5: another object, or a
   union) and the mean IoU of the rest, which separates choosing the object from drawing it; and
   the resolution ceiling, what a perfect mask on the model's low-res grid (a quarter of SAM's
   input side) scores once the predictor upsamples it.
2. **Do position words change the mask?** For every object that shares its description with exactly
   one other, well apart (``referring_candidates(..., every_position=True)``), the mask of "the
   circle on the left" against the mask of "the circle on the right": a model that ignores the
   position word gives the same mask for both (IoU 1) and picks the named object as often as the
   other one (share 0.5).
3. **Scenes drawn by other code**: PIL's ``ImageDraw`` on a plain or per-pixel-noise background
   (the generator never draws either kind of noise this way), one or two shapes that do not
   overlap, and prompts without the article ("red circle") or the shape name alone ("hexagon")
   when it is unique. The ground truth is each shape's own drawn mask.

    .venv/bin/python benchmarks/demo_quality.py [--model evf-sam2-demo] [--scenes 500] [--drawn 200]
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from evf.metrics import evaluate_synthetic, iou_of, mask_counts
from evf.predictor import EvfSam2Predictor, Prompt
from evf.synthetic import COLOURS, SHAPES, SIZES, SPATIAL, generate_scene, referring_candidates

HELD_OUT_SEED = 9999
OPPOSITE = {
    SPATIAL[a]: SPATIAL[b]
    for a, b in (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))
}
# The generator's colours pulled 15 % towards grey: the same names in tones the generator never
# draws (it jitters each channel by at most 15), chosen here rather than taken as they are.
DRAWN_COLOURS = {name: tuple(round(0.85 * c + 20) for c in rgb) for name, rgb in COLOURS.items()}


def phrase_kind(phrase: str) -> str:
    """The parts a referring phrase names, e.g. ``colour+shape``, ``shape+position``."""
    words = phrase.split()
    parts = [
        name
        for name, present in (
            ("size", any(w in SIZES for w in words)),
            ("colour", any(w in COLOURS for w in words)),
            ("shape", any(w in SHAPES for w in words)),
            ("position", any(p in phrase for p in SPATIAL.values())),
        )
        if present
    ]
    return "+".join(parts)


def by_phrase_kind(predictor: EvfSam2Predictor, count: int) -> dict[str, list[float]]:
    """IoU of every referring expression of held-out scenes ``0..count-1``, by ``phrase_kind``
    (scored by ``evaluate_synthetic``, whose rows follow the scenes' expressions in order)."""
    report = evaluate_synthetic(predictor, HELD_OUT_SEED, count)
    expressions = [e for i in range(count) for e in generate_scene(HELD_OUT_SEED, i).expressions]
    ious: dict[str, list[float]] = defaultdict(list)
    for row, expr in zip(report.rows, expressions, strict=True):
        assert row.kind == expr.kind, (row, expr.prompt)
        if row.kind == "referring":
            ious[phrase_kind(expr.prompt)].append(row.iou)
    return ious


def resolution_ceiling(predictor: EvfSam2Predictor, count: int) -> float:
    """Mean IoU over the referring targets of held-out scenes ``0..count-1`` of a perfect low-res
    mask: each target area-averaged onto the model's low-res grid (SAM 2's masks are a quarter of
    its input side; the image is resized to a square, as the predictor does), made a logit map
    (coverage - 0.5) and upsampled by the predictor's own ``_upsample``."""
    side = predictor.model.sam_image_size // 4
    ious = []
    for index in range(count):
        for expr in generate_scene(HELD_OUT_SEED, index).expressions:
            if expr.kind != "referring":
                continue
            target = torch.from_numpy(expr.mask.astype(np.float32))[None, None]
            coverage = F.interpolate(target, (side, side), mode="area")[:, 0]
            (logits,) = EvfSam2Predictor._upsample(coverage - 0.5, [expr.mask.shape])
            ious.append(iou_of(*mask_counts(logits > 0, expr.mask)))
    return float(np.mean(ious))


def position_pairs(seed: int, index: int) -> tuple[np.ndarray, list[tuple[str, str, np.ndarray, np.ndarray]]]:
    """Scene ``index``'s image and its (phrase, opposite phrase, named mask, other mask) tuples: one per
    position phrase of ``referring_candidates(..., every_position=True)``, the other object being
    the one the opposite phrase names."""
    scene = generate_scene(seed, index)
    h, w = scene.image.shape[:2]
    names = [
        set(referring_candidates(scene.objects, i, h, w, every_position=True))
        for i in range(len(scene.objects))
    ]
    pairs = []
    for i, phrases in enumerate(names):
        for phrase in sorted(phrases):
            where = next((p for p in OPPOSITE if phrase.endswith(p)), None)
            if where is None:
                continue
            opposite = phrase[: -len(where)] + OPPOSITE[where]
            others = [j for j, other in enumerate(names) if j != i and opposite in other]
            if len(others) == 1:
                pairs.append((phrase, opposite, scene.objects[i].mask, scene.objects[others[0]].mask))
    return scene.image, pairs


def position_following(predictor: EvfSam2Predictor, count: int) -> dict[str, float | int]:
    """Over the position phrases of held-out scenes ``0..count-1`` (``position_pairs``): the mean IoU
    of each phrase's mask with its opposite's, the share of phrases whose mask overlaps the named
    object more than the other one (IoU), and the mean IoU with the named object."""
    same, named_more, named = [], [], []
    for index in range(count):
        image, pairs = position_pairs(HELD_OUT_SEED, index)
        if not pairs:
            continue
        prompts = [Prompt(text) for phrase, opposite, _, _ in pairs for text in (phrase, opposite)]
        predictions = predictor.predict_batch([image], [prompts])[0]
        for k, (_, _, mask, other) in enumerate(pairs):
            mine, theirs = predictions[2 * k].mask, predictions[2 * k + 1].mask
            same.append(iou_of(*mask_counts(mine, theirs)))
            named.append(iou_of(*mask_counts(mine, mask)))
            named_more.append(float(named[-1] > iou_of(*mask_counts(mine, other))))
    return {
        "phrases": len(same),
        "mask vs opposite phrase's mask (IoU)": float(np.mean(same)),
        "share closer to the named object": float(np.mean(named_more)),
        "IoU with the named object": float(np.mean(named)),
    }


def outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of ``shape`` with circumradius ``r`` (circles: a 64-gon)."""
    turns = {"square": 4, "triangle": 3, "hexagon": 6, "circle": 64}
    if shape == "diamond":  # a rhombus, taller than wide
        return [(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)]
    if shape in turns:
        n = turns[shape]
        offset = angle + (math.pi / 4 if shape == "square" else 0.0)
        radii = [r] * n
    elif shape == "star":
        n, offset = 10, angle - math.pi / 2
        radii = [r if k % 2 == 0 else 0.42 * r for k in range(n)]
    else:  # cross: a plus sign with arms a third of its width
        a, b = r / math.sqrt(2), r / (3 * math.sqrt(2))
        corners = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a)]
        corners += [(-x, -y) for x, y in corners]
        return [(cx + x, cy + y) for x, y in corners]
    return [
        (
            cx + radii[k] * math.cos(offset + 2 * math.pi * k / n),
            cy + radii[k] * math.sin(offset + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def drawn_scene(rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """A PIL-drawn image and its (prompt, bool mask) pairs: one or two shapes, apart."""
    w, h = int(rng.integers(240, 480)), int(rng.integers(240, 480))
    grey = rng.integers(90, 180) + rng.integers(-12, 13, size=3)  # a muted grey, as backgrounds are
    background = np.broadcast_to(grey, (h, w, 3)).astype(np.float64)
    if rng.random() < 0.5:
        background = background + rng.normal(0, 18, size=(h, w, 3))
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    count = int(rng.integers(1, 3))
    shapes = rng.choice(len(SHAPES), size=count, replace=False)
    colours = rng.choice(len(DRAWN_COLOURS), size=count, replace=count == 1)
    objects = []
    for k in range(count):
        shape, colour = SHAPES[shapes[k]], list(DRAWN_COLOURS)[colours[k]]
        r = rng.uniform(0.12, 0.22) * min(w, h)
        slot = w / count
        cx, cy = slot * (k + 0.5) + rng.uniform(-0.1, 0.1) * slot, h * rng.uniform(0.35, 0.65)
        points = outline(shape, cx, cy, r, float(rng.uniform(-0.2, 0.2)))
        ImageDraw.Draw(canvas).polygon(points, fill=DRAWN_COLOURS[colour])
        mask = Image.new("L", (w, h))
        ImageDraw.Draw(mask).polygon(points, fill=255)
        objects.append((shape, colour, np.asarray(mask) > 127))
    prompts = []
    for shape, colour, mask in objects:
        prompts.append((f"{colour} {shape}", mask))
        if count == 2:
            prompts.append((shape, mask))
    return np.asarray(canvas), prompts


def drawn_scores(predictor: EvfSam2Predictor, count: int) -> dict[str, list[float]]:
    """IoU on ``count`` drawn scenes: "colour shape" prompts and shape-only prompts apart."""
    rng = np.random.default_rng(2024)
    ious: dict[str, list[float]] = defaultdict(list)
    for _ in range(count):
        image, prompts = drawn_scene(rng)
        predictions = predictor.predict_batch([image], [[Prompt(p) for p, _ in prompts]])[0]
        for (prompt, mask), prediction in zip(prompts, predictions, strict=True):
            ious["colour shape" if " " in prompt else "shape"].append(
                iou_of(*mask_counts(prediction.mask, mask))
            )
    return ious


def print_table(title: str, ious: dict[str, list[float]]) -> None:
    """One row per kind: prompts, mean IoU, share with IoU < 0.5 (the mask misses: another object
    or a union) and the mean IoU of the others."""
    header = f"{'phrase names':<28}{'prompts':>8}{'mean IoU':>10}{'IoU < 0.5':>11}{'IoU of rest':>13}"
    print(f"\n{title}\n{header}")
    kinds = sorted(ious.items(), key=lambda kv: (len(kv[0].split("+")), kv[0]))
    for kind, values in [*kinds, ("all", [v for kind_ious in ious.values() for v in kind_ious])]:
        scores = np.asarray(values)
        hit = scores >= 0.5
        rest = f"{scores[hit].mean():>13.3f}" if hit.any() else f"{'-':>13}"
        print(f"{kind:<28}{len(scores):>8}{scores.mean():>10.3f}{1 - hit.mean():>11.3f}{rest}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="evf-sam2-demo")
    parser.add_argument("--scenes", type=int, default=500, help="held-out generator scenes")
    parser.add_argument("--drawn", type=int, default=200, help="scenes drawn by PIL")
    args = parser.parse_args()
    predictor = EvfSam2Predictor.from_pretrained(args.model)
    print_table(
        f"referring phrases of {args.scenes} held-out scenes (seed {HELD_OUT_SEED})",
        by_phrase_kind(predictor, args.scenes),
    )
    print(f"{'a perfect low-res mask':<28}{'':>8}{resolution_ceiling(predictor, args.scenes):>10.3f}")
    following = position_following(predictor, args.scenes)
    print(f'\nposition words on the same {args.scenes} scenes: does "on the left" change the mask?')
    for name, value in following.items():
        print(f"{name:<40}{value:>10.3f}" if isinstance(value, float) else f"{name:<40}{value:>10}")
    print_table(
        f"{args.drawn} scenes drawn by PIL (plain or noisy background, 1-2 shapes)",
        drawn_scores(predictor, args.drawn),
    )


if __name__ == "__main__":
    main()
