"""Drawing a mask over its image so that it shows on any image: the review page's thumbnails, the
README picture and the notebook all use this one style.

A magenta fill at 45 % alone vanishes on magenta, purple or red shapes, so the fill is outlined
too: a 3-pixel black contour under a 1-pixel white one, which shows on dark and light pixels alike.
"""

from __future__ import annotations

import cv2
import numpy as np

MASK_FILL_RGB = (255, 0, 200)
MASK_FILL_ALPHA = 0.45
MASK_OUTLINE_RGB = (255, 255, 255)


def outline(canvas: np.ndarray, mask: np.ndarray, rgb: tuple[int, int, int]) -> None:
    """Draw the contour of bool (H, W) ``mask`` on uint8 (H, W, 3) ``canvas`` in place: ``rgb``
    over black."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, (0, 0, 0), 3, lineType=cv2.LINE_8)
    cv2.drawContours(canvas, contours, -1, rgb, 1, lineType=cv2.LINE_8)


def paint_mask(canvas: np.ndarray, mask: np.ndarray) -> None:
    """Fill bool (H, W) ``mask`` on uint8 (H, W, 3) RGB ``canvas`` in place and outline it."""
    fill = np.array(MASK_FILL_RGB, np.float32)
    canvas[mask] = ((1 - MASK_FILL_ALPHA) * canvas[mask] + MASK_FILL_ALPHA * fill).astype(np.uint8)
    outline(canvas, mask, MASK_OUTLINE_RGB)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of uint8 (H, W, 3) RGB ``image`` with bool (H, W) ``mask`` painted over it."""
    canvas = np.ascontiguousarray(image[..., :3], dtype=np.uint8).copy()
    paint_mask(canvas, mask.astype(bool))
    return canvas
