import json
import pickle

import pytest

from evf.request import (
    EXTENSION_OPTIONS,
    FIELD_NAMES,
    MISSING,
    OPTION_DEFAULTS,
    OPTION_NAMES,
    FieldError,
    InvalidRequestError,
    SegmentRequest,
    parse_request,
)


def test_defaults_match_fal_schema():
    req = parse_request({"prompt": "the red car"})
    assert req.prompt == "the red car"
    assert req.negative_prompt is None
    assert req.semantic_type is False
    assert req.image_url is None
    assert req.mask_only is True
    assert req.use_grounding_dino is False
    assert req.revert_mask is False
    assert req.blur_mask == 0
    assert req.expand_mask == 0
    assert req.fill_holes is False


def test_option_names_and_defaults():
    assert (
        "prompt",
        "negative_prompt",
        "semantic_type",
        "image_url",
        "mask_only",
        "use_grounding_dino",
        "revert_mask",
        "blur_mask",
        "expand_mask",
        "fill_holes",
        *EXTENSION_OPTIONS,  # min_score, min_area: ours, beside fal's schema
    ) == FIELD_NAMES
    assert EXTENSION_OPTIONS == ("min_score", "min_area")
    assert (
        "negative_prompt",
        "semantic_type",
        "mask_only",
        "use_grounding_dino",
        "revert_mask",
        "blur_mask",
        "expand_mask",
        "fill_holes",
        *EXTENSION_OPTIONS,
    ) == OPTION_NAMES
    assert list(OPTION_DEFAULTS) == list(OPTION_NAMES)
    assert OPTION_DEFAULTS == {
        "negative_prompt": None,
        "semantic_type": False,
        "mask_only": True,
        "use_grounding_dino": False,
        "revert_mask": False,
        "blur_mask": 0,
        "expand_mask": 0,
        "fill_holes": False,
        "min_score": None,
        "min_area": None,
    }
    assert parse_request({"prompt": "x"}).options() == OPTION_DEFAULTS


def test_row_values_override_job_defaults():
    job = {**OPTION_DEFAULTS, "blur_mask": 5, "fill_holes": True}
    row = {"prompt": "dog", "image_url": "s3://b/k.png", "blur_mask": 7}
    req = parse_request({**job, **row})
    assert (req.blur_mask, req.fill_holes, req.image_url) == (7, True, "s3://b/k.png")


def test_all_fields_valid():
    data = {
        "prompt": "person",
        "negative_prompt": "hat",
        "semantic_type": True,
        "image_url": "https://example.com/a.png",
        "mask_only": False,
        "use_grounding_dino": True,
        "revert_mask": True,
        "blur_mask": 49,
        "expand_mask": 20,
        "fill_holes": True,
        "min_score": 0.25,
        "min_area": 100,
    }
    req = parse_request(data)
    assert req.model_dump() == data
    assert parse_request(req) is req
    assert parse_request(json.loads(req.model_dump_json())) == req


@pytest.mark.parametrize("value", [0, 1, 3, 25, 49])
def test_blur_valid(value):
    assert parse_request({"prompt": "x", "blur_mask": value}).blur_mask == value


@pytest.mark.parametrize("value", ["", "   ", "\n\t"])
def test_blank_negative_prompt_is_none(value):
    assert parse_request({"prompt": "x", "negative_prompt": value}).negative_prompt is None


