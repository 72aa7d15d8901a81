"""Tests for evf.synthetic: determinism, expression/mask consistency, dataset writing."""

from __future__ import annotations

import cv2
import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from evf.synthetic import (
    COLOURS,
    KINDS,
    MANIFEST_COLUMNS,
    PLURALS,
    SHAPES,
    SIZES,
    SPATIAL,
    Scene,
    SceneObject,
    generate_scene,
    iter_scenes,
    referring_candidates,
    vocabulary_corpus,
    write_dataset,
)

SEED = 1234
N_SCENES = 50
SINGULAR = {plural: shape for shape, plural in PLURALS.items()}


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return list(iter_scenes(SEED, N_SCENES))


def resolve(prompt: str, scene: Scene) -> list[SceneObject]:
    """Independent reading of a referring phrase: the objects it can denote."""
    words = prompt.split()
    assert words[0] == "the", prompt
    spatial = next((side for side, phrase in SPATIAL.items() if prompt.endswith(" " + phrase)), None)
    if spatial:
        words = words[: -len(SPATIAL[spatial].split())]
    size = next((w for w in words if w in SIZES), None)
    colour = next((w for w in words if w in COLOURS), None)
    noun = words[-1]
    assert noun in SHAPES or (noun == "shape" and colour), prompt
    group = [
        o
        for o in scene.objects
        if (size is None or o.size_word == size)
        and (colour is None or o.colour == colour)
        and (noun == "shape" or o.shape == noun)
    ]
    if spatial is None:
        return group
    assert len(group) == 2, f"position word used for a group of {len(group)}: {prompt}"
    axis = 0 if spatial in ("left", "right") else 1
    extent = scene.image.shape[1 - axis]
    a, b = sorted(group, key=lambda o: o.centre[axis])
    assert b.centre[axis] - a.centre[axis] >= 0.2 * extent, prompt
    return [a if spatial in ("left", "top") else b]


def semantic_mask(prompt: str, scene: Scene) -> np.ndarray:
    union = np.logical_or.reduce([o.mask for o in scene.objects])
    if prompt == "background":
        return ~union
    words = prompt.split()
    assert words[0] == "all", prompt
    if len(words) == 2:
        members = [o for o in scene.objects if o.shape == SINGULAR[words[1]]]
    else:
        assert words[2] == "shapes" and words[1] in COLOURS, prompt
        members = [o for o in scene.objects if o.colour == words[1]]
    assert members, f"semantic prompt names nothing: {prompt}"
    return np.logical_or.reduce([o.mask for o in members])


def test_determinism():
    a, b = generate_scene(7, 3), generate_scene(7, 3)
    assert np.array_equal(a.image, b.image)
    assert [(e.prompt, e.negative_prompt, e.kind) for e in a.expressions] == [
        (e.prompt, e.negative_prompt, e.kind) for e in b.expressions
    ]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.expressions, b.expressions, strict=True))
    for other in (generate_scene(8, 3), generate_scene(7, 4)):
        assert a.image.shape != other.image.shape or not np.array_equal(a.image, other.image)


def test_scene_structure(scenes):
    for scene in scenes:
        h, w, c = scene.image.shape
        assert scene.image.dtype == np.uint8 and c == 3
        assert 96 <= min(h, w) <= 256 and 0.5 <= w / h <= 2.0
        assert 2 <= len(scene.objects) <= 5
        cover = np.zeros((h, w), dtype=int)
        for obj in scene.objects:
            assert obj.mask.dtype == bool and obj.mask.shape == (h, w)
            assert obj.mask.sum() >= 50
            cover += obj.mask
        assert cover.max() == 1, "visible object masks must be disjoint"
        assert {e.kind for e in scene.expressions} <= set(KINDS)
        assert all(e.mask.dtype == bool and e.mask.shape == (h, w) for e in scene.expressions)


def test_referring_expressions_are_unique(scenes):
    n_named = n_objects = 0
    for scene in scenes:
        referring = [e for e in scene.expressions if e.kind == "referring"]
        assert len({e.prompt for e in referring}) == len(referring)
        n_named, n_objects = n_named + len(referring), n_objects + len(scene.objects)
        for expr in referring:
            assert expr.mask.any() and not expr.semantic and expr.negative_prompt is None
            matches = [o for o in scene.objects if np.array_equal(o.mask, expr.mask)]
            assert len(matches) == 1
            assert resolve(expr.prompt, scene) == matches, expr.prompt
    assert n_named >= 0.9 * n_objects


