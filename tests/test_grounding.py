"""GroundingDINO path (``use_grounding_dino``): detector loading, detection, box-prompt masks, requests.

The detector is a tiny random-weights GroundingDINO in the Hub's layout (config.json,
model.safetensors, preprocessor_config.json, tokenizer files), written once per session by
``conftest.write_tiny_grounding_dino`` (the ``grounding_dino_dir`` fixture). Random weights give
random boxes; thresholds 0.0 (every query's box) and 1.0 (none) reach the two paths.
The box path is checked against ``sam2``'s own ``SAM2ImagePredictor.predict(box=...)`` on the
same SAM 2 weights (the tiny EVF fixture's).
"""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from conftest import GROUNDING_NUM_QUERIES, rle_to_mask

from evf import EvfSam2Predictor
from evf.checkpoints import CheckpointError
from evf.engine import InferenceEngine
from evf.families.evf_sam2 import EvfSam2Family
from evf.grounding import (
    GROUNDING_LAYOUT,
    DetectorImage,
    Grounding,
    GroundingDetector,
    MissingDetectorError,
    load_detector,
    normalize_caption,
)
from evf.postprocess import postprocess
from evf.request import parse_request
from evf.result import RawMasks
from evf.segment import finish, segment


def infer_masks(predictor, images, items, detector=None, *, detector_images=None) -> list[RawMasks]:
    """The EVF family's batch inference, as the engine calls it (one call, no isolation)."""
    grounding = None
    if detector is not None:
        grounding = Grounding(detector, list(images if detector_images is None else detector_images))
    return EvfSam2Family.infer(predictor, images, items, grounding)


transformers = pytest.importorskip("transformers")

EVF_CHECKPOINT = Path(__file__).parent / "fixtures" / "evf-sam2-tiny" / "checkpoint"
NUM_QUERIES = GROUNDING_NUM_QUERIES


@pytest.fixture(scope="module")
def dino_dir(grounding_dino_dir: Path) -> Path:
    return grounding_dino_dir  # conftest.write_tiny_grounding_dino, once per session


@pytest.fixture(scope="module")
def detector(dino_dir: Path) -> GroundingDetector:
    return GroundingDetector.from_pretrained(dino_dir, box_threshold=0.0, max_detections=4)


@pytest.fixture(scope="module")
def predictor() -> EvfSam2Predictor:
    return EvfSam2Predictor.from_pretrained(EVF_CHECKPOINT)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    first = rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)
    first[20:60, 30:90] = (200, 30, 30)
    second = rng.integers(0, 256, (120, 70, 3), dtype=np.uint8)
    return [first, second]


# -- loading ----------------------------------------------------------------------------------


def test_tiny_checkpoint_has_hub_layout_and_loads(dino_dir: Path, detector: GroundingDetector) -> None:
    files = {p.name for p in dino_dir.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.txt"} <= files
    assert {"tokenizer.json", "tokenizer_config.json"} & files
    assert detector.model.config.model_type == "grounding-dino"
    assert (detector.box_threshold, detector.text_threshold) == (0.0, 0.25)
    defaults = GroundingDetector(detector.model, detector.processor)
    assert (defaults.box_threshold, defaults.text_threshold) == (0.35, 0.25)


def test_not_a_grounding_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        CheckpointError, match="not a GroundingDINO checkpoint folder: missing .*preprocessor"
    ):
        GroundingDetector.from_pretrained(EVF_CHECKPOINT)
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        GroundingDetector.from_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match="box_threshold"):
        GroundingDetector.from_pretrained(tmp_path, box_threshold=1.5)


def test_hub_id_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="IDEA-Research/grounding-dino-tiny.*--grounding-model DIR"):
        GroundingDetector.from_pretrained("IDEA-Research/grounding-dino-tiny", cache_dir=tmp_path)


def test_fsspec_uri_is_copied_to_the_cache(
    dino_dir: Path, detector: GroundingDetector, images: list[np.ndarray], tmp_path: Path
) -> None:
    fs = fsspec.filesystem("memory")
    root = f"/gdino-{tmp_path.name}"
    for file in dino_dir.iterdir():
        fs.pipe(f"{root}/{file.name}", file.read_bytes())
    loaded = GroundingDetector.from_pretrained(
        f"memory://{root}/", box_threshold=0.0, max_detections=4, cache_dir=tmp_path / "cache"
    )
    cached = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(cached) == 1 and (cached[0] / ".complete").exists()
    assert {f for f in GROUNDING_LAYOUT.files if (dino_dir / f).exists()} <= {
        p.name for p in cached[0].iterdir()
    }
    want = detector.detect(images, [(0, "red square")])[0]
    got = loaded.detect(images, [(0, "red square")])[0]
    np.testing.assert_array_equal(got.boxes, want.boxes)
    np.testing.assert_array_equal(got.scores, want.scores)


