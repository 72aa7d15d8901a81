"""The job's typed records and the Arrow schemas they travel in between stages.

- :class:`JobRow`: one manifest row to compute, validated once at the read stage (its request is a
  ``SegmentRequest`` rebuilt downstream without re-validation). The model stage fills in its
  outcome (``score``, mask indices, ``instances`` or ``error``).
- :class:`ImageUnit`: one distinct image of a decode batch with every row that names it: the model
  family's prepared inputs (named arrays, ``evf.registry.PreparedInputs``), the original pixels
  when a row needs them, and after the model stage the masks (packed bits, ``mask_count`` x H x W).

Between the read and decode stages a table has one row per ``JobRow`` (``ROW_SCHEMA``); between
decode, model and finish one row per ``ImageUnit`` (``UNIT_SCHEMA``, rows as a list of structs).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa

from evf.registry import ModelFamily, PreparedInputs
from evf.request import OPTION_NAMES, SegmentRequest

__all__ = [
    "INSTANCE_TYPE",
    "OPTION_TYPES",
    "RLE_TYPE",
    "ROW_SCHEMA",
    "UNIT_SCHEMA",
    "ImageUnit",
    "JobRow",
    "rows_from_table",
    "rows_table",
    "units_from_table",
    "units_table",
]


def _arrow_type(annotation: Any) -> pa.DataType:
    kinds = [kind for kind in typing.get_args(annotation) or (annotation,) if kind is not type(None)]
    return {str: pa.string(), bool: pa.bool_(), int: pa.int32(), float: pa.float64()}[kinds[0]]


OPTION_TYPES: dict[str, pa.DataType] = {
    name: _arrow_type(SegmentRequest.model_fields[name].annotation) for name in OPTION_NAMES
}
"""Arrow type of each request option column (the same in the job's rows and in the metadata)."""

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32(), 2)), ("counts", pa.string())])
"""COCO compressed RLE: ``{"size": [H, W], "counts": str}``."""

INSTANCE_TYPE = pa.struct(
    [
        ("box", pa.list_(pa.float32(), 4)),
        ("detector_score", pa.float32()),
        ("mask_score", pa.float32()),
        ("label", pa.string()),
        ("rle", RLE_TYPE),
    ]
)
"""One object of a row (``evf.result.Instance.to_dict``): ``box`` ``[x, y, w, h]`` float pixels, the
detector's score, the mask's predicted IoU, the matched prompt words, and the COCO RLE of that
object's own mask (before post-processing and negative subtraction)."""

ARRAY_TYPE = pa.struct(
    [
        ("name", pa.string()),
        ("dtype", pa.string()),
        ("shape", pa.list_(pa.int32())),
        ("data", pa.large_binary()),
    ]
)
"""One named array of a family's prepared inputs (C order)."""

_ROW_FIELDS = [
    ("id", pa.string()),
    ("key", pa.string()),
    ("image_url", pa.string()),
    ("manifest_file", pa.string()),
    ("manifest_row", pa.int64()),
    ("prompt", pa.string()),
    *[(name, OPTION_TYPES[name]) for name in OPTION_NAMES],
    ("elapsed_ms", pa.float64()),
    ("score", pa.float64()),
    ("presence_logit", pa.float64()),
    ("mask_index", pa.int32()),
    ("negative_index", pa.int32()),
    ("instances", pa.list_(INSTANCE_TYPE)),
    ("error", pa.string()),
    ("image_bytes", pa.large_binary()),  # a manifest's embedded image, read to decode stage only
]
ROW_SCHEMA = pa.schema(_ROW_FIELDS)
ROW_TYPE = pa.struct(_ROW_FIELDS)

