"""evf-sam: text-prompted image segmentation with EVF-SAM2, from one image to datasets of millions.

Names are imported lazily (PEP 562), so that ``import evf``, ``evf.request`` and ``evf --help`` do
not pay for torch and sam2: the model is imported on first use of a name that needs it.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from evf.lazy import lazy_exports

# exported name -> module defining it
_EXPORTS = {
    "EvfSam2Predictor": "evf.predictor",
    "Prediction": "evf.predictor",
    "Prompt": "evf.predictor",
    "InvalidRequestError": "evf.request",
    "SegmentRequest": "evf.request",
    "parse_request": "evf.request",
    "SegmentResult": "evf.result",
    "segment": "evf.segment",
    "InferenceEngine": "evf.engine",
    "ModelSettings": "evf.settings",
    "ModelFamily": "evf.registry",
    "register_family": "evf.registry",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """``evf`` itself: importing the submodule ``evf.segment`` binds it as the package attribute
    ``segment``, over the function of that name; this keeps the function there (as the eager
    ``from evf.segment import segment`` of this package did), the module staying in sys.modules."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (
            isinstance(value, types.ModuleType)
            and value.__name__ == _EXPORTS.get(name) == f"{__name__}.{name}"
        ):
            value = getattr(value, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