# -- detection --------------------------------------------------------------------------------


def test_detect_thresholds_order_and_bounds(detector: GroundingDetector, images: list[np.ndarray]) -> None:
    assert normalize_caption("  The Red Square ") == "the red square."
    everything = detector.detect(images, [(1, "the red square")], box_threshold=0.0)[0]
    assert len(everything) == 4  # max_detections
    uncapped = GroundingDetector(detector.model, detector.processor, box_threshold=0.0, max_detections=None)
    everything = uncapped.detect(images, [(1, "the red square")])[0]
    assert len(everything) == NUM_QUERIES
    assert everything.boxes.dtype == np.float32 and everything.boxes.shape == (NUM_QUERIES, 4)
    assert np.all(np.diff(everything.scores) <= 0)  # highest first
    h, w = images[1].shape[:2]
    boxes = everything.boxes
    assert np.all(boxes >= 0) and np.all(boxes[:, [0, 2]] <= w) and np.all(boxes[:, [1, 3]] <= h)
    assert np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])
    assert all(set(label.split()) <= {"the", "red", "square"} for label in everything.labels)

    middle = float(np.median(everything.scores))
    some = uncapped.detect(images, [(1, "the red square")], box_threshold=middle)[0]
    assert len(some) == int((everything.scores > middle).sum())
    assert np.all(some.scores > middle)
    none = detector.detect(images, [(1, "the red square")], box_threshold=1.0)[0]
    assert len(none) == 0 and none.boxes.shape == (0, 4)
    unnamed = detector.detect(images, [(1, "the red square")], text_threshold=1.0)[0]
    assert unnamed.labels == [""] * len(unnamed)


def test_detect_does_not_depend_on_batching(detector: GroundingDetector, images: list[np.ndarray]) -> None:
    queries = [(0, "a red square"), (1, "dog"), (0, "the big blue circle left"), (1, "cat")]
    prepared = [detector.prepare_image(im) for im in images]
    assert isinstance(prepared[0], DetectorImage) and prepared[0].size == (90, 140)
    batched = detector.detect(prepared, queries)
    for query, got in zip(queries, batched, strict=True):
        alone = detector.detect(images, [query])[0]
        np.testing.assert_allclose(got.boxes, alone.boxes, atol=1e-3)
        np.testing.assert_allclose(got.scores, alone.scores, atol=1e-5)


# -- box prompts against SAM2ImagePredictor ---------------------------------------------------


def sam2_image_predictor(predictor: EvfSam2Predictor):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    return SAM2ImagePredictor(predictor.model.visual_model)  # the EVF checkpoint's SAM 2 weights


def test_box_mask_equals_sam2_image_predictor(predictor: EvfSam2Predictor) -> None:
    """End to end from pixels: an image at the SAM input size, so both resizes are identities."""
    size = predictor.model.sam_image_size
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    image[200:700, 300:800] = (30, 200, 60)
    boxes = np.array([[290.5, 190.0, 810.0, 705.25], [0, 0, size, size], [600, 50, 640, 90]], np.float32)
    got = predictor.predict_boxes(predictor.embed_images([image]), [(0, boxes)])[0]
    reference = sam2_image_predictor(predictor)
    reference.set_image(image)
    for k, box in enumerate(boxes):
        logits, iou, _ = reference.predict(box=box, multimask_output=False, return_logits=True)
        np.testing.assert_allclose(got.mask_logits[k], logits[0], atol=1e-3, rtol=0)
        confident = np.abs(logits[0]) > 1e-2
        np.testing.assert_array_equal(got.masks[k][confident], logits[0][confident] > 0)
        assert got.scores[k] == pytest.approx(float(iou[0]), abs=1e-4)


def test_box_masks_batched_equal_sam2_on_the_same_features(
    predictor: EvfSam2Predictor, images: list[np.ndarray]
) -> None:
    """Several images (non-square, unlike sizes), several boxes each, one call; same features injected."""
    embedded = predictor.embed_images(images)
    items = [
        (1, np.array([[5, 10, 60, 100], [0, 0, 70, 120]], np.float32)),
        (0, np.zeros((0, 4), np.float32)),
        (0, np.array([[30, 20, 90, 60]], np.float32)),
        (1, np.array([[40.5, 2.25, 69, 30]], np.float32)),
    ]
    calls = []
    hook = predictor.model.visual_model.sam_mask_decoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = predictor.predict_boxes(embedded, items)
    finally:
        hook.remove()
    assert len(calls) == 1  # one decoder call for all boxes of the batch
    assert got[1].masks.shape == (0, 90, 140) and got[1].scores.shape == (0,)
    reference = sam2_image_predictor(predictor)
    for (image_index, boxes), result in zip(items, got, strict=True):
        features = embedded.embeddings
        reference._features = {
            "image_embed": features.image_embed[image_index : image_index + 1],
            "high_res_feats": [f[image_index : image_index + 1] for f in features.high_res],
        }
        reference._orig_hw = [images[image_index].shape[:2]]
        reference._is_image_set = True
        assert result.masks.shape == (len(boxes), *images[image_index].shape[:2])
        for k, box in enumerate(boxes):
            logits, iou, _ = reference.predict(box=box, multimask_output=False, return_logits=True)
            np.testing.assert_allclose(result.mask_logits[k], logits[0], atol=2e-4, rtol=0)
            confident = np.abs(logits[0]) > 1e-3
            np.testing.assert_array_equal(result.masks[k][confident], logits[0][confident] > 0)
            assert result.scores[k] == pytest.approx(float(iou[0]), abs=1e-5)