def test_every_position_adds_position_phrases_that_still_name_one_object(scenes):
    added = 0
    for scene in scenes:
        h, w = scene.image.shape[:2]
        for i, obj in enumerate(scene.objects):
            needed = referring_candidates(scene.objects, i, h, w)
            every = referring_candidates(scene.objects, i, h, w, every_position=True)
            assert set(needed) <= set(every)
            for prompt in every:
                assert resolve(prompt, scene) == [obj], prompt
            added += len(set(every) - set(needed))
    assert added > 20, "objects that a shorter phrase names should also get position phrases"


def test_semantic_masks_are_unions(scenes):
    seen = set()
    for scene in scenes:
        for expr in (e for e in scene.expressions if e.kind == "semantic"):
            assert expr.semantic and expr.negative_prompt is None
            assert np.array_equal(expr.mask, semantic_mask(expr.prompt, scene)), expr.prompt
            seen.add("background" if expr.prompt == "background" else expr.prompt.split()[-1])
    assert {"background", "shapes"} <= seen and len(seen) > 4


def test_negative_masks(scenes):
    n_negative = 0
    for scene in scenes:
        for expr in (e for e in scene.expressions if e.kind == "negative"):
            n_negative += 1
            assert expr.negative_prompt and expr.mask.any()
            if expr.semantic:
                positive = semantic_mask(expr.prompt, scene)
            else:
                (obj,) = resolve(expr.prompt, scene)
                positive = obj.mask
            (removed,) = resolve(expr.negative_prompt, scene)
            assert np.array_equal(expr.mask, positive & ~removed.mask)
    assert n_negative >= N_SCENES // 2


def test_vocabulary_covers_prompts(scenes):
    corpus = vocabulary_corpus()
    sentences = set(corpus)
    words = {w for s in corpus for w in s.split()}
    for scene in scenes:
        for expr in scene.expressions:
            for text in filter(None, (expr.prompt, expr.negative_prompt)):
                assert text in sentences and set(text.split()) <= words


def check_dataset(manifest_uri: str, seed: int, count: int, limit: int | None) -> None:
    with fsspec.open(manifest_uri, "rb") as f:
        table = pq.read_table(f)
    assert tuple(table.column_names) == MANIFEST_COLUMNS
    rows = table.to_pylist()
    scenes = [generate_scene(seed, i) for i in range(count)]
    expected = sum(len(s.expressions) if limit is None else min(limit, len(s.expressions)) for s in scenes)
    assert len(rows) == expected and len({r["id"] for r in rows}) == expected
    images: dict[str, np.ndarray] = {}
    for row in rows:
        scene_index, k = (int(part) for part in row["id"].split("-")[1:])
        scene, expr = scenes[scene_index], scenes[scene_index].expressions[k]
        assert (row["prompt"], row["negative_prompt"], row["semantic_type"], row["kind"]) == (
            expr.prompt,
            expr.negative_prompt,
            expr.semantic,
            expr.kind,
        )
        if row["image_url"] not in images:
            with fsspec.open(row["image_url"], "rb") as f:
                bgr = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR)
            images[row["image_url"]] = rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            assert np.array_equal(rgb, scene.image)
        with fsspec.open(row["mask_url"], "rb") as f:
            mask = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_UNCHANGED)
        assert mask.ndim == 2 and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask == 255, expr.mask)
    assert len(images) == count


def test_write_dataset_local(tmp_path):
    manifest = write_dataset(5, 3, str(tmp_path / "ds"))
    assert manifest == str(tmp_path / "ds" / "manifest.parquet")
    check_dataset(manifest, 5, 3, None)
    assert len(list((tmp_path / "ds" / "images").iterdir())) == 3


def test_write_dataset_memory():
    fs = fsspec.filesystem("memory")
    try:
        manifest = write_dataset(6, 3, "memory://evf-synthetic-test/ds", expressions_per_scene=2)
        assert manifest == "memory:///evf-synthetic-test/ds/manifest.parquet"
        check_dataset(manifest, 6, 3, 2)
        with fsspec.open(manifest, "rb") as f:
            kinds = pq.read_table(f).column("kind").to_pylist()
        assert len(set(kinds)) >= 2, "subsampling should mix expression kinds"
    finally:
        if fs.exists("/evf-synthetic-test"):
            fs.rm("/evf-synthetic-test", recursive=True)
