"""Shared test fixtures: a local S3 (moto) server, per-test buckets, real image files of odd kinds,
one local Ray for the whole session, and a tiny random-weights GroundingDINO checkpoint.

Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

S3_KEY = "testing"
S3_SECRET = "testing"
S3_REGION = "us-east-1"

# AWS variables that could point tests at real credentials or endpoints; cleared while the server runs.
_AWS_VARIABLES_TO_CLEAR = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


# --------------------------------------------------------------------------------------------------
# S3 over HTTP (moto standalone server)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 server on 127.0.0.1."""

    endpoint_url: str
    pid: int
    key: str = S3_KEY
    secret: str = S3_SECRET
    region: str = S3_REGION

    @property
    def env(self) -> dict[str, str]:
        """AWS_* variables that point a client at this server (for ``monkeypatch.setenv``)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": self.region,
        }

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs storage options for this server (no region: s3fs would send it on mkdir)."""
        return {"key": self.key, "secret": self.secret, "client_kwargs": {"endpoint_url": self.endpoint_url}}

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name=self.region,
        )


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """A COCO compressed RLE (``counts`` as str, as the metadata stores it) decoded by pycocotools."""
    from pycocotools import mask as coco_mask

    counts = rle["counts"]
    coco = {
        "size": list(rle["size"]),
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }
    return coco_mask.decode(coco).astype(bool)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP status means the server is up
    except (OSError, ValueError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@contextlib.contextmanager
def _patched_environ(values: dict[str, str], remove: tuple[str, ...]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in (*values, *remove)}
    try:
        for name in remove:
            os.environ.pop(name, None)
        os.environ.update(values)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server (``python -m moto.server``) on a free 127.0.0.1 port, for the whole session.

    While it runs, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY = "testing" and AWS_DEFAULT_REGION =
    us-east-1 are set (other AWS_* variables such as profiles, tokens and endpoints are cleared); the
    environment is restored afterwards. AWS_ENDPOINT_URL is *not* set globally: use ``server.env``.
    """
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    child_env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
        )
        try:
            deadline = time.monotonic() + 20
            while not _answers_http(endpoint):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    output = log.read().decode(errors="replace")[-2000:]
                    state = f"exited with {process.returncode}" if process.poll() is not None else "timed out"
                    pytest.fail(f"moto server on {endpoint} did not start ({state}):\n{output}")
                time.sleep(0.1)
            environment = {
                "AWS_ACCESS_KEY_ID": S3_KEY,
                "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                "AWS_DEFAULT_REGION": S3_REGION,
                "AWS_EC2_METADATA_DISABLED": "true",
            }
            with _patched_environ(environment, _AWS_VARIABLES_TO_CLEAR):
                yield S3Server(endpoint_url=endpoint, pid=process.pid)
        finally:
            _stop(process)


@pytest.fixture(scope="session")
def _s3_client(s3_server: S3Server) -> Any:
    return s3_server.client()


def _clear_s3fs_cache() -> None:
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_server: S3Server, _s3_client: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """A fresh, uniquely named bucket: yields ``(bucket_name, storage_options)``.

    ``storage_options`` = ``{"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url":
    ...}}``, ready for fsspec / ``evf.io``. The bucket and its objects are deleted afterwards.
    """
    name = f"evf-test-{uuid.uuid4().hex[:16]}"
    _s3_client.create_bucket(Bucket=name)
    _clear_s3fs_cache()
    try:
        yield name, s3_server.storage_options
    finally:
        _clear_s3fs_cache()
        with contextlib.suppress(Exception):
            paginator = _s3_client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=name):
                objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if objects:
                    _s3_client.delete_objects(Bucket=name, Delete={"Objects": objects})
            _s3_client.delete_bucket(Bucket=name)


# --------------------------------------------------------------------------------------------------
# Shipped fixture model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """``tests/fixtures/evf-sam2-tiny``: the tiny checkpoint, cases.json, expected.npz and images/*.png."""
    return Path(__file__).parent / "fixtures" / "evf-sam2-tiny"


# --------------------------------------------------------------------------------------------------
# A tiny random-weights GroundingDINO in the Hub layout
# --------------------------------------------------------------------------------------------------

GROUNDING_WORDS = (
    "a",
    "the",
    "red",
    "blue",
    "green",
    "square",
    "circle",
    "dog",
    "cat",
    "left",
    "right",
    "big",
)
GROUNDING_NUM_QUERIES = 12


def write_tiny_grounding_dino(folder: Path) -> Path:
    """A random GroundingDINO in the Hub layout; BERT special ids where the model expects them.

    config.json, model.safetensors, preprocessor_config.json and the tokenizer files; the vocabulary
    knows ``GROUNDING_WORDS``; ``GROUNDING_NUM_QUERIES`` boxes per query before thresholds. Seeded:
    the same weights every time. Needs ``transformers``.
    """
    import torch
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        SwinConfig,
    )

    folder.mkdir(parents=True)
    # GroundingDINO hard-codes bert-base-uncased ids of [CLS] 101, [SEP] 102, "." 1012, "?" 1029.
    vocab = [f"[unused{i}]" for i in range(1040)]
    for index, token in {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}.items():
        vocab[index] = token
    vocab[1012], vocab[1029] = ".", "?"
    vocab[200 : 200 + len(GROUNDING_WORDS)] = GROUNDING_WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=64,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=4,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        ),
        d_model=32,  # GroupNorm(32, d_model)
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        num_queries=GROUNDING_NUM_QUERIES,
        max_text_len=32,
    )
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).eval().save_pretrained(folder)
    GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def grounding_dino_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GroundingDINO checkpoint folder, written once per session (skips without transformers)."""
    pytest.importorskip("transformers")
    return write_tiny_grounding_dino(tmp_path_factory.mktemp("gdino") / "grounding-dino-tiny-random")


# --------------------------------------------------------------------------------------------------
# One local Ray for the session
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """One quiet local Ray (2 logical CPUs, like the project's machines), started on first use and
    shut down at the end of the session; an already initialised Ray is reused (and left running).

    Jobs run in the tests find it initialised and reuse it instead of starting their own.
    """
    import ray
    import ray.data  # noqa: F401  (configures Ray Data's log handlers now, not inside a capsys test)

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


# --------------------------------------------------------------------------------------------------
# Real image files of odd kinds
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageCase:
    """An image file on disk and the HxWx3 uint8 RGB array ``evf.io.decode_image`` must give for it.

    ``expected`` is computed independently of the decoder (from the arrays the file was built from);
    ``atol`` is the per-pixel tolerance (non-zero only for lossy formats). ``expected`` is None for
    files that must fail to decode; ``error`` then says how ("truncated" or "not an image").
    """

    path: Path
    expected: np.ndarray | None
    atol: int = 0
    error: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def _quadrants(height: int, width: int) -> np.ndarray:
    """A non-symmetric RGB test card: four flat colour quadrants (unequal sizes) on a grid of 16 px."""
    image = np.empty((height, width, 3), np.uint8)
    top, left = (height // 16 // 3) * 16 or 16, (width // 16 // 3) * 16 or 16
    image[:top, :left] = (220, 30, 30)
    image[:top, left:] = (30, 200, 40)
    image[top:, :left] = (40, 50, 210)
    image[top:, left:] = (230, 220, 40)
    return image


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def make_exif_jpeg(path: Path) -> ImageCase:
    """A JPEG stored rotated 90 degrees counter-clockwise with EXIF orientation 6 ("rotate 90 CW to view").

    Decoding with the orientation applied must give back the upright 48x80 (HxW) test card.
    """
    upright = _quadrants(48, 80)
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # 80x48, rotated counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    return ImageCase(path, upright, atol=12, notes={"stored_shape": stored.shape})


def make_gray_png(path: Path) -> ImageCase:
    gray = (np.arange(30 * 50, dtype=np.uint32).reshape(30, 50) * 7 % 256).astype(np.uint8)
    assert cv2.imwrite(str(path), gray)
    return ImageCase(path, _gray_to_rgb(gray))


def make_rgba_png(path: Path) -> ImageCase:
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, size=(24, 40, 4), dtype=np.uint8)
    rgba[:, :10, 3] = 0  # fully transparent pixels keep their colour (alpha is dropped, not composited)
    Image.fromarray(rgba, "RGBA").save(path, "PNG")
    return ImageCase(path, rgba[:, :, :3].copy(), notes={"rgba": rgba})


def make_png16(path: Path) -> ImageCase:
    """A 16-bit grayscale PNG written by OpenCV; 8-bit value = high byte."""
    values = (np.arange(20 * 33, dtype=np.uint32).reshape(20, 33) * 99 + 5).astype(np.uint16)
    values[0, 0], values[0, 1], values[0, 2] = 0, 255, 65535
    assert cv2.imwrite(str(path), values)
    return ImageCase(path, _gray_to_rgb((values >> 8).astype(np.uint8)), notes={"values": values})


def make_rgb48_png(path: Path) -> ImageCase:
    """A 16-bit-per-channel RGB PNG written by OpenCV (which takes BGR); 8-bit value = high byte."""
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 65536, size=(12, 18, 3), dtype=np.uint16)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))
    return ImageCase(path, (rgb >> 8).astype(np.uint8))


def make_palette_png(path: Path) -> ImageCase:
    """A palette (mode P) PNG with a transparent palette entry; colours come from the palette table."""
    palette = np.zeros((256, 3), np.uint8)
    palette[:4] = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (17, 34, 51)]
    indices = (np.add.outer(np.arange(16), np.arange(26)) % 4).astype(np.uint8)
    image = Image.frombytes("P", (indices.shape[1], indices.shape[0]), indices.tobytes())
    image.putpalette(palette.tobytes())
    image.save(path, "PNG", transparency=3)  # index 3 transparent: its colour must still come through
    return ImageCase(path, palette[indices], notes={"indices": indices})


def make_truncated_png(path: Path) -> ImageCase:
    """A real PNG (random noise, so the pixel data is large) cut in half."""
    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return ImageCase(path, None, error="truncated")


def make_text_png(path: Path) -> ImageCase:
    path.write_text("this is not an image, just text in a file named .png\n")
    return ImageCase(path, None, error="not an image")


_BUILDERS = {
    "exif_jpeg": (make_exif_jpeg, "rotated_exif6.jpg"),
    "gray_png": (make_gray_png, "gray.png"),
    "rgba_png": (make_rgba_png, "rgba.png"),
    "png16": (make_png16, "gray16.png"),
    "rgb48_png": (make_rgb48_png, "rgb48.png"),
    "palette_png": (make_palette_png, "palette.png"),
    "truncated_png": (make_truncated_png, "truncated.png"),
    "text_png": (make_text_png, "not_an_image.png"),
}


def _image_fixture(name: str, build: Callable[[Path], ImageCase], filename: str) -> Any:
    """One pytest fixture per odd image file above, named like its builder's entry."""

    @pytest.fixture(name=name)
    def fixture(tmp_path: Path) -> ImageCase:
        return build(tmp_path / filename)

    return fixture


for _name, (_build, _filename) in _BUILDERS.items():
    globals()[_name] = _image_fixture(_name, _build, _filename)


@pytest.fixture
def image_cases(tmp_path: Path) -> dict[str, ImageCase]:
    """All the odd image files above in one directory (``tmp_path / "odd"``), by name."""
    directory = tmp_path / "odd"
    directory.mkdir()
    return {name: build(directory / filename) for name, (build, filename) in _BUILDERS.items()}


# Finished jobs for the review page and export tests live in finished_jobs.py (imported here so that
# every test module sees the fixtures).
from finished_jobs import finished_job, grounded_job  # noqa: E402, F401


def interrupted_then_rerun(
    args: list[str], output: str, expected: set[str], env: Mapping[str, str] | None = None, fs: Any = None
) -> dict[str, dict[str, Any]]:
    """``evf run ARGS --output OUTPUT`` with the tiny model, one image a model call: Ctrl-C (SIGINT)
    once its first mask is written (Ray and the model at work: a signal that lands while Ray starts
    its processes may be lost), check that it stopped part-way with status 130, run the same command
    again to its end. Checks that ``read_metadata`` and a raw ``pyarrow.dataset`` reader of ``metadata/``
    then each hold every ``expected`` id exactly once; returns the rows by id. ``fs``: the fsspec
    filesystem of an object-store output (None: a local folder)."""
    import signal

    import fsspec
    import pyarrow.dataset as ds

    from evf.pipelines.metadata import read_metadata

    tiny = Path(__file__).parent / "fixtures" / "evf-sam2-tiny" / "checkpoint"
    # Ctrl-C as on a terminal: a child inherits an ignored SIGINT (in a long pytest session something
    # leaves SIGINT ignored, and Python then keeps ignoring it), so the child takes the default back.
    main = "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    main += "runpy.run_module('evf.cli', run_name='__main__')"
    command = [sys.executable, "-c", main, "run", *args, "--output", output, "--model", str(tiny)]
    command += ["--no-progress", "--set", "cpu.batch_size=2", "--set", "inference.batch_size=1"]
    command += ["--set", "ray.num_cpus=2"]
    environment = {**os.environ, **(env or {}), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    fs = fs or fsspec.filesystem("file")
    root = output.split("://", 1)[-1].rstrip("/")
    folder = f"{root}/metadata"
    options = fs.storage_options if "://" in output else None

    def committed() -> bool:
        fs.invalidate_cache()
        return bool(fs.glob(f"{root}/masks/*.png"))

    first = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not committed():
            assert first.poll() is None and time.monotonic() < deadline, "no commit before the interrupt"
            time.sleep(0.05)
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, f"the first run was not interrupted (exit {first.returncode})"
    partial = {r["id"] for r in read_metadata(output, options).to_pylist()}
    assert 0 < len(partial) < len(expected), "interrupted part-way"

    second = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = read_metadata(output, options).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(expected)
    fs.invalidate_cache()
    raw = ds.dataset(folder, format="parquet", filesystem=fs).to_table(columns=["id"]).column("id")
    assert sorted(raw.to_pylist()) == sorted(expected), "every row exactly once, for a raw reader too"
    return {r["id"]: r for r in rows}
