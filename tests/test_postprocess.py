import json
from collections import deque

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as coco_mask

from evf.postprocess import (
    MaskStats,
    binarize,
    blur,
    compose_rgba,
    disk,
    encode_rle,
    expand,
    fill_holes,
    mask_stats,
    postprocess,
    revert,
    subtract,
)

PROPS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.tuples(st.integers(1, 48), st.integers(1, 48))


@st.composite
def rect_masks(draw, shape=None):
    """Unions of rectangles minus rectangles: blobby masks with holes and notches."""
    h, w = shape if shape is not None else draw(shapes)
    mask = np.zeros((h, w), bool)
    for on in draw(st.lists(st.booleans(), max_size=6)):
        y0, y1 = sorted(draw(st.tuples(st.integers(0, h), st.integers(0, h))))
        x0, x1 = sorted(draw(st.tuples(st.integers(0, w), st.integers(0, w))))
        mask[y0:y1, x0:x1] = on
    return mask


@st.composite
def noise_masks(draw, shape=None):
    shape = shape if shape is not None else draw(shapes)
    return draw(arrays(np.bool_, shape, elements=st.booleans()))


bool_masks = st.one_of(rect_masks(), noise_masks())


@st.composite
def mask_pairs(draw):
    shape = draw(shapes)
    kind = st.one_of(rect_masks(shape), noise_masks(shape))
    return draw(kind), draw(kind)


u8_masks = st.one_of(
    bool_masks.map(lambda m: m.astype(np.uint8) * 255),
    shapes.flatmap(lambda s: arrays(np.uint8, s)),
)


# --------------------------------------------------------------------------- independent references


def ref_border_background(mask):
    """Background pixels 4-connected to the border (plain BFS, independent of OpenCV)."""
    h, w = mask.shape
    seen = np.zeros((h, w), bool)
    queue = deque()
    for y in range(h):
        for x in range(w):
            if (y in (0, h - 1) or x in (0, w - 1)) and not mask[y, x]:
                seen[y, x] = True
                queue.append((y, x))
    while queue:
        y, x = queue.popleft()
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < h and 0 <= nx < w and not mask[ny, nx] and not seen[ny, nx]:
                seen[ny, nx] = True
                queue.append((ny, nx))
    return seen


def ref_min_sq_dist(mask):
    """Squared Euclidean distance of every pixel to the nearest foreground pixel (brute force)."""
    h, w = mask.shape
    fy, fx = np.nonzero(mask)
    if fy.size == 0:
        return np.full((h, w), np.iinfo(np.int64).max)
    yy, xx = np.mgrid[0:h, 0:w]
    d = (yy.reshape(-1, 1) - fy) ** 2 + (xx.reshape(-1, 1) - fx) ** 2
    return d.min(axis=1).reshape(h, w)


# --------------------------------------------------------------------------- properties


@PROPS
@given(u8_masks)
def test_revert_twice_is_identity(m):
    r = revert(m)
    assert r.dtype == np.uint8
    assert np.array_equal(r.astype(int), 255 - m.astype(int))
    assert np.array_equal(revert(r), m)


@PROPS
@given(bool_masks, st.integers(0, 6))
def test_expand_is_euclidean_dilation(m, radius):
    out = expand(m, radius)
    assert out.dtype == bool and out.shape == m.shape
    assert not (m & ~out).any()  # never shrinks
    dist2 = ref_min_sq_dist(m)
    # every new pixel is within the radius of an original pixel, and every such pixel is included
    assert np.array_equal(out, dist2 <= radius * radius)


@PROPS
@given(bool_masks)
def test_fill_holes_properties(m):
    out = fill_holes(m)
    assert out.dtype == bool and out.shape == m.shape
    assert not (m & ~out).any()  # never removes foreground
    # no enclosed background left: every background pixel reaches the border
    assert np.array_equal(~out, ref_border_background(out))
    # and exactly the enclosed background was added
    assert np.array_equal(out, m | ~ref_border_background(m))
    assert np.array_equal(fill_holes(out), out)


@PROPS
@given(u8_masks, st.sampled_from([0, 1, 3, 5, 9, 15, 49]))
def test_blur_range(m, ksize):
    out = blur(m, ksize)
    assert out.dtype == np.uint8 and out.shape == m.shape
    assert out.min() >= m.min() and out.max() <= m.max()  # a weighted average stays in range
    if ksize in (0, 1):
        assert np.array_equal(out, m)
        assert out is not m


@PROPS
@given(mask_pairs())
def test_subtract_never_adds(pair):
    m, neg = pair
    out = subtract(m, neg)
    assert not (out & ~m).any()
    assert not (out & neg).any()
    assert np.array_equal(out | (m & neg), m)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode vs numpy 2
