"""Finding checkpoint folders and checking their weights, without importing torch or the model.

A checkpoint is a folder of files that a :class:`CheckpointLayout` names (:data:`EVF_LAYOUT`, the
default: ``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``) and the tokenizer files
``sentencepiece.bpe.model``, ``tokenizer_config.json``, ``special_tokens_map.json``, optionally
``added_tokens.json``; other models pass their own layout). It can be named by:

- a local folder;
- any fsspec URI (``s3://bucket/evf-sam2/``, ``gs://...``): copied once into a local cache,
  guarded by a file lock so that many processes on one node can start together;
- a Hugging Face Hub id (``YxZhang/evf-sam2-multitask``) when online;
- ``evf-sam2-demo``: the small synthetic-scene model shipped inside this package.

Every folder handed out is first checked by :func:`check_weights` (headers and sizes only, no tensor
is loaded), so a truncated, corrupt or unsafe weights file fails at once with a message naming it.

This module is light on purpose (no torch, safetensors.torch, sam2 or hydra at import; torch is
imported only to check a ``pytorch_model.bin``), so that resolving a checkpoint, e.g. a detector's,
does not pay for the EVF model. Loading and saving EVF-SAM2 weights is :mod:`evf.model.checkpoint`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import pickle
import shutil
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evf.errors import UserError

__all__ = [
    "CHECKPOINT_FILES",
    "DEMO_MODEL_DIR",
    "DEMO_MODEL_ID",
    "DEMO_MODEL_WARNING",
    "EVF_LAYOUT",
    "CheckpointError",
    "CheckpointLayout",
    "check_weights",
    "default_cache_dir",
    "resolve_checkpoint",
    "shard_map",
    "weights_source",
]

DEMO_MODEL_ID = "evf-sam2-demo"
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "assets" / DEMO_MODEL_ID
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


# The default layout: EVF-SAM2's files, as plain data (loading the model is evf.model.checkpoint).
EVF_LAYOUT = CheckpointLayout(
    "EVF-SAM2",
    CHECKPOINT_FILES,
    (
        ("config.json",),
        ("sentencepiece.bpe.model",),
        ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
    ),
)
_COMPLETE = ".complete"  # marker of a finished copy in the model cache
_SAFETENSORS_MAX_HEADER = 100_000_000  # the format's own limit on the JSON header
# Bits per value of the safetensors dtypes (unknown future dtypes skip the per-tensor size check).
_SAFETENSORS_BITS = {
    **dict.fromkeys(("F64", "I64", "U64", "C64"), 64),
    **dict.fromkeys(("F32", "I32", "U32"), 32),
    **dict.fromkeys(("F16", "BF16", "I16", "U16"), 16),
    **dict.fromkeys(("I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0"), 8),
    **dict.fromkeys(("F6_E2M3", "F6_E3M2"), 6),
    "F4": 4,
}
_CONVERT_HINT = (
    "If you trust where it came from, convert it once to model.safetensors, e.g. "
    "safetensors.torch.save_file(torch.load(path, weights_only=False), 'model.safetensors'), "
    "and remove pytorch_model.bin"
)


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

    ``layout`` says which files to fetch and require (default: an EVF-SAM2 checkpoint). The weights
    are checked with :func:`check_weights` before the folder is returned.
    """
    folder = _locate_checkpoint(os.fspath(name), storage_options, cache_dir, layout)
    check_weights(folder)
    return folder


def _locate_checkpoint(
    text: str,
    storage_options: Mapping[str, Any] | None,
    cache_dir: str | Path | None,
    layout: CheckpointLayout,
) -> Path:
    if text == DEMO_MODEL_ID:
        if not (DEMO_MODEL_DIR / "config.json").exists():
            raise CheckpointError(f"the demo model is missing from this installation ({DEMO_MODEL_DIR})")
        return DEMO_MODEL_DIR
    local = Path(text.removeprefix("file://")).expanduser()
    if local.is_dir():
        require_files(local, text, layout)
        return local
    if "://" in text:
        cache = Path(cache_dir or default_cache_dir())
        return _fetch_to_cache(text, dict(storage_options or {}), cache, layout)
    if text.count("/") == 1 and not local.exists() and not text.startswith((".", "/")):
        return _fetch_from_hub(text, cache_dir, layout)
    raise CheckpointError(f"no checkpoint folder at {text!r}")


def require_files(folder: Path, name: str, layout: CheckpointLayout = EVF_LAYOUT) -> None:
    """Raise ``CheckpointError`` naming the files of ``layout`` that ``folder`` lacks."""
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


