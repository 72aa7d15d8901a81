"""evf.io on real files, data: URIs, fsspec memory and S3 over HTTP (a local moto server). No mocks."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import os
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_from_bytes

import numpy as np
import pytest
import s3fs
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from evf.io import (
    ImageDecodeError,
    ImageReadError,
    ImageWriteError,
    decode_image,
    encode_png,
    load_image,
    read_bytes,
    write_bytes,
)
from evf.storage import join_uri, open_filesystem, redact, storage_options_for

if TYPE_CHECKING:
    from conftest import ImageCase, S3Server

AWS_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


@pytest.fixture
def no_aws_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _assert_rgb(array: np.ndarray) -> None:
    assert array.dtype == np.uint8
    assert array.ndim == 3 and array.shape[2] == 3
    assert array.flags.c_contiguous and array.flags.writeable


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Decoding real files of every kind
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case_name", ["exif_jpeg", "gray_png", "rgba_png", "png16", "rgb48_png", "palette_png"]
)
def test_load_image_formats(case_name: str, request: pytest.FixtureRequest) -> None:
    case: ImageCase = request.getfixturevalue(case_name)
    assert case.expected is not None
    image = load_image(str(case.path))
    _assert_rgb(image)
    assert image.shape == case.expected.shape
    difference = np.abs(image.astype(np.int16) - case.expected.astype(np.int16))
    assert int(difference.max()) <= case.atol, f"{case_name}: max difference {difference.max()}"


def test_exif_orientation_is_applied(exif_jpeg: ImageCase) -> None:
    # The file itself is stored sideways: without the EXIF tag the image would be 80x48.
    with Image.open(exif_jpeg.path) as raw:
        assert (raw.height, raw.width) == exif_jpeg.notes["stored_shape"][:2] == (80, 48)
    image = decode_image(exif_jpeg.path.read_bytes(), str(exif_jpeg.path))
    assert image.shape == (48, 80, 3)
    # Quadrant colours land in the upright places (top-left red, bottom-right yellow).
    assert np.abs(image[4, 4].astype(int) - (220, 30, 30)).max() <= 12
    assert np.abs(image[40, 70].astype(int) - (230, 220, 40)).max() <= 12
    assert np.abs(image[4, 70].astype(int) - (30, 200, 40)).max() <= 12


def test_16_bit_keeps_high_byte(png16: ImageCase) -> None:
    image = load_image(png16.path)
    assert image[0, 0].tolist() == [0, 0, 0]  # 0
    assert image[0, 1].tolist() == [0, 0, 0]  # 255 >> 8
    assert image[0, 2].tolist() == [255, 255, 255]  # 65535 >> 8


def test_alpha_is_dropped_not_composited(rgba_png: ImageCase) -> None:
    rgba = rgba_png.notes["rgba"]
    image = load_image(rgba_png.path)
    assert np.array_equal(image[:, :10], rgba[:, :10, :3])  # alpha 0 there; colours unchanged


def test_load_image_local_forms(gray_png: ImageCase) -> None:
    expected = gray_png.expected
    assert np.array_equal(load_image(gray_png.path), expected)  # os.PathLike
    assert np.array_equal(load_image(str(gray_png.path)), expected)
    assert np.array_equal(load_image(gray_png.path.as_uri()), expected)  # file:///...


def test_all_cases_fixture(image_cases: dict[str, ImageCase]) -> None:
    for name, case in image_cases.items():
        assert case.path.is_file(), name
        if case.expected is None:
            with pytest.raises(ImageDecodeError):
                load_image(case.path)


# --------------------------------------------------------------------------------------------------
# Decode errors
# --------------------------------------------------------------------------------------------------


def test_truncated_png(truncated_png: ImageCase) -> None:
    with pytest.raises(ImageDecodeError, match="truncated or corrupt") as info:
        load_image(str(truncated_png.path))
    assert str(truncated_png.path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_text_file_named_png(text_png: ImageCase) -> None:
    with pytest.raises(ImageDecodeError, match="is not an image") as info:
        load_image(str(text_png.path))
    assert str(info.value).startswith(f"'{text_png.path}' is not an image")


def test_decode_empty_and_garbage_bytes() -> None:
    with pytest.raises(ImageDecodeError, match="'<bytes>' is not an image"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="'blob' is not an image"):
        decode_image(b"\x00\x01garbage", source="blob")


def test_decompression_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    big = _png(np.zeros((64, 64), np.uint8))  # 4096 px > 2 x limit: Pillow raises
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(big, "big.png")
    medium = _png(np.zeros((40, 40), np.uint8))  # 1600 px: Pillow only warns; we refuse
    with (
        pytest.warns(Image.DecompressionBombWarning),
        pytest.raises(ImageDecodeError, match=r"'medium.png' is too large.*40x40"),
    ):
        decode_image(medium, "medium.png")


# --------------------------------------------------------------------------------------------------
# data: URIs
# --------------------------------------------------------------------------------------------------


def test_data_uri_base64_and_percent(rgba_png: ImageCase) -> None:
    payload = rgba_png.path.read_bytes()
    as_base64 = "data:image/png;base64," + base64.b64encode(payload).decode()
    as_percent = "data:image/png," + quote_from_bytes(payload)
    assert read_bytes(as_base64) == payload
    assert read_bytes(as_percent) == payload
    assert np.array_equal(load_image(as_base64), rgba_png.expected)
    assert np.array_equal(load_image(as_percent), rgba_png.expected)


def test_data_uri_rfc2397_examples() -> None:
    assert read_bytes("data:,A%20brief%20note") == b"A brief note"
    assert read_bytes("data:text/plain;charset=US-ASCII,Hello%2C%20World!") == b"Hello, World!"
    assert read_bytes("data:text/plain;base64,SGVsbG8sIFdvcmxkIQ==") == b"Hello, World!"
    assert read_bytes("data:;base64,SGVsbG8sIFdvcmxkIQ") == b"Hello, World!"  # missing padding
    assert read_bytes("DATA:text/plain;BASE64,SGVs%0AbG8=") == b"Hello"  # case, escaped newline


def test_data_uri_errors() -> None:
    with pytest.raises(ImageReadError, match="cannot read 'data:image/png;base64,@@@@': .*base64"):
        read_bytes("data:image/png;base64,@@@@")
    with pytest.raises(ImageReadError, match="no ','"):
        read_bytes("data:image/png;base64")
    long_bad = "data:image/png;base64," + "A" * 10_000 + "!"
    with pytest.raises(ImageReadError) as info:
        read_bytes(long_bad)
    assert len(str(info.value)) < 500  # huge URIs are shortened in messages


# --------------------------------------------------------------------------------------------------
# Read errors name the URI
# --------------------------------------------------------------------------------------------------


def test_read_errors_name_the_uri(tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageReadError) as info:
        read_bytes(str(missing))
    assert str(info.value) == f"cannot read '{missing}': file not found"
    assert isinstance(info.value, OSError)
    assert isinstance(info.value.__cause__, FileNotFoundError)

    with pytest.raises(ImageReadError, match=r"cannot read 'file://.*missing\.png': file not found"):
        read_bytes(missing.as_uri())
    with pytest.raises(ImageReadError, match="cannot read 'memory://nowhere/x.png': file not found"):
        read_bytes("memory://nowhere/x.png")
    with pytest.raises(ImageReadError, match="is a directory"):
        read_bytes(str(tmp_path))
    with pytest.raises(ImageReadError, match="empty URI"):
        read_bytes("")
    with pytest.raises(ImageReadError, match=r"cannot read 'nosuchproto://a/b.png': "):
        read_bytes("nosuchproto://a/b.png")


def test_read_error_hides_password_in_uri() -> None:
    with pytest.raises(ImageReadError) as info:
        read_bytes("nosuchproto://user:hunter2@host/x.png")
    assert "hunter2" not in str(info.value)
    assert "user:***@host" in str(info.value)


# --------------------------------------------------------------------------------------------------
# encode_png / write_bytes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "mode"),
    [((17, 23), "L"), ((17, 23, 1), "L"), ((17, 23, 3), "RGB"), ((17, 23, 4), "RGBA")],
)
def test_encode_png_round_trip_through_pillow(shape: tuple[int, ...], mode: str) -> None:
    rng = np.random.default_rng(7)
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    with Image.open(io.BytesIO(encode_png(array))) as decoded:
        assert decoded.format == "PNG"
        assert decoded.mode == mode
        assert np.array_equal(np.asarray(decoded), array.reshape(shape[:2]) if mode == "L" else array)


def test_encode_png_non_contiguous_and_errors() -> None:
    rng = np.random.default_rng(8)
    wide = rng.integers(0, 256, size=(10, 30, 3), dtype=np.uint8)
    view = wide[:, ::3]
    assert np.array_equal(decode_image(encode_png(view)), view)
    with pytest.raises(TypeError, match="uint8"):
        encode_png(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        encode_png(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        encode_png(np.zeros(4, np.uint8))


def test_write_bytes_local_atomic(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "mask.png"
    write_bytes(str(target), b"first")
    assert target.read_bytes() == b"first"
    write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["mask.png"]  # no temp files left
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)  # umask honoured

    via_uri = tmp_path / "c" / "d.png"
    write_bytes(via_uri.as_uri(), b"uri")
    assert via_uri.read_bytes() == b"uri"
    assert sorted(p.name for p in via_uri.parent.iterdir()) == ["d.png"]


def test_write_bytes_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    with pytest.raises(ImageWriteError, match=r"cannot write '.*file/sub/x\.png': "):
        write_bytes(str(blocker / "sub" / "x.png"), b"data")
    with pytest.raises(ImageWriteError, match="not a writable location"):
        write_bytes("data:,x", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_memory_round_trip() -> None:
    image = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    uri = "memory://evf-io-test/out/x.png"
    write_bytes(uri, encode_png(image))
    assert np.array_equal(load_image(uri), image)
    fs, path = open_filesystem(uri)
    assert fs.exists(path)
    fs.rm(path)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_http_read(gray_png: ImageCase) -> None:
    handler = functools.partial(_QuietHandler, directory=str(gray_png.path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert np.array_equal(load_image(join_uri(base, gray_png.path.name)), gray_png.expected)
        with pytest.raises(ImageReadError, match=f"cannot read '{base}/missing.png': file not found"):
            read_bytes(f"{base}/missing.png")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------------------------------
# S3 over HTTP (moto server)
# --------------------------------------------------------------------------------------------------


def test_s3_round_trip_with_storage_options(s3_bucket: tuple[str, dict[str, Any]]) -> None:
    bucket, options = s3_bucket
    rng = np.random.default_rng(9)
    image = rng.integers(0, 256, size=(21, 34, 3), dtype=np.uint8)
    mask = (rng.random((21, 34)) > 0.5).astype(np.uint8) * 255
    image_uri = f"s3://{bucket}/inputs/img.png"
    mask_uri = join_uri(f"s3://{bucket}/out/", "masks", "img.png")
    write_bytes(image_uri, encode_png(image), options)
    write_bytes(mask_uri, encode_png(mask), options)

    assert np.array_equal(load_image(image_uri, options), image)
    with Image.open(io.BytesIO(read_bytes(mask_uri, options))) as decoded:
        assert decoded.mode == "L"
        assert np.array_equal(np.asarray(decoded), mask)

    fs, path = open_filesystem(mask_uri, options)
    assert isinstance(fs, s3fs.S3FileSystem)
    assert path == f"{bucket}/out/masks/img.png"
    assert fs.exists(path)

    with pytest.raises(ImageReadError) as info:
        read_bytes(f"s3://{bucket}/inputs/nope.png", options)
    assert str(info.value) == f"cannot read 's3://{bucket}/inputs/nope.png': file not found"
    assert options["secret"] not in str(info.value)


def test_s3_with_environment_only(
    s3_server: S3Server, s3_bucket: tuple[str, dict[str, Any]], no_aws_env: pytest.MonkeyPatch
) -> None:
    bucket, _ = s3_bucket
    for name, value in s3_server.env.items():
        no_aws_env.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    image = np.full((8, 9, 3), (10, 120, 250), np.uint8)
    uri = f"s3://{bucket}/env/only.png"
    write_bytes(uri, encode_png(image))  # no storage options at all
    assert np.array_equal(load_image(uri), image)


# --------------------------------------------------------------------------------------------------
# Storage options, redaction, URI joining
# --------------------------------------------------------------------------------------------------


def test_storage_options_for_reads_aws_environment(no_aws_env: pytest.MonkeyPatch) -> None:
    no_aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    no_aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIAENV")
    no_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    no_aws_env.setenv("AWS_SESSION_TOKEN", "envtoken")
    no_aws_env.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    assert storage_options_for("s3://bucket/key.png") == {
        "key": "AKIAENV",
        "secret": "envsecret",
        "token": "envtoken",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-3"},
    }
    no_aws_env.setenv("AWS_REGION", "ap-south-1")  # AWS_REGION wins over AWS_DEFAULT_REGION
    no_aws_env.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9001")  # service-specific wins
    options = storage_options_for("s3a://bucket/key.png")
    assert options["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9001", "region_name": "ap-south-1"}
    # Non-S3 protocols and local paths: explicit options only.
    assert storage_options_for("gs://bucket/x.png") == {}
    assert storage_options_for("/tmp/x.png", {"a": 1}) == {"a": 1}


def test_storage_options_for_explicit_wins(no_aws_env: pytest.MonkeyPatch) -> None:
    no_aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    no_aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIAENV")
    no_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    no_aws_env.setenv("AWS_SESSION_TOKEN", "envtoken")
    explicit = {"key": "mine", "secret": "mysecret", "client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}}
    options = storage_options_for("s3://b/k", explicit)
    # No env token mixed into explicit credentials, explicit endpoint kept.
    assert options == explicit
    assert explicit == {
        "key": "mine",
        "secret": "mysecret",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:1"},
    }
    assert storage_options_for("s3://b/k", {"endpoint_url": "http://127.0.0.1:2", "anon": True}) == {
        "endpoint_url": "http://127.0.0.1:2",
        "anon": True,
    }
    assert storage_options_for("s3://b/k", {})["key"] == "AKIAENV"


def test_redact_hides_secrets() -> None:
    options = {
        "key": "AKIA123",
        "secret": "s3cr3t",
        "token": "tok",
        "password": "pw",
        "anon": False,
        "profile": None,
        "client_kwargs": {
            "endpoint_url": "https://user:hunter2@minio.local:9000",
            "region_name": "us-east-1",
            "aws_secret_access_key": "nested",
        },
        "sse_customer_key": "customer",
        "requester_pays": True,
    }
    redacted = redact(options)
    assert redacted == {
        "key": "***",
        "secret": "***",
        "token": "***",
        "password": "***",
        "anon": False,
        "profile": None,
        "client_kwargs": {
            "endpoint_url": "https://user:***@minio.local:9000",
            "region_name": "us-east-1",
            "aws_secret_access_key": "***",
        },
        "sse_customer_key": "***",
        "requester_pays": True,
    }
    assert options["key"] == "AKIA123" and options["client_kwargs"]["aws_secret_access_key"] == "nested"
    assert redact(None) == {}
    assert redact({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}) == {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}
    }


def test_join_uri() -> None:
    assert join_uri("s3://bucket", "masks", "a.png") == "s3://bucket/masks/a.png"
    assert join_uri("s3://bucket/out/", "/masks/", "a.png") == "s3://bucket/out/masks/a.png"
    assert join_uri("s3://bucket/out", "sub/dir", "", "a.png") == "s3://bucket/out/sub/dir/a.png"
    assert join_uri("memory://", "x", "y.png") == "memory://x/y.png"
    assert join_uri("file:///", "tmp", "a.png") == "file:///tmp/a.png"
    assert join_uri("file:///tmp/out", "a.png") == "file:///tmp/out/a.png"
    assert join_uri("/data/out", "masks", "a.png") == os.path.join("/data/out", "masks", "a.png")
    assert join_uri("/data/out/", "/abs.png") == "/data/out/abs.png"  # parts stay relative
    assert join_uri("relative", "x.png") == os.path.join("relative", "x.png")
    assert join_uri(Path("/data"), "x.png") == "/data/x.png"
    assert join_uri("s3://bucket/out") == "s3://bucket/out"
    with pytest.raises(ValueError):
        join_uri("data:,abc", "x")


def test_open_filesystem_local(tmp_path: Path) -> None:
    fs, path = open_filesystem(str(tmp_path / "x.png"))
    assert isinstance(fs, LocalFileSystem)
    assert path == (tmp_path / "x.png").as_posix()
    fs2, path2 = open_filesystem((tmp_path / "x.png").as_uri())
    assert isinstance(fs2, LocalFileSystem) and path2 == path