@PROPS
@given(bool_masks)
def test_rle_roundtrip_and_pycocotools_compat(m):
    rle = encode_rle(m)
    assert rle["size"] == list(m.shape)
    assert isinstance(rle["counts"], str)
    assert json.loads(json.dumps(rle)) == rle
    coco = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    assert int(coco_mask.area(coco)) == int(m.sum())
    assert np.array_equal(coco_mask.decode(coco).astype(bool), m)
    theirs = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
    assert theirs["counts"].decode("ascii") == rle["counts"]


@PROPS
@given(bool_masks)
def test_uncompressed_runs_compress_like_ours(m):
    flat = m.T.reshape(-1)  # column-major
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(edges).tolist()
    if flat[0]:
        runs = [0, *runs]
    compressed = coco_mask.frPyObjects({"size": list(m.shape), "counts": runs}, *m.shape)
    assert compressed["counts"].decode("ascii") == encode_rle(m)["counts"]


@PROPS
@given(bool_masks)
def test_mask_stats(m):
    s = mask_stats(m)
    assert s.area == int(m.sum()) and isinstance(s.area, int)
    assert s.empty == (s.area == 0)
    assert all(type(v) is int for v in s.bbox)
    if s.empty:
        assert s.bbox == (0, 0, 0, 0)
    else:
        x, y, w, h = s.bbox
        coco_bbox = coco_mask.toBbox(coco_mask.encode(np.asfortranarray(m.astype(np.uint8))))
        assert [x, y, w, h] == [int(v) for v in coco_bbox]
        assert m[y : y + h, x : x + w].sum() == s.area  # contains everything
        assert m[y, :].any() and m[y + h - 1, :].any() and m[:, x].any() and m[:, x + w - 1].any()


@PROPS
@given(u8_masks)
def test_binarize(m):
    b = binarize(m)
    assert b.dtype == bool
    assert np.array_equal(b, m >= 128)
    assert np.array_equal(binarize(np.where(b, 255, 0).astype(np.uint8)), b)


@PROPS
@given(mask_pairs(), st.booleans(), st.integers(0, 3), st.sampled_from([0, 3]), st.booleans())
def test_postprocess_matches_composition(pair, fill, radius, ksize, rev):
    m, neg = pair
    out = postprocess(m, negative=neg, fill_holes=fill, expand_mask=radius, blur_mask=ksize, revert_mask=rev)
    step = m & ~neg
    if fill:
        step = step | ~ref_border_background(step)
    step = ref_min_sq_dist(step) <= radius * radius
    want = step.astype(np.uint8) * 255
    want = blur(want, ksize)
    if rev:
        want = 255 - want
    assert out.dtype == np.uint8 and out.shape == m.shape
    assert np.array_equal(out, want)
    if ksize == 0:
        assert set(np.unique(out).tolist()) <= {0, 255}


# --------------------------------------------------------------------------- hand-built examples


def square_with_hole():
    m = np.zeros((12, 12), bool)
    m[2:10, 2:10] = True  # 8x8 square
    m[5:7, 5:7] = False  # 2x2 hole
    return m


def test_postprocess_order_negative_opens_hole():
    # The negative cuts a channel from the left border into the hole, so after
    # subtraction the hole is no longer enclosed and fill_holes leaves it open.
    m = square_with_hole()
    neg = np.zeros_like(m)
    neg[5:7, 0:6] = True
    want = np.zeros((12, 12), np.uint8)
    want[2:10, 2:10] = 255
    want[5:7, 2:7] = 0  # channel cols 2..5 + hole col 6 (hole cols 5..6)
    out = postprocess(m, negative=neg, fill_holes=True, expand_mask=0, blur_mask=0, revert_mask=False)
    assert np.array_equal(out, want)
    # filling before subtracting would have closed hole column 6
    wrong = np.where(subtract(fill_holes(m), neg), 255, 0).astype(np.uint8)
    assert not np.array_equal(out, wrong)


def test_postprocess_negative_inside_is_refilled():
    # Documented consequence of the order: an enclosed negative region is filled back.
    m = square_with_hole()
    neg = np.zeros_like(m)
    neg[4:8, 4:8] = True
    out = postprocess(m, negative=neg, fill_holes=True, expand_mask=0, blur_mask=0, revert_mask=False)
    want = np.zeros((12, 12), np.uint8)
    want[2:10, 2:10] = 255
    assert np.array_equal(out, want)
    out = postprocess(m, negative=neg, fill_holes=False, expand_mask=0, blur_mask=0, revert_mask=False)
    want[4:8, 4:8] = 0
    assert np.array_equal(out, want)


def test_postprocess_fill_expand_revert():
    m = square_with_hole()
    neg = np.zeros_like(m)
    neg[:, 0:4] = True  # removes the square's cols 2..3; the hole stays enclosed
    out = postprocess(m, negative=neg, fill_holes=True, expand_mask=1, blur_mask=0, revert_mask=True)
    fg = np.zeros((12, 12), bool)
    fg[2:10, 4:10] = True  # filled rectangle rows 2..9, cols 4..9
    fg[1, 4:10] = fg[10, 4:10] = True  # radius-1 disk is a cross: grow 1px up/down ...
    fg[2:10, 3] = fg[2:10, 10] = True  # ... and left/right, corners not added
    want = np.where(fg, 0, 255).astype(np.uint8)
    assert np.array_equal(out, want)