# --------------------------------------------------------------------------------------------------
# Checking weights files without loading them
# --------------------------------------------------------------------------------------------------


def weights_source(folder: Path) -> tuple[str, Path]:
    """The weights the loader reads, in its order of preference: (kind, path), kind one of
    ``"safetensors"``, ``"sharded"`` (an index of safetensors shards) or ``"pickle"``."""
    for kind, file in (
        ("safetensors", "model.safetensors"),
        ("sharded", "model.safetensors.index.json"),
        ("pickle", "pytorch_model.bin"),
    ):
        if (folder / file).is_file():
            return kind, folder / file
    raise CheckpointError(
        f"{folder}: no weights file (model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def check_weights(folder: str | Path, name: str | None = None) -> None:
    """Check the weights that :func:`evf.model.checkpoint.load_state_dict` would read, loading no tensor.

    - ``model.safetensors`` (and each shard named by ``model.safetensors.index.json``): the 8-byte
      header length, the JSON header, every tensor's byte range against its dtype and shape, and the
      size the header implies against the file's size. Only the header is read: milliseconds for a
      file of any size.
    - ``pytorch_model.bin``: refused when its pickle needs code outside torch's ``weights_only``
      allowlist to load (a static scan, then the weights-only unpickler on the meta device; nothing
      in the file is executed and no tensor data is read).

    ``name`` is how the folder appears in messages (e.g. the URI it was copied from; default: its
    path). Raises ``CheckpointError`` naming the file and what is wrong, e.g.
    ``.../model.safetensors is truncated: header says 1716228 bytes, file has 1000000``.
    """
    folder = Path(folder)
    shown = (name or str(folder)).rstrip("/")
    kind, path = weights_source(folder)
    if kind == "safetensors":
        _check_safetensors(path, f"{shown}/{path.name}")
    elif kind == "sharded":
        by_shard: dict[str, list[str]] = {}
        for tensor, shard in shard_map(path, f"{shown}/{path.name}").items():
            by_shard.setdefault(shard, []).append(tensor)
        for shard, tensors in sorted(by_shard.items()):
            if not (folder / shard).is_file():
                raise CheckpointError(f"{shown}/{path.name} names shard {shard}, which is missing")
            stored = _check_safetensors(folder / shard, f"{shown}/{shard}")
            absent = [tensor for tensor in tensors if tensor not in stored]
            if absent:
                raise CheckpointError(
                    f"{shown}/{shard} lacks {len(absent)} tensor(s) that {path.name} places there "
                    f"(e.g. {absent[:3]})"
                )
    else:
        _check_pickle(path, f"{shown}/{path.name}")


def shard_map(index: Path, shown: str) -> dict[str, str]:
    """``weight_map`` of a shard index (tensor name -> shard file name), shard names checked to be
    plain file names in the same folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{shown} is not a valid shard index ({_reason(error)})") from None
    names = {str(shard) for shard in weight_map.values()}
    outside = sorted(name for name in names if name in ("", ".", "..") or "/" in name or "\\" in name)
    if outside:
        raise CheckpointError(f"{shown} names shard files outside its folder: {outside[:3]}")
    return {str(tensor): str(shard) for tensor, shard in weight_map.items()}


def _check_safetensors(path: Path, shown: str) -> dict[str, Any]:
    """Check one safetensors file's header against its size; returns the header's tensor entries."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{shown} is truncated: {size} bytes, too short for a safetensors header")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > _SAFETENSORS_MAX_HEADER:
            raise CheckpointError(
                f"{shown} is not a safetensors file: its first 8 bytes give a header of {header_length} bytes"
            )
        if 8 + header_length > size:
            raise CheckpointError(
                f"{shown} is truncated: its header alone is {8 + header_length} bytes, file has {size}"
            )
        raw = file.read(header_length)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError(f"a JSON {type(header).__name__}, not an object")
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError included
        raise CheckpointError(f"{shown} has a corrupt header ({error})") from None
    tensors = {key: value for key, value in header.items() if key != "__metadata__"}
    expected = 8 + header_length + _data_length(tensors, shown)
    if size < expected:
        raise CheckpointError(f"{shown} is truncated: header says {expected} bytes, file has {size}")
    if size > expected:
        raise CheckpointError(
            f"{shown} is corrupt: header says {expected} bytes, file has {size} ({size - expected} too many)"
        )
    return tensors


