"""Image and mask I/O on local paths, ``data:`` URIs and any fsspec storage (S3, GCS, memory, HTTP...).

Everything here takes a URI string plus optional fsspec ``storage_options``. For ``s3://`` URIs the
standard AWS environment variables fill in whatever the caller did not pass explicitly (see
:func:`storage_options_for`), so a job runs the same against AWS, MinIO or a local moto server.

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
from urllib.parse import unquote_to_bytes, urlsplit, urlunsplit

import cv2
import fsspec
import fsspec.core
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageOps, UnidentifiedImageError

from evf.retry import DEFAULT_RETRY_POLICY, RetryPolicy, call_with_retry, is_retryable, request_retry_config

__all__ = [
    "ImageDecodeError",
    "ImageReadError",
    "ImageWriteError",
    "decode_image",
    "encode_png",
    "join_uri",
    "load_image",
    "open_filesystem",
    "read_bytes",
    "redact",
    "storage_options_for",
    "write_bytes",
]

REDACTED = "***"

_S3_PROTOCOLS = frozenset({"s3", "s3a"})
_CREDENTIAL_OPTIONS = ("key", "secret", "token", "profile", "anon")
_SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "key")
# Option names that contain a "secret word" but are not secrets.
_NOT_SECRET = frozenset({"endpoint_url", "key_prefix", "sse_kms_key_id", "ssekmskeyid"})
_EXIF_ORIENTATION = 0x0112
_MAX_URI_IN_MESSAGE = 200


class ImageReadError(OSError):
    """The bytes behind a URI could not be read (missing object, permissions, network, bad URI...)."""


class ImageWriteError(OSError):
    """Bytes could not be written to a URI."""


class ImageDecodeError(ValueError):
    """Bytes were read but are not a usable image (not an image, truncated, corrupt, too large)."""


# --------------------------------------------------------------------------------------------------
# URIs and storage options
# --------------------------------------------------------------------------------------------------


def _protocol(uri: str) -> str:
    """The URI's scheme in lower case ('' for plain local paths, 'data' for data: URIs)."""
    if uri[:5].lower() == "data:":
        return "data"
    scheme, sep, _ = uri.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme) or len(scheme) == 1:
        # No scheme, or a Windows drive letter such as C://...
        return ""
    return scheme.lower()


