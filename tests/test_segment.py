"""Every fal option through ``evf.segment`` on the tiny fixture checkpoint.

Expected outputs are computed independently: from ``predictor.predict`` (itself checked against
the authors' recorded outputs) and plain numpy/OpenCV operations, not from ``evf.postprocess``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from evf import EvfSam2Predictor, InvalidRequestError, segment

FIXTURE = Path(__file__).parent / "fixtures" / "evf-sam2-tiny"
IMAGE_PATH = FIXTURE / "images" / "portrait_97x173.png"
PROMPT = "the blue circle at the top"
NEGATIVE = "green triangle"


@pytest.fixture(scope="module")
def predictor() -> EvfSam2Predictor:
    return EvfSam2Predictor.from_pretrained(FIXTURE / "checkpoint")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.asarray(Image.open(IMAGE_PATH).convert("RGB"))


@pytest.fixture(scope="module")
def base_mask(predictor: EvfSam2Predictor, image: np.ndarray) -> np.ndarray:
    mask = predictor.predict(image, PROMPT).mask
    assert 0.1 < mask.mean() < 0.9  # a mask with both classes, so every option has work to do
    return mask


def run(predictor: EvfSam2Predictor, image: np.ndarray, **options: object):
    return segment(image, {"prompt": PROMPT, **options}, predictor)


def test_defaults_give_the_model_mask(predictor, image, base_mask) -> None:
    result = run(predictor, image)
    assert result.mask.dtype == np.uint8 and result.mask.shape == image.shape[:2]
    np.testing.assert_array_equal(result.mask, base_mask.astype(np.uint8) * 255)
    assert result.image is result.mask or np.array_equal(result.image, result.mask)
    assert result.score == pytest.approx(predictor.predict(image, PROMPT).score)
    ys, xs = np.nonzero(base_mask)
    assert result.area == int(base_mask.sum())
    assert result.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    assert not result.empty
    decoded = coco_mask.decode({"size": result.rle["size"], "counts": result.rle["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), base_mask)


def test_image_url_is_read_when_no_image_is_passed(predictor, base_mask) -> None:
    result = segment(None, {"prompt": PROMPT, "image_url": str(IMAGE_PATH)}, predictor)
    np.testing.assert_array_equal(result.mask > 0, base_mask)


def test_a_pil_image_or_a_path_gives_the_same_result(predictor, base_mask) -> None:
    for given in (Image.open(IMAGE_PATH), str(IMAGE_PATH), IMAGE_PATH):
        result = segment(given, {"prompt": PROMPT}, predictor)
        np.testing.assert_array_equal(result.mask > 0, base_mask)
        np.testing.assert_array_equal(predictor.predict(given, PROMPT).mask, base_mask)
    with pytest.raises(TypeError, match="PIL image or a path"):
        segment(42, {"prompt": PROMPT}, predictor)


def test_negative_prompt_is_subtracted(predictor, image, base_mask) -> None:
    negative = predictor.predict(image, NEGATIVE).mask
    result = run(predictor, image, negative_prompt=NEGATIVE)
    np.testing.assert_array_equal(result.mask > 0, base_mask & ~negative)


def test_negative_equal_to_prompt_gives_a_valid_empty_result(predictor, image) -> None:
    result = run(predictor, image, negative_prompt=PROMPT)
    assert result.empty and result.area == 0 and result.bbox == (0, 0, 0, 0)
    assert result.mask.shape == image.shape[:2] and not result.mask.any()
    decoded = coco_mask.decode({"size": result.rle["size"], "counts": result.rle["counts"].encode()})
    assert not decoded.any()


def test_semantic_type_uses_the_semantic_prefix(predictor, image) -> None:
    want = predictor.predict(image, PROMPT, semantic=True).mask
    assert not np.array_equal(want, predictor.predict(image, PROMPT).mask)
    np.testing.assert_array_equal(run(predictor, image, semantic_type=True).mask > 0, want)


def test_mask_only_false_returns_rgba(predictor, image, base_mask) -> None:
    result = run(predictor, image, mask_only=False)
    assert result.image.shape == (*image.shape[:2], 4) and result.image.dtype == np.uint8
    np.testing.assert_array_equal(result.image[..., :3], image)
    np.testing.assert_array_equal(result.image[..., 3], base_mask.astype(np.uint8) * 255)


def test_revert_mask_inverts(predictor, image, base_mask) -> None:
    np.testing.assert_array_equal(run(predictor, image, revert_mask=True).mask > 0, ~base_mask)


def test_blur_mask_is_gaussian_and_soft(predictor, image, base_mask) -> None:
    result = run(predictor, image, blur_mask=7)
    want = cv2.GaussianBlur(base_mask.astype(np.uint8) * 255, (7, 7), 0)
    assert np.abs(result.mask.astype(int) - want.astype(int)).max() <= 1
    assert ((result.mask > 0) & (result.mask < 255)).any()


def test_expand_mask_grows_by_at_most_the_radius(predictor, image, base_mask) -> None:
    result = run(predictor, image, expand_mask=4).mask > 0
    distance = cv2.distanceTransform((~base_mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    np.testing.assert_array_equal(result, distance <= 4)


def test_fill_holes_leaves_no_enclosed_background(predictor, image, base_mask) -> None:
    result = run(predictor, image, fill_holes=True).mask > 0
    assert (result | ~base_mask).all()  # never removes foreground
    count, labels = cv2.connectedComponents((~result).astype(np.uint8), connectivity=4)
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
    assert set(range(1, count)) <= border  # every background region touches the border


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        ({"blur_mask": 2}, ["blur_mask=2", "odd"]),
        ({"blur_mask": 51}, ["blur_mask=51", "49"]),
        ({"expand_mask": -1}, ["expand_mask=-1", "0..20"]),
        ({"expand_mask": 21}, ["expand_mask=21", "0..20"]),
        ({"prompt": ""}, ["prompt=''", "non-empty"]),
        ({"colour": "red"}, ["colour='red'", "unknown field", "negative_prompt"]),
        ({"revert_mask": "yes"}, ["revert_mask='yes'", "boolean"]),
        ({"blur_mask": "3"}, ["blur_mask='3'", "integer"]),
    ],
)
def test_invalid_options_are_rejected_with_a_clear_message(predictor, image, options, fragments) -> None:
    with pytest.raises(InvalidRequestError) as info:
        segment(image, {"prompt": PROMPT, **options}, predictor)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_min_score_and_min_area_make_a_row_empty_with_the_reason(predictor, image, base_mask) -> None:
    plain = run(predictor, image)
    assert not plain.empty and plain.reason is None and np.isfinite(plain.presence_logit)
    above = run(predictor, image, min_score=min(1.0, plain.score + 0.01))
    assert above.empty and f"score {plain.score:.3f} < min_score" in above.reason
    np.testing.assert_array_equal(above.mask, plain.mask)  # the mask itself is kept, for review
    assert above.area == plain.area and above.rle == plain.rle
    assert not run(predictor, image, min_score=max(0.0, plain.score - 0.01)).empty
    small = run(predictor, image, min_area=plain.area + 1)
    assert small.empty and f"area {plain.area} px < min_area {plain.area + 1}" == small.reason
    assert run(predictor, image, min_area=plain.area).reason is None