def test_postprocess_blur_is_soft_and_last_but_revert():
    m = np.zeros((21, 21), bool)
    m[5:16, 5:16] = True
    soft = postprocess(m, blur_mask=5)
    assert np.count_nonzero((soft > 0) & (soft < 255)) > 0
    assert soft[10, 10] == 255 and soft[0, 0] == 0
    rev = postprocess(m, blur_mask=5, revert_mask=True)
    assert np.array_equal(rev, 255 - soft)


def test_postprocess_defaults_binary():
    m = square_with_hole()
    out = postprocess(m)
    assert out.dtype == np.uint8
    assert np.array_equal(out, m.astype(np.uint8) * 255)


def test_disk_is_euclidean():
    assert disk(0).tolist() == [[1]]
    assert disk(1).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    d = disk(3)
    assert d.shape == (7, 7) and d.dtype == np.uint8
    assert d[3, 0] == 1 and d[0, 0] == 0 and d[1, 1] == 1  # (2,2): 8 <= 9


# --------------------------------------------------------------------------- empty masks and edges


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (5, 6)])
def test_empty_masks_everywhere(shape):
    m = np.zeros(shape, bool)
    assert not subtract(m, m).any()
    assert not fill_holes(m).any()
    assert not expand(m, 5).any()
    u8 = np.zeros(shape, np.uint8)
    assert not blur(u8, 7).any()
    assert (revert(u8) == 255).all()
    assert mask_stats(m) == MaskStats(0, (0, 0, 0, 0), True)
    rle = encode_rle(m)
    assert np.array_equal(coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}), m)
    out = postprocess(m, negative=m, fill_holes=True, expand_mask=3, blur_mask=5, revert_mask=True)
    assert (out == 255).all()
    rgba = compose_rgba(np.zeros((*shape, 3), np.uint8), postprocess(m))
    assert rgba.shape == (*shape, 4) and not rgba[..., 3].any()


def test_full_mask():
    m = np.ones((6, 7), bool)
    assert fill_holes(m).all() and expand(m, 3).all()
    assert (blur(np.full((6, 7), 255, np.uint8), 9) == 255).all()
    assert mask_stats(m) == MaskStats(42, (0, 0, 7, 6), False)


def test_inputs_not_modified():
    m = square_with_hole()
    before = m.copy()
    neg = np.zeros_like(m)
    neg[0:6, 0:6] = True
    postprocess(m, negative=neg, fill_holes=True, expand_mask=2, blur_mask=3, revert_mask=True)
    assert np.array_equal(m, before)


def test_compose_rgba():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (5, 4), dtype=np.uint8)
    out = compose_rgba(img, alpha)
    assert out.dtype == np.uint8 and out.shape == (5, 4, 4)
    assert np.array_equal(out[..., :3], img) and np.array_equal(out[..., 3], alpha)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: subtract(np.zeros((3, 3), bool), np.zeros((3, 4), bool)), "does not match"),
        (lambda: subtract(np.zeros((3, 3), np.uint8), np.zeros((3, 3), bool)), "dtype bool"),
        (lambda: fill_holes(np.zeros((3, 3, 1), bool)), "2-D"),
        (lambda: fill_holes([[True]]), "numpy array"),
        (lambda: expand(np.zeros((3, 3), bool), -1), ">= 0"),
        (lambda: expand(np.zeros((3, 3), bool), 1.5), "integer"),
        (lambda: expand(np.zeros((0, 3), bool), 1), "non-zero"),
        (lambda: blur(np.zeros((3, 3), np.uint8), 4), "odd"),
        (lambda: blur(np.zeros((3, 3), bool), 3), "dtype uint8"),
        (lambda: revert(np.zeros((3, 3), np.float32)), "dtype uint8"),
        (lambda: binarize(np.zeros((3, 3), bool)), "dtype uint8"),
        (lambda: postprocess(np.zeros((3, 3), bool), blur_mask=2), "odd"),
        (lambda: postprocess(np.zeros((3, 3), bool), expand_mask=-2), ">= 0"),
        (lambda: postprocess(np.zeros((3, 3), bool), negative=np.zeros((2, 3), bool)), "does not match"),
        (lambda: mask_stats(np.zeros((3, 3), np.uint8)), "dtype bool"),
        (lambda: compose_rgba(np.zeros((3, 3, 4), np.uint8), np.zeros((3, 3), np.uint8)), r"\(H, W, 3\)"),
        (lambda: compose_rgba(np.zeros((3, 3, 3), np.float32), np.zeros((3, 3), np.uint8)), "uint8"),
        (lambda: compose_rgba(np.zeros((3, 3, 3), np.uint8), np.zeros((3, 2), np.uint8)), "does not match"),
    ],
)
def test_invalid_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
