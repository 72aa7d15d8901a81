"""Model settings: which checkpoint, on which device, in which dtype, by which path: defined once.

``evf segment``, ``evf run`` / ``evf eval`` (the job config's ``inference`` section inherits
:class:`ModelOptions`), the inference engine and a server read the same fields, with the same
defaults and the same allowed values. Importing this module loads neither torch nor a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import Field, field_validator

from evf.checkpoints import DEMO_MODEL_ID
from evf.config import StrictModel

__all__ = [
    "DEFAULT_BOX_THRESHOLD",
    "DEFAULT_TEXT_THRESHOLD",
    "DEVICE_RULE",
    "DTYPES",
    "MODES",
    "GroundingSettings",
    "ModelOptions",
    "ModelSettings",
    "resolve_device",
]

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Mode = Literal["multitask", "legacy"]
DTYPES: tuple[str, ...] = get_args(Dtype)
"""Compute dtypes; ``auto``: bfloat16 where the device runs it natively, else float32."""
MODES: tuple[str, ...] = get_args(Mode)
"""EVF-SAM2 inference paths (``evf.model.config.resolve_mode`` picks one when none is asked for)."""
DEVICE_RULE = "allowed: auto, cpu, cuda, cuda:N"
DEFAULT_BOX_THRESHOLD = 0.35
"""GroundingDINO keeps boxes scoring above this (its authors' default)."""
DEFAULT_TEXT_THRESHOLD = 0.25
"""A prompt token names a GroundingDINO box when its probability is above this."""


class ModelOptions(StrictModel):
    """How a loaded model runs, whatever the checkpoint."""

    device: str = Field(
        default="auto",
        description="'auto' (cuda where this process sees a GPU, else cpu), 'cpu', 'cuda' or 'cuda:N'.",
    )
    dtype: Dtype = Field(
        default="auto",
        description="Compute dtype. auto: bfloat16 where the device runs it natively (CPU with AMX or "
        "AVX-512-BF16, CUDA compute capability 8.0+), float32 elsewhere; logged at start-up.",
    )
    mode: Mode | None = Field(default=None, description="Inference path; null follows the checkpoint.")
    compile: bool = Field(
        default=False,
        description="torch.compile the encoders (CPU inductor or CUDA) at load, graphs cached on disk: "
        "worth it on GPUs for long jobs; on a small CPU the compile costs more than it saves.",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not (
            value.startswith("cuda:") and value.removeprefix("cuda:").isdigit()
        ):
            raise ValueError(f"device={value!r}: {DEVICE_RULE}")
        return value


class ModelSettings(ModelOptions):
    """A checkpoint and how to run it: what the engine loads (``evf.engine.InferenceEngine.load``)."""

    model: str = Field(
        default=DEMO_MODEL_ID,
        description="Checkpoint: a folder, an fsspec URI (s3://bucket/evf-sam2/), a Hub id "
        f"(YxZhang/evf-sam2-multitask) or {DEMO_MODEL_ID} (the shipped synthetic-shapes model).",
    )


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when this process sees a GPU (a Ray worker without a reserved GPU sees
    none), else ``cpu``; any other name unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class GroundingSettings:
    """GroundingDINO for ``use_grounding_dino`` requests: a checkpoint (None: such requests fail
    with ``evf.grounding.MISSING_DETECTOR``), its thresholds and the storage options of its URI."""

    model: str | None = None
    box_threshold: float = DEFAULT_BOX_THRESHOLD
    text_threshold: float = DEFAULT_TEXT_THRESHOLD
    storage_options: Mapping[str, Any] | None = None
