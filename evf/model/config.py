"""The checkpoint's ``config.json``: official scale names plus the ``beit3``/``sam2`` size objects.

The official EVF-SAM2 checkpoints name their sizes (``mm_extractor_scale: "large"``,
``sam_scale: "large"``). Other sizes (the test fixtures, the shipped demo model) set the scale to
``"custom"`` and describe the sizes in two extension objects, ``beit3`` and ``sam2``, which win
over the scale names whenever they are present.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evf.settings import MODES


def resolve_mode(requested: str | None, config_mode: str | None, supports_semantic: bool) -> str:
    """The inference mode: ``requested`` if given, else the checkpoint's ``inference_mode``, else
    multitask for tokenizers with ``[semantic]`` (the ``-multitask`` checkpoints), legacy otherwise."""
    mode = requested or config_mode or ("multitask" if supports_semantic else "legacy")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)} or None (from the checkpoint)")
    return mode


@dataclass(frozen=True)
class Beit3Config:
    """Sizes of a torchscale-0.2.0 BEiT-3 multiway encoder (everything else is fixed, see beit3.py)."""

    embed_dim: int
    layers: int
    attention_heads: int
    ffn_embed_dim: int
    vocab_size: int = 64010
    img_size: int = 224
    patch_size: int = 16
    max_source_positions: int = 1024

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def max_text_tokens(self) -> int:
        """Longest id sequence (with <s> and </s>): text positions start at index 2 of the table."""
        return self.max_source_positions - 2


BEIT3_SCALES: dict[str, Beit3Config] = {
    "large": Beit3Config(embed_dim=1024, layers=24, attention_heads=16, ffn_embed_dim=4096),
    "base": Beit3Config(embed_dim=768, layers=12, attention_heads=12, ffn_embed_dim=3072),
}


@dataclass(frozen=True)
class Sam2Config:
    """A SAM 2 build recipe for ``sam2.build_sam.build_sam2``: a packaged config plus Hydra overrides."""

    config: str
    overrides: tuple[str, ...] = ()


SAM2_SCALES: dict[str, Sam2Config] = {
    "large": Sam2Config("configs/sam2/sam2_hiera_l.yaml"),
    "base_plus": Sam2Config("configs/sam2/sam2_hiera_b+.yaml"),
    "small": Sam2Config("configs/sam2/sam2_hiera_s.yaml"),
    "tiny": Sam2Config("configs/sam2/sam2_hiera_t.yaml"),
}


@dataclass(frozen=True)
class EvfSam2Config:
    """Everything needed to build an EVF-SAM2 model of any size.

    ``raw`` keeps the original JSON so that a checkpoint saved by us round-trips every field,
    including ones we do not interpret (``transformers_version``, ...).
    """

    beit3: Beit3Config
    sam2: Sam2Config
    hidden_size: int
    out_dim: int
    inference_mode: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvfSam2Config:
        beit3 = _beit3_from(data)
        sam2 = _sam2_from(data)
        hidden = int(data.get("hidden_size", beit3.embed_dim))
        if hidden != beit3.embed_dim:
            raise ValueError(
                f"config.json: hidden_size={hidden} but the BEiT-3 embed_dim is {beit3.embed_dim}"
            )
        mode = data.get("inference_mode")
        if mode is not None and mode not in MODES:
            raise ValueError(f"config.json: inference_mode={mode!r}; allowed: {', '.join(MODES)}")
        return cls(beit3, sam2, hidden, int(data.get("out_dim", 256)), mode, dict(data))

    @classmethod
    def from_file(cls, path: str | Path) -> EvfSam2Config:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @property
    def sam_image_size(self) -> int:
        """SAM 2's square input size S, read from its Hydra config (no model is built)."""
        import sam2  # noqa: F401  (initialises Hydra's config module, as build_sam2 needs)
        from hydra import compose

        return int(
            compose(config_name=self.sam2.config, overrides=list(self.sam2.overrides)).model.image_size
        )

    def to_dict(self) -> dict[str, Any]:
        """The official fields plus the extension objects (always written, so any size reloads)."""
        data = {
            "architectures": ["EvfSam2Model"],
            "model_type": "evf",
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
            "tie_word_embeddings": False,
            **self.raw,
            "hidden_size": self.hidden_size,
            "out_dim": self.out_dim,
            "mm_extractor_scale": _scale_name(BEIT3_SCALES, self.beit3),
            "sam_scale": _scale_name(SAM2_SCALES, self.sam2),
            "beit3": asdict(self.beit3),
            "sam2": {"config": self.sam2.config, "overrides": list(self.sam2.overrides)},
        }
        if self.inference_mode is not None:
            data["inference_mode"] = self.inference_mode
        return data


def _scale_name(table: dict[str, Any], value: Any) -> str:
    return next((name for name, known in table.items() if known == value), "custom")


def _beit3_from(data: dict[str, Any]) -> Beit3Config:
    if "beit3" in data:
        return Beit3Config(**data["beit3"])
    scale = data.get("mm_extractor_scale", "large")
    if scale not in BEIT3_SCALES:
        raise ValueError(
            f"config.json: mm_extractor_scale={scale!r} needs a 'beit3' size object; "
            f"known scales: {', '.join(BEIT3_SCALES)}"
        )
    return BEIT3_SCALES[scale]


def _sam2_from(data: dict[str, Any]) -> Sam2Config:
    if "sam2" in data:
        return Sam2Config(data["sam2"]["config"], tuple(data["sam2"].get("overrides", ())))
    scale = data.get("sam_scale", "large")
    if scale not in SAM2_SCALES:
        raise ValueError(
            f"config.json: sam_scale={scale!r} needs a 'sam2' object; known scales: {', '.join(SAM2_SCALES)}"
        )
    return SAM2_SCALES[scale]
