"""Model families: the seam through which a kind of model enters every entrance at once.

A family (EVF-SAM2 is the first, ``evf.families.evf_sam2``) is a :class:`ModelFamily` subclass
registered with :func:`register_family`, as timm's ``register_model`` or segment-anything's
``sam_model_registry``. A checkpoint names its family in ``config.json`` (``architectures``, else
``model_type``); :func:`describe_checkpoint` finds it and reads what the CPU side needs without the
weights, and ``CheckpointInfo.load`` loads it for ``evf.engine.InferenceEngine``. Nothing outside a
family's own module names that family's inputs.

A family declares:

- ``prepare``: its CPU preprocessing, a small picklable callable (HxWx3 uint8 RGB -> prepared
  inputs) that a job's decode workers run without the model (``FamilyInfo.preprocessor``);
- how the prepared inputs travel between processes (:class:`PreparedInputs`: named arrays + the
  original size, rebuilt by ``prepared_from_arrays``);
- its prompt kinds (:data:`PROMPT_KINDS`): a request that needs a kind the family lacks is an
  error of that request, not of the batch;
- ``infer``: requests about prepared images -> one ``evf.result.RawMasks`` each.

Importing this module (and a family's module) loads no torch: a family imports it in ``load``.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np

from evf.checkpoints import (
    DEMO_MODEL_ID,
    CheckpointError,
    CheckpointLayout,
    require_files,
    resolve_checkpoint,
)
from evf.request import SegmentRequest
from evf.result import RawMasks
from evf.settings import ModelOptions

__all__ = [
    "PROMPT_KINDS",
    "CheckpointInfo",
    "FamilyInfo",
    "ModelFamily",
    "PreparedInputs",
    "describe_checkpoint",
    "families",
    "family_of",
    "register_family",
]

PROMPT_KINDS = ("text", "boxes")
"""``text``: a prompt (and negative prompt) in words; ``boxes``: box prompts from GroundingDINO
(``use_grounding_dino`` requests)."""

# Families shipped with the library: imported (cheaply: no torch) the first time a family is looked up.
_BUILTIN_MODULES = ("evf.families.evf_sam2",)
_FAMILIES: dict[str, type[ModelFamily]] = {}

# (index into the batch's images, request): what ``ModelFamily.infer`` answers.
Item = tuple[int, SegmentRequest]


class PreparedInputs(Protocol):
    """A family's CPU-prepared inputs of one image. ``size``: the original (H, W)."""

    size: tuple[int, int]

    def arrays(self) -> dict[str, np.ndarray]:
        """The inputs as named arrays (what crosses between processes)."""
        ...


@dataclass(frozen=True)
class FamilyInfo:
    """What the CPU side needs to know of a checkpoint, read without its weights.

    preprocessor: picklable; HxWx3 uint8 RGB -> ``PreparedInputs``.
    facts: the preprocessing facts worth recording with a job (JSON-ready).
    """

    preprocessor: Any
    supports_semantic: bool = False
    facts: Mapping[str, Any] = field(default_factory=dict)


class ModelFamily(ABC):
    """One kind of model. Subclasses set the class attributes and implement the four methods."""

    name: ClassVar[str]
    """Short name, e.g. ``"evf-sam2"`` (in messages and job records)."""
    architectures: ClassVar[tuple[str, ...]]
    """``config.json`` ``architectures`` (or ``model_type``) values that select this family."""
    layout: ClassVar[CheckpointLayout]
    """The files that make a checkpoint of this family."""
    prompt_kinds: ClassVar[frozenset[str]]
    """The :data:`PROMPT_KINDS` it answers."""

    @classmethod
    @abstractmethod
    def describe(cls, folder: Path, options: ModelOptions) -> FamilyInfo:
        """The CPU facts of the checkpoint in ``folder`` (no weights read)."""

    @classmethod
    @abstractmethod
    def load(cls, folder: Path, options: ModelOptions, model_id: str) -> Any:
        """The loaded model on ``options.device`` (already resolved from ``auto``). It has a
        ``preprocessor`` attribute: the same callable ``describe`` gives CPU workers."""

    @classmethod
    @abstractmethod
    def prepared_from_arrays(cls, arrays: Mapping[str, np.ndarray], size: tuple[int, int]) -> PreparedInputs:
        """Rebuild prepared inputs from ``PreparedInputs.arrays()`` and the original (H, W)."""

    @classmethod
    @abstractmethod
    def infer(
        cls,
        model: Any,
        images: Sequence[PreparedInputs],
        items: Sequence[Item],
        grounding: Any = None,
    ) -> list[RawMasks]:
        """One ``RawMasks`` per item, in order; any exception fails the whole call (the engine
        isolates). ``grounding``: ``evf.engine.Grounding`` (detector and the original images) when
        some item has ``use_grounding_dino``, else None."""

    @classmethod
    def owns(cls, model: Any) -> bool:
        """Whether ``model`` is a model this family's ``load`` gives (``InferenceEngine.wrap``)."""
        return False

    @classmethod
    def unsupported(cls, request: SegmentRequest) -> str | None:
        """Why this family cannot answer ``request`` (a prompt kind it lacks), or None."""
        if request.use_grounding_dino and "boxes" not in cls.prompt_kinds:
            return (
                f"use_grounding_dino=true: the {cls.name} model family takes no box prompts "
                f"(prompt kinds: {', '.join(sorted(cls.prompt_kinds))})"
            )
        return None


