"""Request options of fal.ai's ``fal-ai/evf-sam`` endpoint.

:class:`SegmentRequest` mirrors the endpoint's input schema (same field names and
defaults). Validation is strict: ``"true"`` is not a boolean and ``3.5`` or ``"3"``
is not an integer. Python ``bool``/``int``/``str`` values are accepted; numpy scalars
(``np.int64``, ``np.bool_``) are *not*, so callers reading Arrow/pandas rows must
convert them first (``value.item()``).

Use :func:`parse_request` to validate untrusted input (a JSON object, a manifest
row): it raises :class:`InvalidRequestError` whose message names every bad field,
the value given and what is allowed, e.g.::

    invalid request: blur_mask=2: must be 0 (off) or an odd integer in 1..49 (kernel size)

``OPTION_NAMES`` / ``OPTION_DEFAULTS`` list the per-request options (every field but
``prompt`` and ``image_url``) so a pipeline can overlay per-row values on job defaults::

    req = parse_request({**job_defaults, **row})
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evf.errors import UserError, unknown_name

__all__ = [
    "BLUR_MASK_MAX",
    "EXPAND_MASK_MAX",
    "EXTENSION_OPTIONS",
    "FIELD_NAMES",
    "MISSING",
    "OPTION_DEFAULTS",
    "OPTION_NAMES",
    "FieldError",
    "InvalidRequestError",
    "SegmentRequest",
    "clean_value",
    "merge_options",
    "parse_request",
    "short_repr",
]

BLUR_MASK_MAX = 50
"""Upper bound of ``blur_mask`` as in fal's schema; being even, the largest valid value is 49."""
EXPAND_MASK_MAX = 20


class SegmentRequest(BaseModel):
    """One text-prompted segmentation request (fal-ai/evf-sam input schema).

    Immutable; derive variants with ``req.model_copy(update=...)`` only from trusted
    values, or re-validate with :func:`parse_request`.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: str = Field(description="The prompt to generate segmentation from.")
    negative_prompt: str | None = Field(
        default=None,
        description="Areas to exclude from segmentation (will be subtracted from prompt results). "
        "An empty or whitespace-only string means none.",
    )
    semantic_type: bool = Field(default=False, description="Enable semantic level segmentation.")
    image_url: str | None = Field(
        default=None,
        description="URL (or path) of the input image. Required by the pipeline, not when an image "
        "is passed directly.",
    )
    mask_only: bool = Field(
        default=True, description="Output only the binary mask; false gives the RGBA masked image."
    )
    use_grounding_dino: bool = Field(
        default=False, description="Use GroundingDINO instead of SAM for segmentation."
    )
    revert_mask: bool = Field(default=False, description="Invert the mask (background becomes foreground).")
    blur_mask: int = Field(
        default=0,
        ge=0,
        le=BLUR_MASK_MAX,
        description="Gaussian blur kernel size for the mask edges: 0 (off) or an odd number.",
    )
    expand_mask: int = Field(
        default=0, ge=0, le=EXPAND_MASK_MAX, description="Expand (dilate) the mask by this many pixels."
    )
    fill_holes: bool = Field(default=False, description="Fill holes in the mask.")
    # Extensions beside the fal options (not in fal's schema): bars below which a mask is reported
    # ``empty`` with the reason recorded; the mask itself is still written for review.
    min_score: float | None = Field(
        default=None, ge=0, le=1, description="Extension: a predicted IoU below this makes the row empty."
    )
    min_area: int | None = Field(
        default=None, ge=0, description="Extension: a final mask of fewer pixels makes the row empty."
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must be a non-empty string")
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _blank_negative_is_none(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        return value

    @field_validator("image_url")
    @classmethod
    def _image_url_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("image_url must be a non-empty string or null")
        return value

    @field_validator("blur_mask")
    @classmethod
    def _blur_odd(cls, value: int) -> int:
        if value != 0 and value % 2 == 0:
            raise ValueError("blur_mask must be 0 or odd")
        return value

    def options(self) -> dict[str, Any]:
        """The option values (``OPTION_NAMES`` order) of this request, as a plain dict."""
        return {name: getattr(self, name) for name in OPTION_NAMES}


FIELD_NAMES: tuple[str, ...] = tuple(SegmentRequest.model_fields)
OPTION_NAMES: tuple[str, ...] = tuple(n for n in FIELD_NAMES if n not in ("prompt", "image_url"))
OPTION_DEFAULTS: dict[str, Any] = {n: SegmentRequest.model_fields[n].default for n in OPTION_NAMES}
EXTENSION_OPTIONS: tuple[str, ...] = ("min_score", "min_area")
"""Options that fal-ai/evf-sam does not have; unset (None) they change nothing, not even a row's key."""

_INT_OPTIONS = frozenset({"blur_mask", "expand_mask"})
_OPTION_SET = frozenset(OPTION_NAMES)