def test_box_path_runs_with_half_precision_weights(images: list[np.ndarray]) -> None:
    half = EvfSam2Predictor.from_pretrained(EVF_CHECKPOINT, dtype=torch.bfloat16, autocast=False)
    result = half.predict_boxes(half.embed_images(images[:1]), [(0, np.array([[10, 10, 80, 70]]))])[0]
    assert result.masks.shape == (1, 90, 140) and np.isfinite(result.scores).all()


# -- requests ---------------------------------------------------------------------------------


def test_segment_union_of_instances(
    predictor: EvfSam2Predictor, detector: GroundingDetector, images: list[np.ndarray]
) -> None:
    image = images[0]
    result = segment(
        image, {"prompt": "red square", "use_grounding_dino": True}, predictor, detector=detector
    )
    found = detector.detect([image], [(0, "red square")])[0]
    masks = predictor.predict_boxes(predictor.embed_images([image]), [(0, found.boxes)])[0]
    assert result.instances is not None and len(result.instances) == len(found) == 4
    union = np.zeros(image.shape[:2], bool)
    for instance, box, score, mask, mask_score in zip(
        result.instances, found.boxes, found.scores, masks.masks, masks.scores, strict=True
    ):
        assert set(instance) == {"box", "detector_score", "mask_score", "label", "rle"}
        x0, y0, x1, y1 = box.tolist()
        assert instance["box"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])  # COCO x, y, w, h
        assert instance["detector_score"] == pytest.approx(float(score))
        assert instance["mask_score"] == pytest.approx(float(mask_score), abs=1e-5)
        decoded = rle_to_mask(instance["rle"])
        np.testing.assert_array_equal(decoded, mask)
        union |= decoded
    np.testing.assert_array_equal(result.mask > 0, union)
    assert result.score == pytest.approx(max(i["mask_score"] for i in result.instances))
    assert result.empty == (not union.any())


def test_negative_prompt_boxes_are_subtracted(
    predictor: EvfSam2Predictor, detector: GroundingDetector, images: list[np.ndarray]
) -> None:
    image = images[1]
    request = {"prompt": "dog", "negative_prompt": "left circle", "use_grounding_dino": True}
    result = segment(image, request, predictor, detector=detector)
    found = detector.detect([image], [(0, "dog"), (0, "left circle")])
    pos, neg = predictor.predict_boxes(predictor.embed_images([image]), [(0, d.boxes) for d in found])
    expected = pos.masks.any(0) & ~neg.masks.any(0)
    np.testing.assert_array_equal(result.mask > 0, expected)
    assert len(result.instances) == len(found[0])  # instances are the prompt's boxes only


def test_no_box_is_an_empty_row_and_post_processing_applies_after(
    predictor: EvfSam2Predictor, dino_dir: Path, images: list[np.ndarray]
) -> None:
    strict = GroundingDetector.from_pretrained(dino_dir, box_threshold=1.0)
    image = images[0]
    result = segment(image, {"prompt": "cat", "use_grounding_dino": True}, predictor, detector=strict)
    assert result.empty and result.area == 0 and result.instances == [] and result.score == 0.0
    assert not result.mask.any()
    reverted = segment(
        image, {"prompt": "cat", "use_grounding_dino": True, "revert_mask": True}, predictor, detector=strict
    )
    assert reverted.instances == [] and (reverted.mask == 255).all()


def test_post_processing_options_apply_to_the_union(
    predictor: EvfSam2Predictor, detector: GroundingDetector, images: list[np.ndarray]
) -> None:
    image = images[0]
    request = parse_request(
        {"prompt": "red square", "use_grounding_dino": True, "expand_mask": 3, "fill_holes": True}
    )
    raw = infer_masks(predictor, [image], [(0, request)], detector)[0]
    assert isinstance(raw, RawMasks) and raw.instances is not None
    np.testing.assert_array_equal(raw.mask, np.any([i.mask for i in raw.instances], axis=0))
    result = finish(request, raw, image)
    np.testing.assert_array_equal(result.mask, postprocess(raw.mask, fill_holes=True, expand_mask=3))
    assert result.instances is not None and len(result.instances) == len(raw.instances)


