"""evf-sam: text-prompted image segmentation with EVF-SAM2, from one image to datasets of millions.

Names are imported lazily (PEP 562), so that ``import evf``, ``evf.request`` and ``evf --help`` do
not pay for torch and sam2: the model is imported on first use of a name that needs it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

# exported name -> module defining it
_EXPORTS = {
    "EvfSam2Predictor": "evf.predictor",
    "Prediction": "evf.predictor",
    "Prompt": "evf.predictor",
    "InvalidRequestError": "evf.request",
    "SegmentRequest": "evf.request",
    "parse_request": "evf.request",
    "SegmentResult": "evf.segment",
    "segment": "evf.segment",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'evf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


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
