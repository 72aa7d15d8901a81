"""Image and mask I/O on local paths, ``data:`` URIs and any fsspec storage (S3, GCS, memory, HTTP...).

Everything here takes a URI string plus optional fsspec ``storage_options`` (see ``evf.storage``).

Errors are raised as :class:`ImageReadError` / :class:`ImageWriteError` (both ``OSError``) for storage
problems and :class:`ImageDecodeError` (``ValueError``) for bytes that are not a usable image. Messages
name the URI and the cause but never credentials.

Transient storage faults (connection refused or reset, 5xx, throttling) are retried as
:class:`evf.retry.RetryPolicy` says; an error raised after the last try is still recognised as
transient by :func:`evf.retry.is_retryable`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import re
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

import cv2
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageOps, UnidentifiedImageError

from evf.errors import UserError
from evf.retry import RetryPolicy, call_with_retry, is_retryable
from evf.storage import describe_error, open_filesystem, shown_uri, uri_protocol

__all__ = [
    "ImageDecodeError",
    "ImageLike",
    "ImageReadError",
    "ImageWriteError",
    "as_rgb_array",
    "decode_image",
    "encode_jpeg",
    "encode_png",
    "load_image",
    "load_mask",
    "read_bytes",
    "write_bytes",
]

_EXIF_ORIENTATION = 0x0112


class ImageReadError(UserError, OSError):
    """The bytes behind a URI could not be read (missing object, permissions, network, bad URI...)."""


class ImageWriteError(OSError):
    """Bytes could not be written to a URI."""


class ImageDecodeError(UserError, ValueError):
    """Bytes were read but are not a usable image (not an image, truncated, corrupt, too large)."""


# --------------------------------------------------------------------------------------------------
# URIs and storage options
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Reading and writing bytes
# --------------------------------------------------------------------------------------------------


def _parse_data_uri(uri: str) -> bytes:
    """The payload of an RFC 2397 ``data:[<mediatype>][;base64],<data>`` URI."""
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise ValueError("malformed data: URI (no ',')")
    raw = unquote_to_bytes(payload)
    if header.lower().split(";")[-1].strip() == "base64":
        compact = re.sub(rb"\s+", b"", raw)
        compact += b"=" * (-len(compact) % 4)
        try:
            return base64.b64decode(
                compact, altchars=b"-_" if b"-" in compact or b"_" in compact else None, validate=True
            )
        except (binascii.Error, ValueError) as error:
            raise ValueError(f"invalid base64 data ({error})") from None
    return raw


def _storage_error(
    kind: type[OSError], verb: str, uri: str, error: Exception, options: Mapping[str, Any] | None
) -> OSError:
    """``kind`` naming the URI and the cause, with the cause's errno, how often it was tried, and
    ``retryable`` (:func:`evf.retry.is_retryable` of the cause, kept when the error is pickled)."""
    attempts = getattr(error, "retry_attempts", 1)
    tries = f" (gave up after {attempts} attempts)" if attempts > 1 else ""
    wrapped = kind(f"cannot {verb} {shown_uri(uri)!r}: {describe_error(error, options)}{tries}")
    wrapped.errno = getattr(error, "errno", None)
    wrapped.retryable = is_retryable(error)
    return wrapped


def _read_once(uri: str, storage_options: Mapping[str, Any] | None, retry: RetryPolicy | None) -> bytes:
    if uri_protocol(uri) == "":
        with open(uri, "rb") as file:
            return file.read()
    fs, path = open_filesystem(uri, storage_options, retry)
    return bytes(fs.cat_file(path))


def read_bytes(
    uri: str, storage_options: Mapping[str, Any] | None = None, retry: RetryPolicy | None = None
) -> bytes:
    """All bytes behind ``uri``: a local path, ``file://``, any fsspec URL (``s3://``, ``gs://``,
    ``memory://``, ``https://``...), an RFC 2397 ``data:`` URI (base64 or percent-encoded), or an
    image a Parquet manifest holds (``<file>#row=<index>&column=<name>``, ``evf.manifest``).

    Transient faults are retried as ``retry`` says (default :data:`evf.retry.DEFAULT_RETRY_POLICY`).
    Raises :class:`ImageReadError` naming the URI and the cause, e.g.
    ``cannot read 's3://b/x.png': file not found``.
    """
    uri = os.fspath(uri)
    if not uri:
        raise ImageReadError("cannot read '': empty URI")
    try:
        if uri_protocol(uri) == "data":
            return _parse_data_uri(uri)
        image = _embedded_image(uri, storage_options, retry) if "#row=" in uri else None
        if image is None:
            return call_with_retry(retry, _read_once, uri, storage_options, retry)
    except Exception as error:
        raise _storage_error(ImageReadError, "read", uri, error, storage_options) from error
    return image if isinstance(image, bytes) else read_bytes(image, storage_options, retry)


def _embedded_image(
    uri: str, storage_options: Mapping[str, Any] | None, retry: RetryPolicy | None
) -> bytes | str | None:
    """The image a manifest row holds (``evf.manifest.embedded_image_url``), None for other URIs."""
    from evf.manifest import EMBEDDED_IMAGE, read_embedded_image  # pyarrow: only for these URIs

    if not EMBEDDED_IMAGE.match(uri):
        return None
    return call_with_retry(retry, read_embedded_image, uri, storage_options)


def _write_local_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``.

    Readers see either the old file or the complete new one. (No fsync: atomic, not crash-durable.)
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open with 0o666 lets the umask decide the final permissions, like a plain open() would.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _write_once(
    uri: str, data: bytes, storage_options: Mapping[str, Any] | None, retry: RetryPolicy | None
) -> None:
    if uri_protocol(uri) == "":
        _write_local_atomic(uri, data)
        return
    fs, path = open_filesystem(uri, storage_options, retry)
    if isinstance(fs, LocalFileSystem):
        _write_local_atomic(path, data)
    else:
        fs.pipe_file(path, data)


def write_bytes(
    uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None, retry: RetryPolicy | None = None
) -> None:
    """Write ``data`` to ``uri``, atomically where the storage allows it.

    Local paths and ``file://`` URIs: parent directories are created and the file is replaced in one
    step (temporary file + ``os.replace``); a failed write (a full disk...) leaves no partial file.
    Object stores (S3, GCS...) are atomic per object already. Transient faults are retried as
    ``retry`` says (default :data:`evf.retry.DEFAULT_RETRY_POLICY`). Raises :class:`ImageWriteError`
    naming the URI and the cause; it keeps the cause's ``errno`` (``errno.ENOSPC`` for a full disk).
    """
    uri = os.fspath(uri)
    try:
        if not uri or uri_protocol(uri) == "data":
            raise ValueError("not a writable location")
        call_with_retry(retry, _write_once, uri, bytes(data), storage_options, retry)
    except Exception as error:
        raise _storage_error(ImageWriteError, "write", uri, error, storage_options) from error


# --------------------------------------------------------------------------------------------------
# Decoding and encoding images
# --------------------------------------------------------------------------------------------------


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB from a loaded Pillow image of any mode (alpha dropped, 16-bit scaled)."""
    mode = img.mode
    if mode == "RGB":
        return np.array(img, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img)
        # 16-bit samples keep their high byte. Mode "I" (32-bit) holds 16-bit data for the formats
        # Pillow decodes into it (16-bit PNG/TIFF/PGM); anything outside 0..65535 is clipped.
        gray = (np.clip(values, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float32))
        # Float images: [0, 1] when they fit, else taken as 0..255.
        scale = 255.0 if values.size and float(values.max()) <= 1.0 else 1.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("P", "PA"):
        # Via RGBA so palette transparency is handled without warnings; alpha is then dropped.
        return np.array(img.convert("RGBA"), dtype=np.uint8)[:, :, :3].copy()
    # L, 1, LA, RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV...: Pillow converts (alpha is dropped).
    return np.array(img.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode image bytes into an HxWx3 ``uint8`` RGB array (a fresh, writable, C-contiguous copy).

    - Any format Pillow reads; for multi-frame files (GIF, TIFF...) the first frame.
    - The EXIF orientation tag is applied, so the array is upright as a viewer shows it.
    - Grayscale, palette, CMYK, YCbCr... are converted to RGB. **Alpha is dropped** (not composited):
      fully transparent pixels keep their stored colour.
    - 16-bit images are scaled to 8 bits by keeping the high byte (``value >> 8``).
    - The image is fully decoded here, so truncated files fail here rather than later.

    Raises :class:`ImageDecodeError` naming ``source``: not an image, truncated or corrupt, or larger
    than ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression-bomb guard; raise that limit to allow bigger
    images, or set it to ``None`` to disable the guard).
    """
    name = shown_uri(os.fspath(source))
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"{name!r} is too large to decode safely ({error})") from error
    except UnidentifiedImageError as error:
        raise ImageDecodeError(
            f"{name!r} is not an image (unrecognised format, {len(data)} bytes)"
        ) from error
    except Exception as error:
        raise ImageDecodeError(f"{name!r} is not an image ({type(error).__name__}: {error})") from error

    with img:
        width, height = img.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and width * height > limit:
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse outright.
            raise ImageDecodeError(
                f"{name!r} is too large to decode safely ({width}x{height} = {width * height} pixels, "
                f"limit PIL.Image.MAX_IMAGE_PIXELS = {limit})"
            )
        try:
            img.load()
        except Exception as error:
            raise ImageDecodeError(
                f"{name!r} is truncated or corrupt ({type(error).__name__}: {error})"
            ) from error
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # unreadable EXIF is not worth failing the image for
            orientation = 1
        upright = img
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            try:
                upright = ImageOps.exif_transpose(img)
            except Exception:
                upright = img
        try:
            array = _to_rgb_array(upright)
        except Exception as error:
            raise ImageDecodeError(
                f"{name!r} could not be converted to RGB (mode {upright.mode}: {error})"
            ) from error
    return np.ascontiguousarray(array)


def load_image(uri: str, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """``decode_image(read_bytes(uri, storage_options), uri)``: an HxWx3 uint8 RGB array."""
    uri = os.fspath(uri)
    return decode_image(read_bytes(uri, storage_options), source=uri)


ImageLike = np.ndarray | Image.Image | str | os.PathLike
"""What the library's entry points take as an image: an HxWx3 uint8 RGB array, a PIL image, or a
path / URI (local, ``s3://...``, ``data:...``)."""


def as_rgb_array(image: ImageLike, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """Any ``ImageLike`` as an HxWx3 uint8 RGB array (PIL images converted like decoded files: EXIF
    orientation applied, alpha dropped; paths and URIs read and decoded)."""
    if isinstance(image, np.ndarray):
        return image
    if isinstance(image, Image.Image):
        upright = ImageOps.exif_transpose(image) or image
        return np.ascontiguousarray(_to_rgb_array(upright))
    if isinstance(image, str | os.PathLike):
        return load_image(os.fspath(image), storage_options)
    raise TypeError(f"expected an image array, a PIL image or a path/URI, got {type(image).__name__}")


def load_mask(uri: str, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """A mask file as bool (H, W): the alpha channel of an RGBA image, else the grayscale image,
    at >= 128 (the threshold ``evf.postprocess.binarize`` gives the masks the job writes).

    This is the one rule for every mask read back: predictions, ground truth, training targets.
    """
    uri = os.fspath(uri)
    data = read_bytes(uri, storage_options)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageDecodeError(f"{shown_uri(uri)!r} is not an image (a mask file was expected)")
    if image.ndim == 3:
        image = image[:, :, 3] if image.shape[2] == 4 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.dtype == np.uint16:  # 16-bit masks keep their high byte, as decode_image does
        image = (image >> 8).astype(np.uint8)
    return image >= 128


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes for an HxW (grayscale), HxWx1, HxWx3 (RGB) or HxWx4 (RGBA) ``uint8`` array.

    Channel order is RGB(A) as everywhere in this package (the BGR swap for OpenCV happens here).
    Raises ``TypeError`` for other dtypes and ``ValueError`` for other shapes.
    """
    return _encode(array, ".png", "encode_png")


def encode_jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes for an HxW (grayscale), HxWx1 or HxWx3 (RGB) ``uint8`` array.

    A JPEG holds no alpha channel: an HxWx4 array is a ``ValueError`` (flatten it first, or write a
    PNG). Raises ``TypeError`` for other dtypes and ``ValueError`` for other shapes.
    """
    if np.ndim(array) == 3 and np.shape(array)[2] == 4:
        raise ValueError("a JPEG cannot hold an alpha channel (RGBA): write a PNG")
    return _encode(array, ".jpg", "encode_jpeg", [cv2.IMWRITE_JPEG_QUALITY, int(quality)])


def _encode(array: np.ndarray, suffix: str, name: str, params: list[int] | None = None) -> bytes:
    """``array`` (RGB(A) channel order) encoded by OpenCV as ``suffix``; ``name`` is the caller's."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"{name} needs a uint8 array, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        pixels = array
    elif array.ndim == 3 and array.shape[2] == 3:
        pixels = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2BGR)
    elif array.ndim == 3 and array.shape[2] == 4:
        pixels = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGBA2BGRA)
    else:
        raise ValueError(f"{name} needs an HxW, HxWx3 or HxWx4 array, got shape {array.shape}")
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"{name} cannot encode an empty image (shape {array.shape})")
    ok, encoded = cv2.imencode(suffix, np.ascontiguousarray(pixels), params or [])
    if not ok:
        raise ValueError(f"{suffix[1:].upper()} encoding failed for an array of shape {array.shape}")
    return encoded.tobytes()