def _err(data):
    with pytest.raises(InvalidRequestError) as info:
        parse_request(data)
    return info.value


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("blur_mask", 2, "blur_mask=2: must be 0 (off) or an odd integer in 1..49 (kernel size)"),
        ("blur_mask", 50, "blur_mask=50: must be 0 (off) or an odd integer in 1..49"),
        ("blur_mask", 51, "blur_mask=51: must be 0 (off) or an odd integer in 1..49"),
        ("blur_mask", -1, "blur_mask=-1: must be 0 (off) or an odd integer in 1..49"),
        ("blur_mask", "3", "blur_mask='3': must be 0 (off) or an odd integer in 1..49"),
        ("blur_mask", 3.0, "blur_mask=3.0: must be 0 (off) or an odd integer in 1..49"),
        ("blur_mask", True, "blur_mask=True: must be 0 (off) or an odd integer in 1..49"),
        ("expand_mask", -1, "expand_mask=-1: must be an integer in 0..20"),
        ("expand_mask", 21, "expand_mask=21: must be an integer in 0..20"),
        ("expand_mask", 3.5, "expand_mask=3.5: must be an integer in 0..20"),
        ("expand_mask", "3", "expand_mask='3': must be an integer in 0..20"),
        ("revert_mask", "yes", "revert_mask='yes': must be a boolean (true/false)"),
        ("fill_holes", "true", "fill_holes='true': must be a boolean (true/false)"),
        ("mask_only", 1, "mask_only=1: must be a boolean (true/false)"),
        ("semantic_type", None, "semantic_type=None: must be a boolean (true/false)"),
        ("use_grounding_dino", 0, "use_grounding_dino=0: must be a boolean (true/false)"),
        ("prompt", "", "prompt='': must be a non-empty string"),
        ("prompt", "  \t", "prompt='  \\t': must be a non-empty string"),
        ("prompt", None, "prompt=None: must be a non-empty string"),
        ("prompt", 5, "prompt=5: must be a non-empty string"),
        ("negative_prompt", 5, "negative_prompt=5: must be a string or null"),
        ("image_url", "", "image_url='': must be a non-empty string"),
        ("image_url", 3, "image_url=3: must be a non-empty string"),
    ],
)
def test_invalid_value(field, value, expected):
    data = {"prompt": "ok", field: value}
    err = _err(data)
    assert isinstance(err, ValueError)
    assert expected in str(err)
    assert [(e.field, e.value) for e in err.errors] == [(field, value)]
    assert expected.split(": ", 1)[1] in err.errors[0].message
    assert "Input should" not in str(err)  # no raw pydantic text


def test_unknown_field_lists_allowed_fields():
    err = _err({"prompt": "ok", "colour": "red"})
    assert "colour='red': unknown field; allowed fields: prompt, negative_prompt, semantic_type" in str(err)
    for name in FIELD_NAMES:
        assert name in str(err)
    assert err.errors == [FieldError("colour", "red", err.errors[0].message)]


def test_missing_prompt():
    err = _err({"blur_mask": 3})
    assert str(err) == "invalid request: prompt (missing): must be a non-empty string"
    assert err.errors[0].field == "prompt"
    assert err.errors[0].value is MISSING


def test_every_bad_field_is_named():
    err = _err({"prompt": "", "blur_mask": 2, "expand_mask": 21, "revert_mask": "yes", "colour": "red"})
    msg = str(err)
    for part in ("prompt=''", "blur_mask=2", "expand_mask=21", "revert_mask='yes'", "colour='red'"):
        assert part in msg
    assert [e.field for e in err.errors] == ["prompt", "revert_mask", "blur_mask", "expand_mask", "colour"]
    for field, value, message in err.errors:  # plain (field, value, message) tuples
        assert isinstance(field, str) and message
        assert value is not MISSING


def test_not_a_mapping():
    err = _err(["prompt", "x"])
    assert "must be a mapping" in str(err)


def test_non_string_key():
    err = _err({"prompt": "x", 3: "y"})
    assert "unknown field" in str(err)


def test_long_values_are_shortened():
    err = _err({"prompt": "x", "blur_mask": "9" * 500})
    assert len(str(err)) < 200
    assert err.errors[0].value == "9" * 500  # full value kept in structured errors


def test_error_pickles():
    err = _err({"prompt": "", "blur_mask": 2})
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is InvalidRequestError
    assert str(again) == str(err)
    assert again.errors == err.errors
    missing = pickle.loads(pickle.dumps(_err({})))
    assert missing.errors[0].value is MISSING


def test_model_is_strict_and_frozen():
    with pytest.raises(ValueError):
        SegmentRequest(prompt="x", blur_mask=2)
    req = SegmentRequest(prompt="x")
    with pytest.raises(ValueError):
        req.blur_mask = 3


def test_numpy_scalars_must_be_converted():
    np = pytest.importorskip("numpy")
    err = _err({"prompt": "x", "blur_mask": np.int64(3)})
    assert "blur_mask" in str(err)
    assert parse_request({"prompt": "x", "blur_mask": np.int64(3).item()}).blur_mask == 3
