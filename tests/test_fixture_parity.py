"""The tiny fixture checkpoint reproduces every array recorded from the authors' own code.

Tolerances are those the fixture's README recommends for a float32 implementation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evf import EvfSam2Predictor, Prompt
from evf.predictor import PreparedImage
from evf.transforms import normalize_sam

FIXTURE = Path(__file__).parent / "fixtures" / "evf-sam2-tiny"
CASES = json.loads((FIXTURE / "cases.json").read_text())
EXPECTED = np.load(FIXTURE / "expected.npz")


def load_rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(FIXTURE / "images" / name).convert("RGB"))


@pytest.fixture(scope="module")
def predictors() -> dict[str, EvfSam2Predictor]:
    return {
        mode: EvfSam2Predictor.from_pretrained(FIXTURE / "checkpoint", mode=mode)
        for mode in ("multitask", "legacy")
    }


def expected(case: dict, name: str) -> np.ndarray:
    return EXPECTED[f"{case['id']}.{name}"]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_intermediate_arrays_match_reference(case: dict, predictors: dict[str, EvfSam2Predictor]) -> None:
    predictor = predictors[case["mode"]]
    model = predictor.model
    ids = predictor.tokenizer.encode(case["prompt"], case["semantic"])
    np.testing.assert_array_equal(np.array([ids]), expected(case, "input_ids"))

    prepared: PreparedImage = predictor.prepare_image(load_rgb(case["image"]))
    sam_input = normalize_sam(prepared.sam_pixels, model.sam_image_size, torch.float32)[None]
    np.testing.assert_allclose(
        sam_input.numpy(), expected(case, "sam_input").astype(np.float32), atol=2e-3, rtol=0
    )
    beit3_input = prepared.beit3_pixels[None]
    np.testing.assert_allclose(beit3_input.numpy(), expected(case, "beit3_input"), atol=1e-5, rtol=0)

    with torch.inference_mode():
        input_ids = torch.tensor([ids])
        cls = model.mm_extractor["beit3"](beit3_input, input_ids)[:, 0]
        np.testing.assert_allclose(cls.numpy(), expected(case, "cls"), atol=1e-4, rtol=0)
        text_embed = model.encode_prompts(beit3_input, input_ids, None)
        np.testing.assert_allclose(text_embed.numpy(), expected(case, "text_embed"), atol=1e-4, rtol=0)
        low_res, iou, _ = model.decode_masks(
            model.encode_images(sam_input), text_embed, multimask=case["mode"] == "multitask"
        )
    np.testing.assert_allclose(low_res.numpy(), expected(case, "low_res_masks"), atol=5e-3, rtol=0)
    np.testing.assert_allclose(iou.numpy(), expected(case, "iou"), atol=2e-5, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_predict_matches_reference(case: dict, predictors: dict[str, EvfSam2Predictor]) -> None:
    result = predictors[case["mode"]].predict(
        load_rgb(case["image"]), case["prompt"], semantic=case["semantic"]
    )
    want_logits = expected(case, "mask_logits")[0]
    assert result.mask_logits.dtype == np.float32 and result.mask.dtype == bool
    assert result.mask_logits.shape == want_logits.shape
    np.testing.assert_allclose(result.mask_logits, want_logits, atol=5e-3, rtol=0)
    confident = np.abs(want_logits) > 5e-3
    np.testing.assert_array_equal(result.mask[confident], expected(case, "mask")[0][confident])
    assert result.score == pytest.approx(float(expected(case, "iou").max()), abs=2e-5)


@pytest.mark.parametrize("mode", ["multitask", "legacy"])
def test_batched_equals_unbatched(mode: str, predictors: dict[str, EvfSam2Predictor]) -> None:
    """All cases of a mode in one call: images grouped, prompts of different lengths padded together."""
    predictor = predictors[mode]
    cases = [c for c in CASES if c["mode"] == mode] + [
        {"image": "wide_1280x320.png", "prompt": "a", "semantic": False},
        {"image": "shapes_320x240.png", "prompt": "the blue circle at the top", "semantic": True},
    ]
    names = sorted({c["image"] for c in cases})
    requests = [[Prompt(c["prompt"], c["semantic"]) for c in cases if c["image"] == n] for n in names]
    batched = predictor.predict_batch([load_rgb(n) for n in names], requests)
    assert [len(r) for r in batched] == [len(r) for r in requests]
    for name, prompts, results in zip(names, requests, batched, strict=True):
        for prompt, got in zip(prompts, results, strict=True):
            alone = predictor.predict(load_rgb(name), prompt.text, prompt.semantic)
            # 1e-5 of the logits' scale: the batch size changes float32 summation order in the
            # decoder's matmuls (about 2e-7 relative here, with logits up to ~130).
            scale = float(np.abs(alone.mask_logits).max())
            assert float(np.abs(got.mask_logits - alone.mask_logits).max()) <= 1e-5 * max(scale, 1.0)
            np.testing.assert_array_equal(got.mask, alone.mask)
            assert got.score == pytest.approx(alone.score, abs=1e-5)


def test_empty_batch(predictors: dict[str, EvfSam2Predictor]) -> None:
    assert predictors["multitask"].predict_batch([], []) == []
    assert predictors["multitask"].predict_batch([load_rgb("tiny_64x64.png")], [[]]) == [[]]


def test_default_mode_follows_tokenizer(predictors: dict[str, EvfSam2Predictor]) -> None:
    # The fixture is a -multitask checkpoint ([semantic] in its tokenizer): the current path.
    assert EvfSam2Predictor.from_pretrained(FIXTURE / "checkpoint").mode == "multitask"