Family = TypeVar("Family", bound=type[ModelFamily])


def register_family(family: Family) -> Family:
    """Class decorator: make ``family`` the one for its ``architectures`` (a later registration of
    the same name replaces the earlier, so a test or plug-in can override a built-in)."""
    for name in family.architectures:
        _FAMILIES[name] = family
    return family


def families() -> dict[str, type[ModelFamily]]:
    """Architecture name -> family, built-in families included."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return dict(_FAMILIES)


def family_of(folder: Path) -> type[ModelFamily]:
    """The family of the checkpoint in ``folder``, from its ``config.json``."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}/config.json: cannot read it ({error})") from None
    names = [*(config.get("architectures") or []), config.get("model_type")]
    known = families()
    for name in names:
        if name in known:
            return known[name]
    raise CheckpointError(
        f"{folder}/config.json names no known model family (architectures="
        f"{config.get('architectures')!r}, model_type={config.get('model_type')!r}); "
        f"known: {', '.join(sorted(known))} (evf.registry.register_family adds one)"
    )


def _resolve(model_id: str, storage_options: Mapping[str, Any] | None, cache_dir: Any) -> tuple[Path, Any]:
    """The local folder of ``model_id`` (fetching every file any family names) and its family."""
    files = dict.fromkeys(name for family in set(families().values()) for name in family.layout.files)
    anything = CheckpointLayout("model", tuple(files), (("config.json",),))
    folder = resolve_checkpoint(model_id, storage_options, cache_dir, layout=anything)
    family = family_of(folder)
    require_files(folder, model_id, family.layout)
    return folder, family


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint as the CPU side knows it: its family (a class, pickled by reference) and what
    ``FamilyInfo`` says. ``options``: the settings it was described with (mode and so on)."""

    model_id: str
    family: type[ModelFamily]
    info: FamilyInfo
    options: ModelOptions

    @property
    def preprocessor(self) -> Any:
        return self.info.preprocessor

    @property
    def supports_semantic(self) -> bool:
        return self.info.supports_semantic

    @property
    def is_demo_model(self) -> bool:
        return self.model_id == DEMO_MODEL_ID

    def facts(self) -> dict[str, Any]:
        """What a job records of its model."""
        return {"model_id": self.model_id, "family": self.family.name, **self.info.facts}

    def load(
        self,
        options: ModelOptions | None = None,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: Any = None,
    ) -> Any:
        """The loaded model (``ModelFamily.load``) with ``options`` (default: those it was described
        with; the device must be resolved). Works where the family was never registered (a Ray
        worker): the family travels with this object."""
        layout = self.family.layout
        folder = resolve_checkpoint(self.model_id, storage_options, cache_dir, layout=layout)
        return self.family.load(folder, options or self.options, self.model_id)


def describe_checkpoint(
    model_id: str | Path = DEMO_MODEL_ID,
    options: ModelOptions | None = None,
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: Any = None,
) -> CheckpointInfo:
    """Find the checkpoint, check its files and weights' headers, and describe it (no weights read).
    Raises ``CheckpointError`` for a missing, corrupt, unsafe or unknown checkpoint."""
    options = options or ModelOptions()
    folder, family = _resolve(str(model_id), storage_options, cache_dir)
    return CheckpointInfo(str(model_id), family, family.describe(folder, options), options)