def clean_value(name: str, value: Any) -> Any:
    """Arrow/pandas/JSON artefacts -> what the request model expects (NaN -> None, 3.0 -> 3 for ints,
    numpy scalars -> Python values); anything else unchanged, for validation to judge."""
    if isinstance(value, str):  # the usual case, first: millions of rows pass here on a resume
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if name in _INT_OPTIONS and value.is_integer():
            return int(value)
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy scalars
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def merge_options(given: Mapping[str, Any], defaults: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
    """The options of a request over ``defaults`` (a job's, a server's): an option that ``given``
    leaves out or sets to null takes the default. Returns ``(options, whether given set any)``;
    without any, ``defaults`` itself is returned (shared, not copied: do not change it)."""
    own = {}
    for name in _OPTION_SET.intersection(given):
        if (value := clean_value(name, given[name])) is not None:
            own[name] = value
    return ({**defaults, **own}, True) if own else (defaults, False)


_BOOL_RULE = "must be a boolean (true/false)"
_RULES: dict[str, str] = {
    "prompt": "must be a non-empty string",
    "negative_prompt": "must be a string or null",
    "semantic_type": _BOOL_RULE,
    "image_url": "must be a non-empty string (URL or path) or null",
    "mask_only": _BOOL_RULE,
    "use_grounding_dino": _BOOL_RULE,
    "revert_mask": _BOOL_RULE,
    "blur_mask": f"must be 0 (off) or an odd integer in 1..{BLUR_MASK_MAX - 1} (kernel size)",
    "expand_mask": f"must be an integer in 0..{EXPAND_MASK_MAX}",
    "fill_holes": _BOOL_RULE,
    "min_score": "must be a number in 0..1 or null (predicted IoU below which the row is empty)",
    "min_area": "must be an integer >= 0 or null (mask pixels below which the row is empty)",
}


class _Missing:
    """Sentinel for a required field that was not given."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<missing>"

    def __reduce__(self) -> str:
        return "MISSING"


MISSING = _Missing()


class FieldError(NamedTuple):
    """One invalid field: its name, the value given (``MISSING`` if absent) and what is allowed."""

    field: str
    value: Any
    message: str


SHORT_REPR_LIMIT = 100
"""The most characters of a value an error message quotes (``short_repr``)."""


def _described(value: Any, depth: int = 0) -> str:
    """``repr(value)`` with bytes described, not printed (``<bytes, 6,532 B>``), also inside a
    mapping or a sequence (Hugging Face's image struct ``{"bytes": b"...", "path": ...}``)."""
    if isinstance(value, bytes | bytearray | memoryview):
        size = value.nbytes if isinstance(value, memoryview) else len(value)
        return f"<{type(value).__name__}, {size:,} B>"
    if depth < 3 and isinstance(value, Mapping):
        items = [
            f"{_described(k, depth + 1)}: {_described(v, depth + 1)}" for k, v in list(value.items())[:8]
        ]
        return "{" + ", ".join(items) + (", ..." if len(value) > 8 else "") + "}"
    if depth < 3 and isinstance(value, list | tuple):
        items = [_described(v, depth + 1) for v in value[:8]]
        more = ", ..." if len(value) > 8 else ("," if isinstance(value, tuple) and len(value) == 1 else "")
        return ("[{}{}]" if isinstance(value, list) else "({}{})").format(", ".join(items), more)
    return repr(value)


def short_repr(value: Any, limit: int = SHORT_REPR_LIMIT) -> str:
    """How an error message quotes a value: its repr clipped to ``limit`` characters, bytes (alone
    or in a mapping, such as an image struct) described by type and size instead of printed."""
    text = _described(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class InvalidRequestError(UserError, ValueError):
    """A request failed validation.

    ``str(err)`` is a short human message naming every bad field; ``err.errors`` is the
    same as a list of :class:`FieldError` ``(field, value, message)`` tuples.
    """

    def __init__(self, errors: list[FieldError] | list[tuple[str, Any, str]]):
        self.errors: list[FieldError] = [FieldError(*e) for e in errors]
        super().__init__(self._format(self.errors))

    @staticmethod
    def _format(errors: list[FieldError]) -> str:
        parts = []
        for e in errors:
            given = " (missing)" if e.value is MISSING else f"={short_repr(e.value)}"
            parts.append(f"{e.field}{given}: {e.message}")
        return "invalid request: " + "; ".join(parts)

    def __reduce__(self):  # picklable across processes (e.g. Ray workers)
        return (type(self), (self.errors,))


def _unknown_rule(name: str) -> str:
    return unknown_name(name, FIELD_NAMES)


def _convert(exc: ValidationError, data: Mapping[str, Any]) -> InvalidRequestError:
    errors: list[FieldError] = []
    seen: set[str] = set()
    for err in exc.errors():
        loc = err.get("loc") or ()
        key = loc[0] if loc else None
        if err["type"] == "invalid_key":  # non-string key
            name, value, rule = short_repr(key), data.get(key, MISSING), _unknown_rule("")
        elif err["type"] == "extra_forbidden" or key not in _RULES:
            name, value, rule = str(key)[:SHORT_REPR_LIMIT], data.get(key, MISSING), _unknown_rule(str(key))
        else:
            name, value, rule = str(key), data.get(key, MISSING), _RULES[key]
        if name in seen:
            continue
        seen.add(name)
        errors.append(FieldError(name, value, rule))
    return InvalidRequestError(errors)


def parse_request(data: Mapping[str, Any] | SegmentRequest) -> SegmentRequest:
    """Validate ``data`` into a :class:`SegmentRequest`.

    ``data`` is a mapping of fal field names to values (missing options take their
    defaults) or an existing :class:`SegmentRequest`, returned unchanged.

    Raises :class:`InvalidRequestError` (a ``ValueError``) naming every invalid field.
    """
    if isinstance(data, SegmentRequest):
        return data
    if not isinstance(data, Mapping):
        raise InvalidRequestError([FieldError("request", data, "must be a mapping of field names to values")])
    try:
        return SegmentRequest.model_validate(dict(data))
    except ValidationError as exc:
        raise _convert(exc, data) from None
