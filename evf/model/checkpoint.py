"""Loading and saving EVF-SAM2 checkpoints in the official Hugging Face layout.

Finding a checkpoint folder (local, fsspec URI, Hub id, the demo model) and checking its weights
without loading them is :mod:`evf.checkpoints`, which imports neither torch nor the model; this
module builds the model and reads or writes its tensors.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from evf.checkpoints import CheckpointError, check_weights, shard_map, weights_source
from evf.model.config import EvfSam2Config
from evf.model.evf_sam2 import EvfSam2Model

# Upstream sam2 calls these layer-scale parameters ``gamma``; the authors renamed them ``weight``
# so that Hugging Face loading (which rewrites ``gamma``) keeps them.
_FUSER_SCALE = re.compile(r"^(visual_model\.memory_encoder\.fuser\.layers\.\d+)\.(weight|gamma)$")


def load_state_dict(folder: Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint folder, in their stored dtypes (the official file mixes F32 and F16).

    The weights are checked with :func:`check_weights` first.
    """
    check_weights(folder)
    kind, path = weights_source(folder)
    if kind == "safetensors":
        return load_file(path)
    if kind == "sharded":
        state: dict[str, Tensor] = {}
        for shard in sorted(set(shard_map(path, str(path)).values())):
            state.update(load_file(folder / shard))
        return state
    return torch.load(path, map_location="cpu", weights_only=True)


def _rename_fuser_scale(state: dict[str, Tensor], suffix: str) -> dict[str, Tensor]:
    return {_FUSER_SCALE.sub(rf"\1.{suffix}", k): v for k, v in state.items()}


def to_module_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint key names -> PyPI sam2 module names (the two ``fuser`` layer scales)."""
    return _rename_fuser_scale(state, "gamma")


def to_checkpoint_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Module names -> official checkpoint key names (inverse of ``to_module_keys``)."""
    return _rename_fuser_scale(state, "weight")


def load_model(folder: Path, device: torch.device | str = "cpu") -> EvfSam2Model:
    """Build the model that ``config.json`` describes and load its weights strictly (float32)."""
    config = EvfSam2Config.from_file(folder / "config.json")
    model = EvfSam2Model(config, device="cpu")
    state = to_module_keys(load_state_dict(folder))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{folder}: weights do not match config.json: {len(result.missing_keys)} missing "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]})"
        )
    model.refresh_image_pe()
    return model.eval().to(device)


def save_checkpoint(model: EvfSam2Model, folder: str | Path, tokenizer_dir: str | Path) -> Path:
    """Write ``model`` in the official layout: SAM 2 as F16, BEiT-3 and projector as F32.

    Tokenizer files are copied from ``tokenizer_dir``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: (
            v.half()
            if k.startswith("visual_model.") and v.is_floating_point()
            else v.float()
            if v.is_floating_point()
            else v
        )
        .contiguous()
        .cpu()
        for k, v in to_checkpoint_keys(model.state_dict()).items()
    }
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
    for file in (
        "sentencepiece.bpe.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    ):
        src = Path(tokenizer_dir) / file
        if src.exists() and src.resolve() != (folder / file).resolve():
            shutil.copyfile(src, folder / file)
    return folder
