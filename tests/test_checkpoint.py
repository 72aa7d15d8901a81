"""Loading checkpoints: folders, fsspec URIs through the local cache, .bin weights, the Hub offline,
saving in the official layout, and half precision."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from evf import EvfSam2Predictor
from evf.checkpoints import CheckpointError, resolve_checkpoint
from evf.model.checkpoint import load_state_dict, save_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "evf-sam2-tiny"
CHECKPOINT = FIXTURE / "checkpoint"
PROMPT = "the red car on the left"


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.asarray(Image.open(FIXTURE / "images" / "shapes_320x240.png").convert("RGB"))


@pytest.fixture(scope="module")
def reference(image: np.ndarray) -> np.ndarray:
    return EvfSam2Predictor.from_pretrained(CHECKPOINT).predict(image, PROMPT).mask_logits


def upload_checkpoint(s3_bucket: tuple[str, dict]) -> tuple[str, dict]:
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    for file in CHECKPOINT.iterdir():
        fs.put(str(file), f"{bucket}/models/evf-tiny/{file.name}")
    return f"s3://{bucket}/models/evf-tiny/", options


def test_fsspec_uri_is_cached_once_and_predicts_the_same(s3_bucket, tmp_path, image, reference) -> None:
    uri, options = upload_checkpoint(s3_bucket)
    predictor = EvfSam2Predictor.from_pretrained(uri, storage_options=options, cache_dir=tmp_path)
    np.testing.assert_array_equal(predictor.predict(image, PROMPT).mask_logits, reference)
    cached = resolve_checkpoint(uri, options, tmp_path)
    assert cached.parent == tmp_path and (cached / ".complete").exists()
    assert sorted(p.name for p in cached.iterdir() if p.name != ".complete") == sorted(
        p.name for p in CHECKPOINT.iterdir()
    )
    # A second resolve is served from the cache without touching the store.
    assert resolve_checkpoint(uri, {"key": "wrong", "secret": "wrong"}, tmp_path) == cached


def test_concurrent_processes_share_one_download(s3_bucket, s3_server, tmp_path) -> None:
    uri, _ = upload_checkpoint(s3_bucket)
    env = {**os.environ, **s3_server.env}
    code = (
        "import sys; from evf.checkpoints import resolve_checkpoint; "
        "print(resolve_checkpoint(sys.argv[1], None, sys.argv[2]))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outputs) == 1
    entries = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(entries) == 1, f"staging folders left behind: {entries}"


def test_pytorch_model_bin_loads(tmp_path, image, reference) -> None:
    for file in CHECKPOINT.iterdir():
        if file.name != "model.safetensors":
            shutil.copy(file, tmp_path / file.name)
    torch.save(load_state_dict(CHECKPOINT), tmp_path / "pytorch_model.bin")
    predictor = EvfSam2Predictor.from_pretrained(tmp_path)
    np.testing.assert_array_equal(predictor.predict(image, PROMPT).mask_logits, reference)


def test_hub_id_offline_says_how_to_pass_a_folder_or_uri(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint("YxZhang/evf-sam2-multitask", cache_dir=tmp_path)
    message = str(info.value)
    assert "YxZhang/evf-sam2-multitask" in message and "--model DIR" in message and "s3://" in message


def test_folder_without_weights_is_named_in_the_error(tmp_path) -> None:
    shutil.copy(CHECKPOINT / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        resolve_checkpoint(tmp_path)


def test_save_writes_the_official_layout(tmp_path, image, reference) -> None:
    predictor = EvfSam2Predictor.from_pretrained(CHECKPOINT)
    out = save_checkpoint(predictor.model, tmp_path / "saved", CHECKPOINT)
    with (
        safe_open(CHECKPOINT / "model.safetensors", "pt") as original,
        safe_open(out / "model.safetensors", "pt") as saved,
    ):
        assert sorted(saved.keys()) == sorted(original.keys())
        for key in original.keys():  # noqa: SIM118 - safe_open is not a dict
            assert saved.get_slice(key).get_dtype() == original.get_slice(key).get_dtype(), key
            torch.testing.assert_close(saved.get_tensor(key), original.get_tensor(key), rtol=0, atol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["beit3"] == json.loads((CHECKPOINT / "config.json").read_text())["beit3"]
    reloaded = EvfSam2Predictor.from_pretrained(out)
    np.testing.assert_array_equal(reloaded.predict(image, PROMPT).mask_logits, reference)


@pytest.mark.parametrize(("dtype", "autocast"), [(torch.bfloat16, True), (torch.float16, False)])
def test_half_precision_runs_and_stays_close(dtype, autocast, image, reference) -> None:
    """bf16 under autocast, and pure fp16 (whose dense positional encoding PyPI sam2 cannot build)."""
    predictor = EvfSam2Predictor.from_pretrained(CHECKPOINT, dtype=dtype, autocast=autocast)
    result = predictor.predict(image, PROMPT)
    assert result.mask_logits.dtype == np.float32
    assert (result.mask == (reference > 0)).mean() > 0.98
