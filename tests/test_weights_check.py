"""Weights are checked before anything loads them: truncated, corrupt or unsafe files fail at once with
a message naming the file; a pickle that needs code to load is refused and its payload never runs."""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import save_file

from evf import EvfSam2Predictor
from evf.checkpoints import CheckpointError, check_weights, resolve_checkpoint
from evf.model.checkpoint import load_state_dict

CHECKPOINT = Path(__file__).parent / "fixtures" / "evf-sam2-tiny" / "checkpoint"
WEIGHTS_SIZE = (CHECKPOINT / "model.safetensors").stat().st_size


def copy_checkpoint(folder: Path, weights: bool = True) -> Path:
    shutil.copytree(CHECKPOINT, folder)
    if not weights:
        (folder / "model.safetensors").unlink()
    return folder


def _tensors(header: dict) -> list[str]:
    """Tensor names of a safetensors header in data order."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def rewrite_header(path: Path, edit) -> None:
    """Apply ``edit`` to the JSON header of a safetensors file, keeping its data bytes."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])


def test_the_shipped_checkpoints_pass(tmp_path) -> None:
    check_weights(CHECKPOINT)
    resolve_checkpoint("evf-sam2-demo")  # checked on the way out


def test_a_truncated_safetensors_fails_naming_the_file_and_both_sizes(tmp_path) -> None:
    folder = copy_checkpoint(tmp_path / "ckpt")
    os.truncate(folder / "model.safetensors", 1_000_000)
    expected = f"{folder}/model.safetensors is truncated: header says {WEIGHTS_SIZE} bytes, file has 1000000"
    with pytest.raises(CheckpointError) as resolved:
        resolve_checkpoint(folder)
    assert str(resolved.value) == expected
    with pytest.raises(CheckpointError) as loaded:  # the load path runs the same check
        EvfSam2Predictor.from_pretrained(folder)
    assert str(loaded.value) == expected


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 5), f"header says {WEIGHTS_SIZE} bytes, file has"),
        (lambda p: p.write_bytes(b"<html><body>Not Found</body></html>"), "is not a safetensors file"),
        (lambda p: p.write_bytes(b"\x05\0\0\0\0\0\0\0"), "is truncated: its header alone is 13 bytes"),
        (lambda p: p.write_bytes(b"\x06\0\0\0\0\0\0\0{nope}"), "has a corrupt header"),
        (lambda p: p.write_bytes(b"abc"), "is truncated: 3 bytes"),
        (lambda p: rewrite_header(p, lambda h: h[_tensors(h)[0]].update(shape=[7])), "needs 28 bytes"),
        (lambda p: rewrite_header(p, lambda h: h.pop(_tensors(h)[0])), "expected 0"),
    ],
    ids=["trailing-bytes", "html", "short-header", "not-json", "three-bytes", "shape-vs-bytes", "gap"],
)
def test_corrupt_safetensors_fail_naming_the_file(tmp_path, damage, message: str) -> None:
    folder = copy_checkpoint(tmp_path / "ckpt")
    damage(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"^{folder}/model\.safetensors ") as info:
        check_weights(folder)
    assert message in str(info.value)


def write_shards(folder: Path) -> dict[str, torch.Tensor]:
    """Split the fixture's weights into two safetensors shards with an index, as the Hub does."""
    state = load_state_dict(CHECKPOINT)
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "model.safetensors").unlink()
    return state


def test_sharded_weights_are_checked_shard_by_shard(tmp_path) -> None:
    folder = copy_checkpoint(tmp_path / "ckpt")
    state = write_shards(folder)
    check_weights(folder)
    loaded = load_state_dict(folder)
    assert sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    shard = folder / "model-00002-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=rf"^{folder}/model-00002-of-00002\.safetensors is truncated"):
        check_weights(folder)
    shard.unlink()
    with pytest.raises(
        CheckpointError, match="names shard model-00002-of-00002.safetensors, which is missing"
    ):
        check_weights(folder)


def test_a_shard_index_cannot_point_outside_its_folder(tmp_path) -> None:
    folder = copy_checkpoint(tmp_path / "ckpt", weights=False)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../elsewhere.bin"}})
    )
    with pytest.raises(CheckpointError, match="outside its folder"):
        check_weights(folder)


class _Payload:
    """Pickles as a call that creates ``marker``: the code a malicious checkpoint would run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_pickle_that_needs_code_is_refused_and_never_runs(tmp_path, zip_format: bool) -> None:
    folder = copy_checkpoint(tmp_path / "ckpt", weights=False)
    marker = tmp_path / "payload-ran"
    state = {**load_state_dict(CHECKPOINT), "extra": _Payload(marker)}
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    for attempt in (resolve_checkpoint, load_state_dict, EvfSam2Predictor.from_pretrained):
        with pytest.raises(CheckpointError) as info:
            attempt(folder)
        message = str(info.value)
        assert message.startswith(f"{folder}/pytorch_model.bin is a pickle that needs code to load")
        assert "system" in message and "model.safetensors" in message  # what it calls, and the way out
    assert not marker.exists()
    # The same state without the payload is accepted.
    del state["extra"]
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    check_weights(folder)


def test_a_truncated_pickle_fails_naming_the_file(tmp_path) -> None:
    folder = copy_checkpoint(tmp_path / "ckpt", weights=False)
    torch.save(load_state_dict(CHECKPOINT), folder / "pytorch_model.bin")
    os.truncate(folder / "pytorch_model.bin", 500_000)
    with pytest.raises(CheckpointError, match=rf"^{folder}/pytorch_model\.bin is corrupt or truncated"):
        check_weights(folder)


def test_a_truncated_remote_file_never_enters_the_cache(tmp_path) -> None:
    root = f"/evf-test-{uuid.uuid4().hex[:8]}/ckpt"
    memory = fsspec.filesystem("memory")
    try:
        for file in CHECKPOINT.iterdir():
            data = file.read_bytes()
            memory.pipe_file(
                f"{root}/{file.name}", data[:1_000_000] if file.suffix == ".safetensors" else data
            )
        uri = f"memory://{root}"
        cache = tmp_path / "cache"
        with pytest.raises(CheckpointError) as info:
            resolve_checkpoint(uri, cache_dir=cache)
        assert str(info.value) == (
            f"{uri}/model.safetensors is truncated: header says {WEIGHTS_SIZE} bytes, file has 1000000"
        )
        assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
        memory.pipe_file(f"{root}/model.safetensors", (CHECKPOINT / "model.safetensors").read_bytes())
        folder = resolve_checkpoint(uri, cache_dir=cache)
        assert (folder / "model.safetensors").read_bytes() == (CHECKPOINT / "model.safetensors").read_bytes()
    finally:
        memory.rm(root.rsplit("/", 1)[0], recursive=True)