def test_mixed_batch_of_evf_and_grounding_rows(
    predictor: EvfSam2Predictor, detector: GroundingDetector, images: list[np.ndarray]
) -> None:
    def req(prompt: str, **options) -> object:
        return parse_request({"prompt": prompt, **options})

    items = [
        (0, req("red square")),
        (1, req("dog", use_grounding_dino=True, negative_prompt="cat")),
        (1, req("circle", negative_prompt="left")),
        (0, req("red square", use_grounding_dino=True)),
        (1, req("big dog", use_grounding_dino=True)),
    ]
    decoder_calls, detector_calls = [], []
    hooks = [
        predictor.model.visual_model.sam_mask_decoder.register_forward_hook(
            lambda *a: decoder_calls.append(1)
        ),
        detector.model.register_forward_hook(lambda *a: detector_calls.append(1)),
    ]
    try:
        raw = infer_masks(predictor, images, items, detector)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(decoder_calls) == 2  # one for the EVF prompts, one for every box of the batch
    assert len(detector_calls) == 2  # one per image shape (4 queries fit one detector batch each)
    evf_only = infer_masks(predictor, images, [items[0], items[2]])
    for k, alone in zip((0, 2), evf_only, strict=True):
        assert raw[k].instances is None
        np.testing.assert_array_equal(raw[k].mask, alone.mask)
        np.testing.assert_array_equal(raw[k].negative, alone.negative)
    dino_only = infer_masks(predictor, images, [items[1], items[3], items[4]], detector)
    for k, alone in zip((1, 3, 4), dino_only, strict=True):
        assert raw[k].instances is not None and len(raw[k].instances) == len(alone.instances)
        np.testing.assert_array_equal(raw[k].mask, alone.mask)
        assert (raw[k].negative is None) == (alone.negative is None)
        for a, b in zip(raw[k].instances, alone.instances, strict=True):
            assert a.box == pytest.approx(b.box, abs=1e-3)
            np.testing.assert_array_equal(a.mask, b.mask)
    results = [finish(r, m) for (_, r), m in zip(items, raw, strict=True)]
    assert [r.instances is None for r in results] == [True, False, True, False, False]


def test_prepared_images_need_detector_images(
    predictor: EvfSam2Predictor, detector: GroundingDetector, images: list[np.ndarray]
) -> None:
    prepared = [predictor.prepare_image(im) for im in images]
    items = [
        (1, parse_request({"prompt": "dog", "use_grounding_dino": True})),
        (0, parse_request({"prompt": "dog"})),
    ]
    with pytest.raises(ValueError, match="needs the original array"):
        infer_masks(predictor, prepared, items, detector)
    from_workers = [None, detector.prepare_image(images[1])]  # only the grounding rows' images
    got = infer_masks(predictor, prepared, items, detector, detector_images=from_workers)
    want = segment(images[1], {"prompt": "dog", "use_grounding_dino": True}, predictor, detector=detector)
    np.testing.assert_array_equal(got[0].mask, want.mask > 0)
    assert got[1].instances is None


def test_missing_detector_and_lazy_loading(
    predictor: EvfSam2Predictor, dino_dir: Path, images: list[np.ndarray], tmp_path: Path
) -> None:
    request = {"prompt": "dog", "use_grounding_dino": True}
    with pytest.raises(MissingDetectorError, match="GroundingDINO"):
        segment(images[0], request, predictor)
    failed = InferenceEngine.wrap(predictor).infer(images, [(0, parse_request(request))], images)[0]
    assert isinstance(failed.cause, MissingDetectorError)
    # An EVF request never loads the detector, even a missing one.
    result = segment(images[0], {"prompt": "dog"}, predictor, detector=tmp_path / "absent")
    assert result.instances is None
    # A checkpoint path is loaded once per process, with the default thresholds.
    first = segment(images[0], request, predictor, detector=str(dino_dir))
    assert load_detector(str(dino_dir), predictor.device) is load_detector(str(dino_dir), predictor.device)
    assert load_detector(str(dino_dir), predictor.device).box_threshold == 0.35
    assert first.instances is not None


def test_box_path_runs_in_half_precision_under_autocast(images: list[np.ndarray]) -> None:
    """bfloat16 with autocast (what dtype auto picks on bf16 hardware) on the box path too."""
    half = EvfSam2Predictor.from_pretrained(EVF_CHECKPOINT, dtype=torch.bfloat16)
    result = half.predict_boxes(half.embed_images(images[:1]), [(0, np.array([[10, 10, 80, 70]]))])[0]
    assert result.masks.shape == (1, 90, 140) and np.isfinite(result.scores).all()