def storage_options_for(uri: str, explicit: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """fsspec storage options for ``uri``: ``explicit`` completed from the environment where relevant.

    For ``s3://`` (and ``s3a://``) URIs, options the caller did not give are taken from the standard AWS
    variables: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` -> ``client_kwargs["endpoint_url"]``,
    ``AWS_ACCESS_KEY_ID`` -> ``key``, ``AWS_SECRET_ACCESS_KEY`` -> ``secret``, ``AWS_SESSION_TOKEN`` ->
    ``token`` and ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` -> ``client_kwargs["region_name"]``. Explicit
    values always win; credentials are only taken from the environment when the caller gave none of
    ``key``/``secret``/``token``/``profile``/``anon`` (mixing sources would pair mismatched keys).
    Other protocols get a copy of ``explicit`` only. The result is a new dict; inputs are not modified.
    """
    options: dict[str, Any] = dict(explicit or {})
    if _protocol(uri) not in _S3_PROTOCOLS:
        return options
    env = os.environ
    client_kwargs = dict(options.get("client_kwargs") or {})

    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in options and "endpoint_url" not in client_kwargs:
        client_kwargs["endpoint_url"] = endpoint

    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region and "region_name" not in client_kwargs:
        client_kwargs["region_name"] = region

    has_credentials = any(options.get(name) for name in _CREDENTIAL_OPTIONS) or any(
        name in client_kwargs for name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
    )
    if not has_credentials:
        for option, variable in (
            ("key", "AWS_ACCESS_KEY_ID"),
            ("secret", "AWS_SECRET_ACCESS_KEY"),
            ("token", "AWS_SESSION_TOKEN"),
        ):
            if env.get(variable):
                options[option] = env[variable]

    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return lowered not in _NOT_SECRET and any(word in lowered for word in _SECRET_WORDS)


def _redact_url(url: str) -> str:
    """Hide a password embedded in a URL (``https://user:pass@host`` -> ``https://user:***@host``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    userinfo = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}:{REDACTED}@{netloc[2]}"))


def _redact_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(item) for item in value)
    if isinstance(value, str) and "://" in value:
        return _redact_url(value)
    return value


def redact(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``options`` safe to log: secret values replaced by ``'***'``.

    An option is secret when its name contains 'secret', 'token', 'password', 'credential' or 'key'
    (so ``key``, ``aws_secret_access_key``, ``sse_customer_key``...), except known non-secrets such as
    ``endpoint_url``. Nested mappings (``client_kwargs``...) are redacted too, ``None`` values are kept
    so the log still shows which options were unset, and passwords inside URLs are hidden.
    """
    result: dict[str, Any] = {}
    for name, value in (options or {}).items():
        if _is_secret_name(str(name)) and value is not None and not isinstance(value, Mapping | bool):
            result[name] = REDACTED
        else:
            result[name] = _redact_value(value)
    return result


def _display_uri(uri: str) -> str:
    """The URI as it may appear in an error message: no embedded password, long data: URIs shortened."""
    shown = _redact_url(uri)
    if len(shown) > _MAX_URI_IN_MESSAGE:
        shown = shown[: _MAX_URI_IN_MESSAGE - 3] + "..."
    return shown


def _secret_values(options: Mapping[str, Any] | None) -> list[str]:
    found: list[str] = []
    for name, value in (options or {}).items():
        if isinstance(value, Mapping):
            found.extend(_secret_values(value))
        elif isinstance(value, str) and len(value) >= 4 and _is_secret_name(str(name)):
            found.append(value)
    return found


def _describe(error: BaseException, options: Mapping[str, Any] | None = None) -> str:
    """A short human-readable cause for ``error``, with any credential value scrubbed out."""
    if isinstance(error, FileNotFoundError):
        text = "file not found"
    elif isinstance(error, IsADirectoryError):
        text = "is a directory"
    elif isinstance(error, PermissionError):
        text = f"permission denied ({error})" if str(error) else "permission denied"
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    for secret in _secret_values(options):
        text = text.replace(secret, REDACTED)
    return text


def open_filesystem(
    uri: str, storage_options: Mapping[str, Any] | None = None, retry: RetryPolicy | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem holding ``uri`` and the path within it (``fsspec.core.url_to_fs``).

    Storage options are completed with :func:`storage_options_for`. For S3, botocore retries each
    request as ``retry`` says (default :data:`evf.retry.DEFAULT_RETRY_POLICY`) unless the options set
    ``config_kwargs["retries"]`` themselves. Local paths give a ``LocalFileSystem`` and an absolute path.
    """
    options = storage_options_for(uri, storage_options)
    if _protocol(uri) in _S3_PROTOCOLS and "retries" not in (options.get("config_kwargs") or {}):
        config = dict(options.get("config_kwargs") or {})
        config.update(request_retry_config(retry or DEFAULT_RETRY_POLICY))
        options["config_kwargs"] = config
    return fsspec.core.url_to_fs(uri, **options)


def join_uri(base: str, *parts: str) -> str:
    """Join path segments onto a local path or a URI.

    Segments are always treated as relative (leading/trailing slashes are dropped, empty segments are
    skipped); URIs are joined with '/', local paths with ``os.path.join``. Examples:
    ``join_uri("s3://bucket/out/", "masks", "a.png") == "s3://bucket/out/masks/a.png"``,
    ``join_uri("/data", "/x.png") == "/data/x.png"``.
    """
    base = os.fspath(base)
    segments = [str(part) for part in parts]
    if _protocol(base) == "data":
        raise ValueError("cannot join path segments onto a data: URI")
    if _protocol(base) == "":
        relative = [stripped for segment in segments if (stripped := segment.strip("/" + os.sep))]
        if not base:
            return os.path.join(*relative) if relative else ""
        return os.path.join(base, *relative)
    scheme, _, rest = base.partition("://")
    head = rest.rstrip("/")
    if not head and rest:  # e.g. "file:///": keep the root slash
        head = "/"
    joined = head
    for segment in segments:
        segment = segment.strip("/")
        if not segment:
            continue
        joined = (
            segment if not joined else (joined + segment if joined.endswith("/") else f"{joined}/{segment}")
        )
    return f"{scheme}://{joined}"


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
    wrapped = kind(f"cannot {verb} {_display_uri(uri)!r}: {_describe(error, options)}{tries}")
    wrapped.errno = getattr(error, "errno", None)
    wrapped.retryable = is_retryable(error)
    return wrapped


def _read_once(uri: str, storage_options: Mapping[str, Any] | None, retry: RetryPolicy | None) -> bytes:
    if _protocol(uri) == "":
        with open(uri, "rb") as file:
            return file.read()
    fs, path = open_filesystem(uri, storage_options, retry)
    return bytes(fs.cat_file(path))


def read_bytes(
    uri: str, storage_options: Mapping[str, Any] | None = None, retry: RetryPolicy | None = None
) -> bytes:
    """All bytes behind ``uri``: a local path, ``file://``, any fsspec URL (``s3://``, ``gs://``,
    ``memory://``, ``https://``...) or an RFC 2397 ``data:`` URI (base64 or percent-encoded).

    Transient faults are retried as ``retry`` says (default :data:`evf.retry.DEFAULT_RETRY_POLICY`).
    Raises :class:`ImageReadError` naming the URI and the cause, e.g.
    ``cannot read 's3://b/x.png': file not found``.
    """
    uri = os.fspath(uri)
    if not uri:
        raise ImageReadError("cannot read '': empty URI")
    try:
        if _protocol(uri) == "data":
            return _parse_data_uri(uri)
        return call_with_retry(retry, _read_once, uri, storage_options, retry)
    except Exception as error:
        raise _storage_error(ImageReadError, "read", uri, error, storage_options) from error


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
    if _protocol(uri) == "":
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
        if not uri or _protocol(uri) == "data":
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
    name = _display_uri(os.fspath(source))
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


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes for an HxW (grayscale), HxWx1, HxWx3 (RGB) or HxWx4 (RGBA) ``uint8`` array.

    Channel order is RGB(A) as everywhere in this package (the BGR swap for OpenCV happens here).
    Raises ``TypeError`` for other dtypes and ``ValueError`` for other shapes.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"encode_png needs a uint8 array, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        pixels = array
    elif array.ndim == 3 and array.shape[2] == 3:
        pixels = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2BGR)
    elif array.ndim == 3 and array.shape[2] == 4:
        pixels = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGBA2BGRA)
    else:
        raise ValueError(f"encode_png needs an HxW, HxWx3 or HxWx4 array, got shape {array.shape}")
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"encode_png cannot encode an empty image (shape {array.shape})")
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(pixels))
    if not ok:
        raise ValueError(f"PNG encoding failed for an array of shape {array.shape}")
    return encoded.tobytes()