def _data_length(tensors: dict[str, Any], shown: str) -> int:
    """Bytes of tensor data the header describes; each entry must fit its dtype and shape, and the
    entries must tile the data without gaps or overlaps (as the safetensors loader requires)."""
    spans: list[tuple[int, int, str]] = []
    for key, entry in tensors.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
            valid = all(type(n) is int and n >= 0 for n in (*shape, begin, end)) and begin <= end
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise CheckpointError(f"{shown} has a corrupt header: bad entry for {key!r}: {str(entry)[:200]}")
        bits = _SAFETENSORS_BITS.get(dtype)
        if bits is not None and math.prod(shape) * bits != (end - begin) * 8:
            raise CheckpointError(
                f"{shown} has a corrupt header: {key!r} ({dtype} {shape}) needs "
                f"{math.prod(shape) * bits / 8:g} bytes but spans {end - begin}"
            )
        spans.append((begin, end, key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise CheckpointError(
                f"{shown} has a corrupt header: {key!r} starts at data byte {begin}, expected {position}"
            )
        position = end
    return position


def _check_pickle(path: Path, shown: str) -> None:
    """Refuse a pickle that needs code to load; read the rest on the meta device (no tensor data)."""
    import torch  # only pickles need it: safetensors headers are plain JSON

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except ValueError:  # not torch's zip format (a legacy pickle): the weights-only unpickler decides
        unsafe = []
    except Exception as error:
        raise CheckpointError(f"{shown} is corrupt or truncated ({_reason(error)})") from None
    if unsafe:
        raise CheckpointError(
            f"{shown} is a pickle that needs code to load ({', '.join(sorted(unsafe)[:5])}); refused, "
            f"as loading it could run anything. {_CONVERT_HINT}"
        )
    try:
        state = torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{shown} is a pickle that needs code to load ({_reason(error)}); refused. {_CONVERT_HINT}"
        ) from None
    except Exception as error:
        raise CheckpointError(f"{shown} is corrupt or truncated ({_reason(error)})") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{shown} holds a {type(state).__name__}, not a dict of tensors")


def _reason(error: BaseException) -> str:
    """The informative line of a (often many-line) torch error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported" in line or "GLOBAL" in line:
            return line[:300]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _fetch_to_cache(
    uri: str, storage_options: dict[str, Any], cache_dir: Path, layout: CheckpointLayout = EVF_LAYOUT
) -> Path:
    """Copy the checkpoint at ``uri`` into ``cache_dir`` once; later calls reuse the copy.

    Files are downloaded into a staging folder, checked (:func:`check_weights`), marked complete and
    only then renamed into place, so a copy that fails (network, a full disk, a truncated remote file)
    never leaves a folder that a later run would trust. Staging folders left by a process that died
    mid-copy are removed by the next copy. Raises ``CheckpointError`` naming the URI and the cause.
    """
    key = uri.rstrip("/") if layout is EVF_LAYOUT else f"{layout.kind}:{uri.rstrip('/')}"
    target = cache_dir / hashlib.sha256(key.encode()).hexdigest()[:20]
    if (target / _COMPLETE).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process downloads; the others wait, then reuse
        if (target / _COMPLETE).is_file():
            return target
        for stale in cache_dir.glob(f".{target.name}-*"):  # only the lock holder stages: safe to remove
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{target.name}-"))
        try:
            _download(uri, storage_options, staging, layout)
            require_files(staging, uri, layout)
            check_weights(staging, name=uri)
            (staging / _COMPLETE).write_text(uri)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)  # the one step that makes the copy visible, marker included
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(error, OSError):
                raise CheckpointError(
                    f"could not copy {uri!r} into the model cache {cache_dir} ({_reason(error)})"
                ) from error
            raise
    return target


def _download(uri: str, storage_options: dict[str, Any], staging: Path, layout: CheckpointLayout) -> None:
    from evf.storage import open_filesystem

    fs, root = open_filesystem(uri, storage_options)
    root = root.rstrip("/")
    present = [file for file in layout.files if fs.exists(f"{root}/{file}")]
    if not present:
        raise CheckpointError(f"no checkpoint files found at {uri!r}")
    for file in present:
        fs.get(f"{root}/{file}", str(staging / file))
    index = staging / "model.safetensors.index.json"
    if index.exists():
        for shard in sorted(set(shard_map(index, f"{uri.rstrip('/')}/{index.name}").values())):
            fs.get(f"{root}/{shard}", str(staging / shard))


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
