"""The two input transforms of EVF-SAM2, exactly as the authors' inference code.

Both take an HxWx3 uint8 RGB numpy array and ignore the aspect ratio (plain stretches).

- SAM 2 (``multitask`` mode, the authors' current ``inference.py``): PyTorch's native CPU
  **uint8** bilinear resize to SxS (``align_corners=False``), then ImageNet mean/std in 0..255.
  The uint8 kernel rounds intermediates; any other resize differs by +-1 on ~20% of pixels.
- SAM 2 (``legacy`` mode, the code tied to the non-multitask checkpoints): Pillow bilinear
  resize so the longest side is S, then a float bilinear stretch to SxS.
- BEiT-3: /255, float bicubic resize to sxs with antialiasing off and no clamp, then (x-0.5)/0.5.

The CPU part (``prepare_*``) returns compact tensors; ``normalize_sam`` finishes on the device,
so a batch crosses to the accelerator as uint8.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got dtype {image.dtype} shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image has no pixels: shape {image.shape}")


def _chw(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 numpy -> (3, H, W) uint8 tensor (a copy when the array is read-only)."""
    _check_image(image)
    array = image if image.flags.writeable else image.copy()
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def prepare_sam_multitask(image: np.ndarray, size: int) -> Tensor:
    """(H, W, 3) uint8 -> (3, size, size) uint8: the authors' uint8 bilinear stretch."""
    return F.interpolate(_chw(image)[None], (size, size), mode="bilinear", align_corners=False)[0]


def prepare_sam_legacy(image: np.ndarray, size: int) -> Tensor:
    """(H, W, 3) uint8 -> (3, h', w') uint8 with max(h', w') = size (Pillow bilinear, as ResizeLongestSide).

    The stretch to size x size happens in ``normalize_sam`` on float data.
    """
    _check_image(image)
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    return torch.from_numpy(resized.copy()).permute(2, 0, 1)


def normalize_sam(pixels: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """(3, h, w) uint8 on any device -> (3, size, size) normalised float SAM 2 input.

    Legacy inputs (h, w != size) are normalised first and then stretched in float, as the
    authors' legacy code did.
    """
    mean = torch.tensor(SAM_PIXEL_MEAN, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, device=pixels.device).view(3, 1, 1)
    x = (pixels.float() - mean) / std
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x[None], (size, size), mode="bilinear", align_corners=False)[0]
    return x.to(dtype)


def prepare_beit3(image: np.ndarray, size: int) -> Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float32 BEiT-3 input in about [-1, 1]."""
    x = _chw(image).float().div_(255.0)
    x = F.interpolate(x[None], (size, size), mode="bicubic", align_corners=False, antialias=False)[0]
    return (x - 0.5) / 0.5


@dataclass
class PreparedImage:
    """CPU-side model inputs of one image.

    sam_pixels: (3, h, w) uint8; (S, S) in multitask mode, longest side S in legacy mode.
    beit3_pixels: (3, s, s) float32.
    size: original (H, W).
    """

    sam_pixels: Tensor
    beit3_pixels: Tensor
    size: tuple[int, int]

    def arrays(self) -> dict[str, np.ndarray]:
        """The inputs as named numpy arrays (``evf.registry.PreparedInputs``)."""
        return {"sam": self.sam_pixels.numpy(), "beit3": self.beit3_pixels.numpy()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], size: tuple[int, int]) -> PreparedImage:
        """Rebuild from ``arrays()`` (the arrays may be read-only views: they are copied)."""
        sam, beit3 = (torch.from_numpy(np.array(arrays[name])) for name in ("sam", "beit3"))
        return cls(sam, beit3, size)


@dataclass(frozen=True)
class Preprocessor:
    """The CPU preprocessing of one inference mode: the one place that maps a mode to its transforms.

    Small and picklable, so a job's CPU workers prepare images exactly as the predictor would
    without loading the model. ``mode``: ``"multitask"`` or ``"legacy"``; ``sam_size`` S and
    ``beit3_size`` s are the two encoders' square input sizes.
    """

    mode: str
    sam_size: int
    beit3_size: int

    def prepare_sam(self, image: np.ndarray) -> Tensor:
        """(H, W, 3) uint8 -> the SAM 2 pixels of this mode (see ``PreparedImage.sam_pixels``)."""
        if self.mode == "multitask":
            return prepare_sam_multitask(image, self.sam_size)
        return prepare_sam_legacy(image, self.sam_size)

    def __call__(self, image: np.ndarray) -> PreparedImage:
        """(H, W, 3) uint8 RGB -> both encoders' inputs and the original size."""
        return PreparedImage(
            self.prepare_sam(image),
            prepare_beit3(image, self.beit3_size),
            (int(image.shape[0]), int(image.shape[1])),
        )