UNIT_SCHEMA = pa.schema(
    [
        ("image_url", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("inputs", pa.list_(ARRAY_TYPE)),  # the family's prepared inputs (PreparedInputs.arrays())
        ("image", pa.large_binary()),  # HxWx3 uint8, only when needed (RGBA output, GroundingDINO, overlays)
        ("masks", pa.large_binary()),  # after the model: packed bool (mask_count, H, W)
        ("mask_count", pa.int32()),
        ("rows", pa.list_(ROW_TYPE)),
    ]
)


@dataclass
class JobRow:
    """One manifest row to compute (see the module docstring).

    ``image_url`` is resolved (absolute); ``request`` holds every option, job defaults applied.
    ``elapsed_ms`` accumulates the row's share of each stage's work (shared reads, decodes and
    model calls are split between the rows that share them).
    """

    id: str
    key: str
    image_url: str
    manifest_file: str
    manifest_row: int
    request: SegmentRequest
    elapsed_ms: float = 0.0
    score: float | None = None
    presence_logit: float | None = None
    mask_index: int | None = None
    negative_index: int | None = None
    instances: list[dict[str, Any]] | None = None
    error: str | None = None
    image_bytes: bytes | None = None  # the image itself, when the manifest embeds it

    @property
    def needs_image(self) -> bool:
        """Whether the model or finish stage needs the original pixels for this row's request (RGBA
        output, GroundingDINO); a job writing overlays needs them for every row
        (``ImageUnit.prepared(keep_image=True)``)."""
        return not self.request.mask_only or self.request.use_grounding_dino

    def to_arrow(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "request"}
        data["prompt"] = self.request.prompt
        data.update(self.request.options())
        return data

    @classmethod
    def from_arrow(cls, data: dict[str, Any]) -> JobRow:
        # Validated when the row was read: rebuilt as it was, without a second validation.
        request = SegmentRequest.model_construct(
            prompt=data["prompt"], image_url=data["image_url"], **{n: data[n] for n in OPTION_NAMES}
        )
        names = [f.name for f in fields(cls) if f.name != "request"]
        return cls(request=request, **{name: data[name] for name in names})


def rows_table(rows: Sequence[JobRow]) -> pa.Table:
    return pa.Table.from_pylist([row.to_arrow() for row in rows], schema=ROW_SCHEMA)


def rows_from_table(table: pa.Table) -> list[JobRow]:
    return [JobRow.from_arrow(data) for data in table.to_pylist()]


@dataclass
class ImageUnit:
    """One image of a batch with its rows (see the module docstring). ``height``/``width`` are the
    original size; ``inputs`` is None once the model has used them."""

    image_url: str
    width: int
    height: int
    rows: list[JobRow]
    inputs: list[dict[str, Any]] | None = None
    image: bytes | None = None
    masks: bytes | None = None
    mask_count: int | None = None

    @classmethod
    def prepared(
        cls,
        image_url: str,
        image: np.ndarray,
        prepared: PreparedInputs,
        rows: list[JobRow],
        keep_image: bool = False,
    ) -> ImageUnit:
        """A unit from a decoded HxWx3 uint8 image and its family's prepared inputs. The pixels go
        along when a row needs them, or always with ``keep_image`` (the job writes overlays)."""
        inputs = []
        for name, array in prepared.arrays().items():
            data = np.ascontiguousarray(array)
            inputs.append(
                {"name": name, "dtype": data.dtype.str, "shape": list(data.shape), "data": data.tobytes()}
            )
        return cls(
            image_url=image_url,
            width=int(image.shape[1]),
            height=int(image.shape[0]),
            rows=rows,
            inputs=inputs,
            image=image.tobytes() if keep_image or any(row.needs_image for row in rows) else None,
        )

    def prepared_inputs(self, family: type[ModelFamily]) -> PreparedInputs:
        """The prepared inputs as ``family`` takes them (rebuilt from read-only views)."""
        assert self.inputs is not None
        arrays = {
            array["name"]: np.frombuffer(array["data"], np.dtype(array["dtype"])).reshape(array["shape"])
            for array in self.inputs
        }
        return family.prepared_from_arrays(arrays, (self.height, self.width))

    def image_array(self) -> np.ndarray | None:
        """The original HxWx3 uint8 pixels (read-only), when carried."""
        if self.image is None:
            return None
        return np.frombuffer(self.image, np.uint8).reshape(self.height, self.width, 3)

    def set_masks(self, masks: Sequence[np.ndarray]) -> None:
        """Store the model's bool (H, W) masks (packed bits) and drop the model inputs."""
        self.inputs = None
        self.mask_count = len(masks)
        self.masks = (
            np.packbits(np.stack(masks).astype(bool, copy=False), axis=None).tobytes() if masks else None
        )

    def mask_array(self) -> np.ndarray | None:
        """bool (mask_count, H, W), or None when the model gave no mask."""
        if self.masks is None or not self.mask_count:
            return None
        count = self.mask_count * self.height * self.width
        bits = np.unpackbits(np.frombuffer(self.masks, np.uint8), count=count)
        return bits.reshape(self.mask_count, self.height, self.width).astype(bool)

    def to_arrow(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["rows"] = [row.to_arrow() for row in self.rows]
        return data


def units_table(units: Sequence[ImageUnit]) -> pa.Table:
    return pa.Table.from_pylist([unit.to_arrow() for unit in units], schema=UNIT_SCHEMA)


def units_from_table(table: pa.Table) -> list[ImageUnit]:
    units = []
    for data in table.to_pylist():
        data["rows"] = [JobRow.from_arrow(row) for row in data["rows"]]
        units.append(ImageUnit(**data))
    return units
