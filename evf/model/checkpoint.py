"""Finding and loading EVF-SAM2 checkpoints in the official Hugging Face layout.

A checkpoint is a folder with ``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``)
and the tokenizer files (``sentencepiece.bpe.model``, ``tokenizer_config.json``,
``special_tokens_map.json``, optionally ``added_tokens.json``). It can be named by:

- a local folder;
- any fsspec URI (``s3://bucket/evf-sam2/``, ``gs://...``): copied once into a local cache,
  guarded by a file lock so that many processes on one node can start together;
- a Hugging Face Hub id (``YxZhang/evf-sam2-multitask``) when online;
- ``evf-sam2-demo``: the small synthetic-scene model shipped inside this package.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from evf.errors import UserError
from evf.model.config import EvfSam2Config
from evf.model.evf_sam2 import EvfSam2Model

DEMO_MODEL_ID = "evf-sam2-demo"
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / DEMO_MODEL_ID
DEMO_MODEL_WARNING = (
    f"the model is {DEMO_MODEL_ID}, the small demo model shipped for trying the pipeline: it was "
    "trained on synthetic coloured shapes and its masks on real photos are meaningless. For real images "
    "use a real checkpoint: a Hub id (YxZhang/evf-sam2-multitask), a local folder, or an object-store "
    "URI (s3://bucket/evf-sam2-multitask/)."
)
CHECKPOINT_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "sentencepiece.bpe.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
# Upstream sam2 calls these layer-scale parameters ``gamma``; the authors renamed them ``weight``
# so that Hugging Face loading (which rewrites ``gamma``) keeps them.


@dataclass(frozen=True)
class CheckpointLayout:
    """Which files make a checkpoint folder of some kind (so other models reuse the resolver).

    files: fetched from an fsspec URI / the Hub when present (plus shards named by an index).
    required: groups of file names; each group needs at least one file present.
    option: the command-line option that names such a checkpoint (for error messages).
    """

    kind: str
    files: tuple[str, ...]
    required: tuple[tuple[str, ...], ...]
    option: str = "--model"


EVF_LAYOUT = CheckpointLayout(
    "EVF-SAM2",
    CHECKPOINT_FILES,
    (
        ("config.json",),
        ("sentencepiece.bpe.model",),
        ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
    ),
)
_FUSER_SCALE = re.compile(r"^(visual_model\.memory_encoder\.fuser\.layers\.\d+)\.(weight|gamma)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be found, fetched or loaded; the message says what to do."""


def default_cache_dir() -> Path:
    root = (
        os.environ.get("EVF_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "evf-sam"
    )
    return Path(root) / "checkpoints"


def resolve_checkpoint(
    name: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    *,
    layout: CheckpointLayout = EVF_LAYOUT,
) -> Path:
    """Return a local folder holding the checkpoint ``name`` (see the module docstring).

    ``layout`` says which files to fetch and require (default: an EVF-SAM2 checkpoint).
    """
    text = os.fspath(name)
    if text == DEMO_MODEL_ID and layout is EVF_LAYOUT:
        if not (DEMO_MODEL_DIR / "config.json").exists():
            raise CheckpointError(f"the demo model is missing from this installation ({DEMO_MODEL_DIR})")
        return DEMO_MODEL_DIR
    local = Path(text.removeprefix("file://")).expanduser()
    if local.is_dir():
        _require_files(local, text, layout)
        return local
    if "://" in text:
        cache = Path(cache_dir or default_cache_dir())
        return _fetch_to_cache(text, dict(storage_options or {}), cache, layout)
    if text.count("/") == 1 and not local.exists() and not text.startswith((".", "/")):
        return _fetch_from_hub(text, cache_dir, layout)
    raise CheckpointError(f"no checkpoint folder at {text!r}")


def _require_files(folder: Path, name: str, layout: CheckpointLayout = EVF_LAYOUT) -> None:
    missing = [
        group[0] + (f" (or {', '.join(group[1:])})" if len(group) > 1 else "")
        for group in layout.required
        if not any((folder / f).exists() for f in group)
    ]
    if missing:
        raise CheckpointError(
            f"{name!r} is not {'an' if layout.kind[:1] in 'AEIOU' else 'a'} {layout.kind} checkpoint "
            f"folder: missing {', '.join(missing)}"
        )


def _fetch_to_cache(
    uri: str, storage_options: dict[str, Any], cache_dir: Path, layout: CheckpointLayout = EVF_LAYOUT
) -> Path:
    from evf.storage import storage_options_for  # local import: io pulls in Pillow, not needed otherwise

    key = uri.rstrip("/") if layout is EVF_LAYOUT else f"{layout.kind}:{uri.rstrip('/')}"
    target = cache_dir / hashlib.sha256(key.encode()).hexdigest()[:20]
    done = target / ".complete"
    if done.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process downloads; the others wait, then reuse
        if done.exists():
            return target
        fs, root = fsspec.core.url_to_fs(uri, **storage_options_for(uri, storage_options))
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{target.name}-"))
        try:
            fetched = 0
            for file in layout.files:
                remote = f"{root.rstrip('/')}/{file}"
                if fs.exists(remote):
                    fs.get(remote, str(staging / file))
                    fetched += 1
            index = staging / "model.safetensors.index.json"
            if index.exists():
                for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                    fs.get(f"{root.rstrip('/')}/{shard}", str(staging / shard))
            if fetched == 0:
                raise CheckpointError(f"no checkpoint files found at {uri!r}")
            _require_files(staging, uri, layout)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
            done.write_text(uri)
        except Exception:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _fetch_from_hub(
    repo_id: str, cache_dir: str | Path | None, layout: CheckpointLayout = EVF_LAYOUT
) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id, allow_patterns=list(layout.files) + ["*.safetensors"], cache_dir=cache_dir
        )
    except Exception as err:  # offline, unknown repo, auth: all end in the same advice
        raise CheckpointError(
            f"could not get {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Without Hub access, download it elsewhere "
            f"(`huggingface-cli download {repo_id} --local-dir DIR`) and pass the folder "
            f"({layout.option} DIR) or a copy in your object store ({layout.option} s3://bucket/...)."
        ) from err
    return Path(path)


def load_state_dict(folder: Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint folder, in their stored dtypes (the official file mixes F32 and F16)."""
    if (folder / "model.safetensors").exists():
        return load_file(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        state: dict[str, Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(folder / shard))
        return state
    return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)


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
