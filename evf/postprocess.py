"""Mask post-processing: pure functions on numpy masks (OpenCV for image ops).

Conventions
-----------
* A *binary mask* is a 2-D ``bool`` array of shape ``(H, W)``; ``True`` = foreground.
* A *byte mask* is a 2-D ``uint8`` array of shape ``(H, W)`` with 0 = background and
  255 = foreground; after blurring it is soft (any value in 0..255).
* Inputs are never modified; every function returns a new array.
* An all-background ("empty") mask is a normal input everywhere. Arrays with a zero-size
  dimension, the wrong number of dimensions or the wrong dtype raise ``ValueError``.

Order of operations
-------------------
:func:`postprocess` applies the request options of fal-ai/evf-sam in this one order:

1. **subtract negative** -- ``mask & ~negative`` (the ``negative_prompt`` mask);
2. **fill holes** -- background regions not connected to the image border become foreground
   (background connectivity is 4-neighbour, so a diagonal gap does not connect a region to
   the border). Note: a negative region lying entirely inside the mask is therefore filled
   back in when ``fill_holes`` is on;
3. **expand** -- dilate by ``expand_mask`` pixels with a Euclidean disk;
4. **blur** -- Gaussian blur with odd kernel size ``blur_mask`` (the mask becomes soft);
5. **revert** -- ``255 - mask``.

The result is a byte mask, binary (0/255) unless blur is on.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any, NamedTuple

import cv2
import numpy as np
from pycocotools import mask as coco_mask

__all__ = [
    "MaskStats",
    "binarize",
    "blur",
    "compose_rgba",
    "decode_rle",
    "pycoco_rle",
    "disk",
    "encode_rle",
    "expand",
    "fill_holes",
    "mask_stats",
    "postprocess",
    "revert",
    "subtract",
]


# --------------------------------------------------------------------------- validation


def _check_2d(arr: Any, name: str, dtype: type) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(arr).__name__}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must have non-zero height and width, got shape {arr.shape}")
    if arr.dtype != dtype:
        want = np.dtype(dtype).name
        hint = " (use mask > 0)" if dtype is np.bool_ else " (0/255; use mask.astype(np.uint8) * 255)"
        raise ValueError(f"{name} must have dtype {want}{hint}, got {arr.dtype}")
    return arr


def _check_bool(mask: Any, name: str = "mask") -> np.ndarray:
    return _check_2d(mask, name, np.bool_)


def _check_u8(mask: Any, name: str = "mask") -> np.ndarray:
    return _check_2d(mask, name, np.uint8)


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"{name_b} shape {b.shape[:2]} does not match {name_a} shape {a.shape[:2]}")


def _nonneg_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _to_u8(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.uint8) * np.uint8(255)


# --------------------------------------------------------------------------- binary ops


def subtract(mask: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Remove the ``negative`` region from ``mask``.

    Args:
        mask: bool (H, W).
        negative: bool (H, W), same shape.

    Returns:
        bool (H, W): ``mask & ~negative``.
    """
    _check_bool(mask)
    _check_bool(negative, "negative")
    _check_same_shape(mask, negative, "mask", "negative")
    return mask & ~negative


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    # Pad with a one-pixel background frame so the whole border is reached from (0, 0).
    canvas = np.zeros((h + 2, w + 2), np.uint8)
    canvas[1:-1, 1:-1] = mask
    flood_mask = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(canvas, flood_mask, (0, 0), 2, flags=4)
    holes = canvas[1:-1, 1:-1] == 0  # background the border flood did not reach
    return mask | holes


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a binary mask.

    A hole is a background region not 4-connected to the image border. Foreground is never
    removed; the result has no enclosed background.

    Args:
        mask: bool (H, W).

    Returns:
        bool (H, W).
    """
    return _fill_holes(_check_bool(mask))


def disk(radius: int) -> np.ndarray:
    """Euclidean disk structuring element: uint8 (2r+1, 2r+1), 1 where ``dx² + dy² <= r²``."""
    radius = _nonneg_int(radius, "radius")
    yy, xx = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return (xx * xx + yy * yy <= radius * radius).astype(np.uint8)


def expand(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a binary mask by ``radius`` pixels with a Euclidean disk of size 2r+1.

    Exactly the pixels within Euclidean distance ``radius`` of a foreground pixel become
    foreground (pixels outside the image do not count). ``radius`` 0 is the identity.

    Args:
        mask: bool (H, W).
        radius: int >= 0.

    Returns:
        bool (H, W).
    """
    _check_bool(mask)
    radius = _nonneg_int(radius, "radius")
    if radius == 0 or not mask.any():
        return mask.copy()
    out = cv2.dilate(mask.astype(np.uint8), disk(radius), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return out.astype(bool)


# --------------------------------------------------------------------------- byte ops


def blur(mask: np.ndarray, ksize: int) -> np.ndarray:
    """Gaussian-blur a byte mask (soft edges).

    The kernel is ``ksize`` x ``ksize`` with OpenCV's default sigma for that size
    (``0.3 * ((ksize - 1) / 2 - 1) + 0.8``); the image border is reflected (BORDER_REFLECT_101).

    Args:
        mask: uint8 (H, W), usually 0/255.
        ksize: 0 (no-op, returns a copy) or an odd int >= 1.

    Returns:
        uint8 (H, W), values in 0..255.
    """
    _check_u8(mask)
    ksize = _nonneg_int(ksize, "ksize")
    if ksize == 0:
        return mask.copy()
    if ksize % 2 == 0:
        raise ValueError(f"ksize must be 0 (off) or odd, got {ksize}")
    return cv2.GaussianBlur(mask, (ksize, ksize), 0)


def revert(mask: np.ndarray) -> np.ndarray:
    """Invert a byte mask.

    Args:
        mask: uint8 (H, W).

    Returns:
        uint8 (H, W): ``255 - mask``.
    """
    _check_u8(mask)
    return np.uint8(255) - mask


def binarize(mask: np.ndarray) -> np.ndarray:
    """Threshold a (soft) byte mask: uint8 (H, W) -> bool (H, W), ``mask >= 128``."""
    _check_u8(mask)
    return mask >= 128


def postprocess(
    mask: np.ndarray,
    *,
    negative: np.ndarray | None = None,
    fill_holes: bool = False,
    expand_mask: int = 0,
    blur_mask: int = 0,
    revert_mask: bool = False,
) -> np.ndarray:
    """Apply the request options to a binary mask, in the module's documented order.

    subtract ``negative`` -> fill holes -> expand by ``expand_mask`` -> blur with kernel
    ``blur_mask`` -> revert.

    Args:
        mask: bool (H, W), the prompt's mask.
        negative: bool (H, W) mask of the negative prompt, or None.
        fill_holes: fill enclosed background.
        expand_mask: dilation radius in pixels (>= 0).
        blur_mask: Gaussian kernel size, 0 (off) or odd.
        revert_mask: invert the final mask.

    Returns:
        uint8 (H, W): 0/255 unless ``blur_mask`` > 1, then soft 0..255.
    """
    _check_bool(mask)
    expand_mask = _nonneg_int(expand_mask, "expand_mask")
    blur_mask = _nonneg_int(blur_mask, "blur_mask")
    if blur_mask % 2 == 0 and blur_mask != 0:
        raise ValueError(f"blur_mask must be 0 (off) or odd, got {blur_mask}")
    out = mask
    if negative is not None:
        out = subtract(out, negative)
    if fill_holes:
        out = _fill_holes(out)
    out = expand(out, expand_mask)
    result = blur(_to_u8(out), blur_mask)
    if revert_mask:
        result = revert(result)
    return result


# --------------------------------------------------------------------------- stats and encodings


class MaskStats(NamedTuple):
    """Summary of a binary mask. ``bbox`` is ``(x, y, w, h)`` in pixels (Python ints)."""

    area: int
    bbox: tuple[int, int, int, int]
    empty: bool


def mask_stats(mask: np.ndarray) -> MaskStats:
    """Area and tight bounding box of a binary mask.

    Args:
        mask: bool (H, W). For a soft byte mask use ``mask_stats(binarize(m))``.

    Returns:
        :class:`MaskStats`; an empty mask gives ``MaskStats(0, (0, 0, 0, 0), True)``.
    """
    _check_bool(mask)
    area = int(np.count_nonzero(mask))
    if area == 0:
        return MaskStats(0, (0, 0, 0, 0), True)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1 = int(rows[0]), int(rows[-1])
    x0, x1 = int(cols[0]), int(cols[-1])
    return MaskStats(area, (x0, y0, x1 - x0 + 1, y1 - y0 + 1), False)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a binary mask via ``pycocotools.mask.encode`` (JSON-serialisable).

    Args:
        mask: bool (H, W).

    Returns:
        ``{"size": [H, W], "counts": str}``.
    """
    _check_bool(mask)
    rle = coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def pycoco_rle(rle: Mapping[str, Any]) -> dict[str, Any]:
    """A COCO compressed RLE as :func:`encode_rle` and the metadata store it (``counts`` as str) in
    the form pycocotools' functions take (``counts`` as bytes)."""
    counts = rle["counts"]
    return {
        "size": [int(v) for v in rle["size"]],
        "counts": counts.encode() if isinstance(counts, str) else counts,
    }


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """A COCO compressed RLE decoded by ``pycocotools.mask.decode``: bool (H, W)."""
    return coco_mask.decode(pycoco_rle(rle)).astype(bool)


def compose_rgba(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Attach a byte mask as the alpha channel of an RGB image.

    Args:
        image: uint8 (H, W, 3) RGB.
        mask: uint8 (H, W), 0..255 (soft masks give partial transparency).

    Returns:
        uint8 (H, W, 4) RGBA.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"image must be a uint8 (H, W, 3) RGB array, got shape {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must have dtype uint8, got {image.dtype}")
    _check_u8(mask)
    _check_same_shape(image, mask, "image", "mask")
    return np.dstack([image, mask])
