"""Deterministic synthetic referring-segmentation scenes.

Each scene is an image with 2..5 flat-coloured shapes on a muted background, plus a list of
text expressions with their ground-truth masks:

* ``referring``: one object named uniquely ("the red circle", "the big blue square",
  "the triangle on the left"). Size and position words are only produced when the resulting
  phrase still matches exactly one object; position words only when they are needed.
* ``semantic``: a group, meant for the "[semantic] " prompt prefix (added by the consumer; the
  stored text is bare): "all circles", "all red shapes", "background".
* ``negative``: ``prompt`` names a group or an object, ``negative_prompt`` names one object;
  the expected mask is ``mask(prompt) & ~mask(negative_prompt)``.

Conventions: images are RGB ``uint8`` arrays of shape ``(H, W, 3)``; masks are ``bool`` arrays
of shape ``(H, W)``. Shapes are drawn without anti-aliasing in order, later ones over earlier
ones, and an object's mask is exactly its *visible* pixels, so object masks are disjoint and
"background" is the complement of their union. Coordinates are pixels ``(x, y)`` from the
top-left corner. Everything is derived from ``np.random.default_rng([seed, index])``, so a
``(seed, index)`` pair gives the same scene on every machine.
"""

from __future__ import annotations

import colorsys
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross")
PLURALS = {shape: "crosses" if shape == "cross" else shape + "s" for shape in SHAPES}
COLOURS = {  # RGB; saturated or extreme so they stand out from the muted backgrounds
    "red": (220, 35, 35),
    "green": (40, 175, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 220, 40),
    "purple": (145, 55, 195),
    "orange": (250, 140, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SIZES = {"small": (0.09, 0.12), "big": (0.18, 0.24)}  # circumradius as a fraction of the short side
ARTICLE = "the"  # every referring phrase starts with it
SPATIAL = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
KINDS = ("referring", "semantic", "negative")

MIN_VISIBLE_FRACTION = 0.7  # an occluded object keeps at least this share of its area
MIN_VISIBLE_PIXELS = 50
SPATIAL_SEPARATION = 0.2  # centres must differ by this fraction of width/height for left/right, top/bottom
MAX_SEMANTIC = 3
MAX_NEGATIVE = 2
MANIFEST_COLUMNS = ("id", "image_url", "prompt", "negative_prompt", "semantic_type", "kind", "mask_url")


@dataclass
class SceneObject:
    """One drawn shape; ``mask`` is its visible region (bool HxW), ``centre`` is ``(x, y)``."""

    shape: str
    colour: str
    size_word: str
    centre: tuple[float, float]
    radius: float
    mask: np.ndarray


@dataclass
class Expression:
    """A prompt and its expected bool HxW mask (for ``negative``: prompt minus negative_prompt)."""

    prompt: str
    kind: str
    mask: np.ndarray
    negative_prompt: str | None = None
    semantic: bool = False


@dataclass
class Scene:
    """An RGB uint8 HxWx3 image, its objects (in drawing order) and its expressions."""

    image: np.ndarray
    objects: list[SceneObject]
    expressions: list[Expression]


# ----------------------------------------------------------------------------- drawing


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.2), rng.uniform(0.38, 0.68))
    return np.array([r, g, b]) * 255.0


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Float HxWx3 background: flat, gradient, low-frequency noise, stripes or checker."""
    base = _muted_colour(rng)
    style = rng.choice(["flat", "gradient", "noise", "stripes", "checker"])
    if style == "flat":
        return np.broadcast_to(base, (h, w, 3)).astype(np.float64)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    if style == "noise":
        coarse = rng.normal(0.0, 15.0, size=(h // 16 + 2, w // 16 + 2)).astype(np.float32)
        return base + cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)[..., None].astype(np.float64)
    other = np.clip(base + rng.uniform(-40, 40, size=3), 90, 175)
    if style == "gradient":
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(t.max() - t.min(), 1.0)
    else:
        period = rng.uniform(8, 24)
        u = xx * np.cos(angle) + yy * np.sin(angle)
        t = np.floor(u / period) % 2
        if style == "checker":
            v = -xx * np.sin(angle) + yy * np.cos(angle)
            t = (t + np.floor(v / period)) % 2
    return base * (1 - t[..., None]) + other * t[..., None]


def _outline(shape: str, radius: float, angle: float) -> np.ndarray:
    """Polygon vertices (N x 2, relative to the centre) of a non-circle shape."""
    if shape == "star":
        theta = -np.pi / 2 + np.arange(10) * np.pi / 5
        rho = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    elif shape == "cross":
        a = 0.33
        pts = [(a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a)]
        pts += [(-a, -a), (-a, -1)]
        xy = np.array(pts, dtype=np.float64)
        theta, rho = np.arctan2(xy[:, 1], xy[:, 0]), np.hypot(xy[:, 0], xy[:, 1]) / np.sqrt(1 + a * a)
    elif shape == "diamond":
        theta = np.arange(4) * np.pi / 2
        rho = np.array([0.62, 1.0, 0.62, 1.0])
    else:
        sides = {"square": 4, "triangle": 3, "hexagon": 6}[shape]
        start = {"square": np.pi / 4, "triangle": -np.pi / 2, "hexagon": 0.0}[shape]
        theta = start + np.arange(sides) * 2 * np.pi / sides
        rho = np.ones(sides)
    theta = theta + angle
    return np.stack([rho * np.cos(theta), rho * np.sin(theta)], axis=1) * radius


def _shape_mask(shape: str, centre: tuple[float, float], radius: float, angle: float, hw) -> np.ndarray:
    """Exact (aliased) bool mask of a shape; 4 bits of sub-pixel precision."""
    canvas = np.zeros(hw, dtype=np.uint8)
    scale = 16
    if shape == "circle":
        c = (round(centre[0] * scale), round(centre[1] * scale))
        cv2.circle(canvas, c, round(radius * scale), 1, thickness=-1, lineType=cv2.LINE_8, shift=4)
    else:
        pts = np.round((_outline(shape, radius, angle) + centre) * scale).astype(np.int32)
        cv2.fillPoly(canvas, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _angle(rng: np.random.Generator, shape: str) -> float:
    """Rotation jitter small enough that a square never looks like a diamond (and vice versa)."""
    if shape in ("star", "hexagon"):
        return rng.uniform(0, 2 * np.pi)
    return np.deg2rad(rng.uniform(-12, 12))


def _place_objects(rng: np.random.Generator, h: int, w: int) -> tuple[list[SceneObject], list[np.ndarray]]:
    """Sample 2..5 objects; returns them (visible masks) and their full masks."""
    wanted, attempts = int(rng.integers(2, 6)), 0
    objects: list[SceneObject] = []
    full: list[np.ndarray] = []
    while len(objects) < wanted and attempts < wanted + 6:
        attempts += 1
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        if objects and rng.random() < 0.3:  # repeats make size and position words necessary
            shape = objects[int(rng.integers(len(objects)))].shape
        if objects and rng.random() < 0.3:
            colour = objects[int(rng.integers(len(objects)))].colour
        size_word = str(rng.choice(list(SIZES)))
        radius = rng.uniform(*SIZES[size_word]) * min(h, w)
        angle = _angle(rng, shape)
        for _ in range(40):
            centre = (rng.uniform(radius + 1, w - radius - 1), rng.uniform(radius + 1, h - radius - 1))
            if any(
                o.colour == colour
                and np.hypot(o.centre[0] - centre[0], o.centre[1] - centre[1]) < o.radius + radius + 3
                for o in objects
            ):
                continue  # same-coloured shapes never touch: their boundary would be invisible
            mask = _shape_mask(shape, centre, radius, angle, (h, w))
            remaining = [o.mask & ~mask for o in objects]
            if all(
                r.sum() >= max(MIN_VISIBLE_FRACTION * f.sum(), MIN_VISIBLE_PIXELS)
                for r, f in zip(remaining, full, strict=True)
            ):
                for o, r in zip(objects, remaining, strict=True):
                    o.mask = r
                objects.append(SceneObject(shape, colour, size_word, centre, float(radius), mask.copy()))
                full.append(mask)
                break
    return objects, full


# ----------------------------------------------------------------------------- expressions


def _spatial_words(obj: SceneObject, other: SceneObject, h: int, w: int) -> list[str]:
    dx, dy = (obj.centre[0] - other.centre[0]) / w, (obj.centre[1] - other.centre[1]) / h
    words = []
    if abs(dx) >= SPATIAL_SEPARATION:
        words.append(SPATIAL["left" if dx < 0 else "right"])
    if abs(dy) >= SPATIAL_SEPARATION:
        words.append(SPATIAL["top" if dy < 0 else "bottom"])
    return words


def referring_candidates(
    objects: list[SceneObject], i: int, h: int, w: int, every_position: bool = False
) -> list[str]:
    """All phrases that name ``objects[i]`` and no other object, shortest first.

    A phrase is ``the [size] [colour] shape-name|"shape"`` (colour or shape name required).
    Only when no such phrase is unique (or always, with ``every_position``), a position phrase is
    appended to one that matches exactly two objects whose centres are clearly apart along that axis.
    """
    obj, out, spatial = objects[i], [], []
    for use_size, use_colour, use_shape in itertools.product((False, True), repeat=3):
        if not (use_colour or use_shape):
            continue
        group = [
            o
            for o in objects
            if (not use_size or o.size_word == obj.size_word)
            and (not use_colour or o.colour == obj.colour)
            and (not use_shape or o.shape == obj.shape)
        ]
        words = [ARTICLE] + [obj.size_word] * use_size + [obj.colour] * use_colour
        words.append(obj.shape if use_shape else "shape")
        if len(group) == 1:
            out.append(" ".join(words))
        elif len(group) == 2:
            other = group[0] if group[1] is obj else group[1]
            spatial += [" ".join([*words, s]) for s in _spatial_words(obj, other, h, w)]
    return sorted((out + spatial) if every_position else (out or spatial), key=lambda s: (len(s.split()), s))


def _pick(rng: np.random.Generator, candidates: list[str]) -> str:
    """Half the time the shortest phrase, otherwise any valid one."""
    return candidates[0] if rng.random() < 0.5 else candidates[int(rng.integers(len(candidates)))]


def _expressions(
    rng: np.random.Generator, objects: list[SceneObject], full: list[np.ndarray], h: int, w: int
) -> list[Expression]:
    cands = [referring_candidates(objects, i, h, w) for i in range(len(objects))]
    nameable = [i for i, c in enumerate(cands) if c]
    exprs = [Expression(_pick(rng, cands[i]), "referring", objects[i].mask.copy()) for i in nameable]

    groups: dict[str, list[int]] = {}
    for i, o in enumerate(objects):
        groups.setdefault(f"all {PLURALS[o.shape]}", []).append(i)
    for i, o in enumerate(objects):
        groups.setdefault(f"all {o.colour} shapes", []).append(i)
    union = np.logical_or.reduce([o.mask for o in objects])
    texts = [*groups, "background"]
    for j in rng.permutation(len(texts))[:MAX_SEMANTIC]:
        text = texts[j]
        mask = (
            ~union if text == "background" else np.logical_or.reduce([objects[i].mask for i in groups[text]])
        )
        exprs.append(Expression(text, "semantic", mask, semantic=True))

    # negatives: a group minus one named member, or an object minus an overlapping neighbour
    pairs = [(text, i) for text, members in groups.items() if len(members) > 1 for i in members if cands[i]]
    chosen = [pairs[j] for j in rng.permutation(len(pairs))[:MAX_NEGATIVE]]
    for text, i in chosen:
        mask = np.logical_or.reduce([objects[m].mask for m in groups[text]]) & ~objects[i].mask
        exprs.append(Expression(text, "negative", mask, _pick(rng, cands[i]), semantic=True))
    touching = [(a, b) for a in nameable for b in nameable if a != b and (full[a] & full[b]).any()]
    if touching and (len(chosen) < MAX_NEGATIVE or rng.random() < 0.25):
        a, b = touching[int(rng.integers(len(touching)))]
        mask = objects[a].mask & ~objects[b].mask
        exprs.append(Expression(_pick(rng, cands[a]), "negative", mask, _pick(rng, cands[b])))
    return exprs


# ----------------------------------------------------------------------------- public API


def generate_scene(seed: int, index: int) -> Scene:
    """Scene number ``index`` of dataset ``seed``; a pure function of ``(seed, index)``."""
    rng = np.random.default_rng([seed, index])
    short = int(rng.integers(96, 257))
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))  # width / height
    h, w = (short, round(short * aspect)) if aspect >= 1 else (round(short / aspect), short)
    image = _background(rng, h, w)
    objects, full = _place_objects(rng, h, w)
    for obj, mask in zip(objects, full, strict=True):
        colour = np.array(COLOURS[obj.colour]) + rng.integers(-15, 16, size=3)
        image[mask] = colour  # drawn in order: later objects cover earlier ones
    image = image + rng.normal(0.0, rng.uniform(2.0, 6.0), size=image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return Scene(image, objects, _expressions(rng, objects, full, h, w))


def iter_scenes(seed: int, count: int) -> Iterator[Scene]:
    """Scenes ``0..count-1`` of dataset ``seed``."""
    for index in range(count):
        yield generate_scene(seed, index)


def vocabulary_corpus() -> list[str]:
    """Every prompt the generator can produce (one per line), for tokenizer training."""
    sentences = []
    for size, colour, noun in itertools.product([None, *SIZES], [None, *COLOURS], [*SHAPES, "shape"]):
        if colour is None and noun == "shape":
            continue
        base = " ".join(w for w in (ARTICLE, size, colour, noun) if w)
        sentences += [base] + [f"{base} {s}" for s in SPATIAL.values()]
    sentences += [f"all {PLURALS[s]}" for s in SHAPES] + [f"all {c} shapes" for c in COLOURS]
    return [*sentences, "background"]


def select_expressions(scene: Scene, limit: int | None, seed: int, index: int) -> list[int]:
    """Indices of at most ``limit`` expressions, alternating kinds, chosen deterministically."""
    if limit is None or limit >= len(scene.expressions):
        return list(range(len(scene.expressions)))
    rng = np.random.default_rng([seed, index, 1])
    by_kind = [[i for i, e in enumerate(scene.expressions) if e.kind == k] for k in KINDS]
    by_kind = [[group[j] for j in rng.permutation(len(group))] for group in by_kind]
    order = [i for batch in itertools.zip_longest(*by_kind) for i in batch if i is not None]
    return sorted(order[:limit])


def _write_png(fs, path: str, array: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {path}")
    with fs.open(path, "wb") as f:
        f.write(data.tobytes())


def write_dataset(
    seed: int,
    count: int,
    output: str,
    storage_options: dict | None = None,
    expressions_per_scene: int | None = None,
) -> str:
    """Write ``count`` scenes under ``output`` (a local path or any fsspec URI).

    Layout: ``images/<scene_id>.png`` (RGB), ``masks/<expr_id>.png`` (grayscale 0/255) and
    ``manifest.parquet`` with one row per expression and columns ``MANIFEST_COLUMNS``.
    Scene ids are ``<seed>-<index:06d>``, expression ids ``<scene_id>-<k:02d>`` where ``k`` is
    the expression's position in ``Scene.expressions``. Returns the manifest's URI.
    """
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fsspec.implementations.local import LocalFileSystem
    from tqdm.auto import tqdm

    fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
    root = root.rstrip("/")

    def uri(path: str) -> str:
        return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)

    fs.makedirs(f"{root}/images", exist_ok=True)
    fs.makedirs(f"{root}/masks", exist_ok=True)
    rows: dict[str, list] = {c: [] for c in MANIFEST_COLUMNS}
    for index in tqdm(range(count), desc="synthetic scenes", unit="scene", disable=count < 100):
        scene = generate_scene(seed, index)
        scene_id = f"{seed}-{index:06d}"
        image_path = f"{root}/images/{scene_id}.png"
        _write_png(fs, image_path, cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
        for k in select_expressions(scene, expressions_per_scene, seed, index):
            expr, expr_id = scene.expressions[k], f"{scene_id}-{k:02d}"
            mask_path = f"{root}/masks/{expr_id}.png"
            _write_png(fs, mask_path, expr.mask.astype(np.uint8) * 255)
            row = (expr_id, uri(image_path), expr.prompt, expr.negative_prompt, expr.semantic, expr.kind)
            for column, value in zip(MANIFEST_COLUMNS, (*row, uri(mask_path)), strict=True):
                rows[column].append(value)
    schema = pa.schema([(c, pa.bool_() if c == "semantic_type" else pa.string()) for c in MANIFEST_COLUMNS])
    manifest = f"{root}/manifest.parquet"
    with fs.open(manifest, "wb") as f:
        pq.write_table(pa.table(rows, schema=schema), f)
    return uri(manifest)
