"""Storage: URIs, fsspec filesystems and their options, and keeping credentials out of every log.

Everything that reaches storage takes a URI string plus optional fsspec ``storage_options``. For
``s3://`` URIs the standard AWS environment variables fill in whatever the caller did not pass
explicitly (see :func:`storage_options_for`), so a job runs the same against AWS, MinIO or a local
moto server. A job resolves its options once, in the driver, into a :class:`Storage`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import fsspec
import fsspec.core

from evf.retry import DEFAULT_RETRY_POLICY, RetryPolicy, request_retry_config

__all__ = [
    "REDACTED",
    "Storage",
    "describe_error",
    "display_url",
    "join_uri",
    "open_filesystem",
    "redact",
    "shown_uri",
    "storage_options_for",
    "uri_name",
    "uri_protocol",
]

REDACTED = "***"

_S3_PROTOCOLS = frozenset({"s3", "s3a"})
_CREDENTIAL_OPTIONS = ("key", "secret", "token", "profile", "anon")
_SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "key")
# Option names that contain a "secret word" but are not secrets.
_NOT_SECRET = frozenset({"endpoint_url", "key_prefix", "sse_kms_key_id", "ssekmskeyid"})
_MAX_URI_IN_MESSAGE = 200


def uri_protocol(uri: str) -> str:
    """The URI's scheme in lower case ('' for plain local paths, 'data' for data: URIs)."""
    if uri[:5].lower() == "data:":
        return "data"
    scheme, sep, _ = uri.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme) or len(scheme) == 1:
        # No scheme, or a Windows drive letter such as C://...
        return ""
    return scheme.lower()


def uri_name(uri: str) -> str:
    """The last path segment of a local path or URI, what a person calls the file:
    ``s3://b/shots/cat.jpg`` -> ``cat.jpg``; an http(s) URL's query left out and its escapes decoded;
    a shard member's own name (``tar://a/key.jpg::s3://b/x.tar`` -> ``key.jpg``); ``""`` for a
    ``data:`` URI."""
    if uri_protocol(uri) == "data":
        return ""
    uri = uri.split("::", 1)[0]
    protocol = uri_protocol(uri)
    if protocol in ("http", "https"):
        path = unquote(urlsplit(uri).path)
    elif protocol:
        path = uri.partition("://")[2]
    else:
        path = uri.replace(os.sep, "/")
    return path.rstrip("/").rsplit("/", 1)[-1]


def container_uri(uri: str) -> str:
    """Where the bytes of ``uri`` live: for an fsspec chained URL (``tar://key.jpg::s3://b/shard.tar``,
    a member of a WebDataset shard) the container's URI, else ``uri`` itself."""
    return uri.rsplit("::", 1)[1] if "::" in uri and not uri.startswith("data:") else uri


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
    if uri_protocol(uri) not in _S3_PROTOCOLS:
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


@dataclass(frozen=True)
class Storage:
    """fsspec options for every URI a job touches, resolved once (in the driver) and then shipped.

    ``explicit`` are the config's options; ``s3`` the same completed from the resolving process's
    AWS environment (so workers started before the variables were set still reach the right
    endpoint); ``retry`` how transient faults are retried (``evf.retry``), ``commit_retry`` the same
    for the writes that commit a job's rows (which hold on longer). ``options(uri)`` is what to pass
    to any function of this module. Never printed.
    """

    explicit: dict[str, Any] = field(default_factory=dict)
    s3: dict[str, Any] = field(default_factory=dict)
    retry: RetryPolicy = DEFAULT_RETRY_POLICY
    commit_retry: RetryPolicy = DEFAULT_RETRY_POLICY

    @classmethod
    def from_environment(
        cls,
        explicit: Mapping[str, Any] | None = None,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
        commit_retry: RetryPolicy = DEFAULT_RETRY_POLICY,
    ) -> Storage:
        explicit = dict(explicit or {})
        return cls(explicit, storage_options_for("s3://bucket", explicit), retry, commit_retry)

    def options(self, uri: str) -> dict[str, Any]:
        target = container_uri(uri)
        if uri_protocol(target) in _S3_PROTOCOLS:
            return dict(self.s3)
        return storage_options_for(target, self.explicit)

    def __repr__(self) -> str:  # never print credentials
        return "Storage(<redacted>)"


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return lowered not in _NOT_SECRET and any(word in lowered for word in _SECRET_WORDS)


def display_url(url: str) -> str:
    """``url`` as it may be stored or logged: an embedded password is hidden
    (``https://user:pass@host`` -> ``https://user:***@host``)."""
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
        return display_url(value)
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


def shown_uri(uri: str) -> str:
    """The URI as it may appear in an error message: no embedded password, long data: URIs shortened."""
    shown = display_url(uri)
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


def describe_error(error: BaseException, options: Mapping[str, Any] | None = None) -> str:
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
    target = container_uri(uri)
    options = storage_options_for(target, storage_options)
    if uri_protocol(target) in _S3_PROTOCOLS and "retries" not in (options.get("config_kwargs") or {}):
        config = dict(options.get("config_kwargs") or {})
        config.update(request_retry_config(retry or DEFAULT_RETRY_POLICY))
        options["config_kwargs"] = config
    if target != uri:  # a member of a container: the options are the container's storage's
        protocol = uri_protocol(target)
        return fsspec.core.url_to_fs(uri, **({protocol: options} if protocol else {}))
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
    if uri_protocol(base) == "data":
        raise ValueError("cannot join path segments onto a data: URI")
    if uri_protocol(base) == "":
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
